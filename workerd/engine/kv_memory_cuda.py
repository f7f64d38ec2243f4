"""Virtual KV storage on CUDA (kv_pool = "virtual"): the driver's virtual memory API through
ctypes (libcuda), GPU-only; the contract is kv_memory.py's.

Each layer reserves address space for the whole pool (`cuMemAddressReserve`) and maps 2 MiB
granules (`cuMemCreate` + `cuMemMap` + `cuMemSetAccess`) as `commit` asks for them, bottom up;
`discard` unmaps and releases the granules wholly above a block (the first granule of each layer
stays: an anchor). The layer tensors wrap the reservations (`__cuda_array_interface__`) and
never move.

What broke for others, and what this does about it:
- vLLM's cumem allocator found both cuda-python and a ctypes libcuda wrapper failing with a
  "context mismatch": here torch initializes CUDA first, and the device's *primary* context
  (the one torch's runtime uses) is made current before every driver call.
- kvcached aborted when its own record of mapped pages drifted from the driver's (unmap of a
  page it thought absent): the only record here is `_mapped`, a per-layer count of granules
  mapped from the bottom, changed only after the driver call succeeded.
- kvcached faulted running kernels (Volta) by editing page tables under them: `discard`
  synchronizes the device before unmapping; `commit` maps fresh ranges nobody reads yet.
- a failed cuMemCreate half way leaked handles elsewhere: every granule's handle is released
  when its map or access call fails, and nothing is recorded until all succeeded.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import torch

from mell.common.errors import ConfigError

GRANULE = 2 << 20
_cuda: Any = torch.cuda  # (its init is untyped)
_SUCCESS = 0
_ALLOCATION_PINNED = 1
_LOCATION_DEVICE = 1
_ACCESS_READWRITE = 3


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Prop(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class _Access(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class _Array:
    """A device range as torch sees it (`torch.as_tensor`)."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (ptr, False),
            "version": 3,
        }


class CudaVirtualStorage:
    def __init__(
        self,
        num_layers: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ConfigError("kv_pool 'virtual' on a GPU needs CUDA")
        _cuda.init()  # torch's runtime owns the primary context; driver calls share it
        self.device = device
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self._cu = _driver()
        self._context()
        elem = torch.empty((), dtype=dtype).element_size()
        self.num_blocks = shape[0]
        self.layer_block_bytes = elem * math.prod(shape[1:])
        size = self.num_blocks * self.layer_block_bytes
        self.granule = max(GRANULE, self._granularity())
        self.reserved = -(-size // self.granule) * self.granule
        self._bases: list[int] = []
        self._handles: list[list[int]] = [[] for _ in range(num_layers)]  # per mapped granule
        for _ in range(num_layers):
            ptr = ctypes.c_uint64()
            self._check(
                self._cu.cuMemAddressReserve(
                    ctypes.byref(ptr), ctypes.c_size_t(self.reserved), ctypes.c_size_t(0), 0, 0
                ),
                "cuMemAddressReserve",
            )
            self._bases.append(ptr.value)
        # The first granule of each layer stays mapped (an anchor, as kvcached's): torch asks
        # the driver which device a wrapped pointer is on, which an unmapped range cannot say.
        for layer, base in enumerate(self._bases):
            self._map(layer, base)
        typestr = {torch.float32: "<f4", torch.bfloat16: "<i2", torch.float16: "<f2"}[dtype]
        # bfloat16 has no array-interface type: wrapped as int16, then reinterpreted.
        self.tensors = []
        for base in self._bases:
            wrap = torch.as_tensor(_Array(base, (math.prod(shape),), typestr), device=device)
            flat = wrap if wrap.dtype == dtype else wrap.view(torch.int16).view(dtype)
            self.tensors.append(flat.view(shape))

    def commit(self, num_blocks: int) -> None:
        """Map the granules holding blocks below `num_blocks`, in every layer."""
        want = -(-min(num_blocks, self.num_blocks) * self.layer_block_bytes // self.granule)
        self._context()
        for layer, base in enumerate(self._bases):
            while len(self._handles[layer]) < want:
                self._map(layer, base + len(self._handles[layer]) * self.granule)

    def discard(self, num_blocks: int) -> None:
        """Unmap and release the granules wholly at or above block `num_blocks` (never the
        first: the anchor)."""
        keep = max(-(-num_blocks * self.layer_block_bytes // self.granule), 1)
        if all(len(h) <= keep for h in self._handles):
            return
        torch.cuda.synchronize(self.device)  # no kernel may run on a range being unmapped
        self._context()
        for layer, base in enumerate(self._bases):
            handles = self._handles[layer]
            while len(handles) > keep:
                at = base + (len(handles) - 1) * self.granule
                self._check(self._cu.cuMemUnmap(ctypes.c_uint64(at), self._size()), "cuMemUnmap")
                self._check(self._cu.cuMemRelease(ctypes.c_uint64(handles.pop())), "cuMemRelease")

    def mapped_bytes(self) -> int:
        return sum(len(h) for h in self._handles) * self.granule

    def close(self) -> None:
        """Give everything back, the reservations too (the tensors must be gone)."""
        self.discard(0)
        torch.cuda.synchronize(self.device)
        for layer, base in enumerate(self._bases):
            for handle in self._handles[layer]:
                self._cu.cuMemUnmap(ctypes.c_uint64(base), self._size())
                self._cu.cuMemRelease(ctypes.c_uint64(handle))
            self._handles[layer] = []
        for base in self._bases:
            self._cu.cuMemAddressFree(ctypes.c_uint64(base), ctypes.c_size_t(self.reserved))
        self._bases = []

    # -- driver calls ------------------------------------------------------------------------

    def _map(self, layer: int, at: int) -> None:
        handle = ctypes.c_uint64()
        prop = self._prop()
        self._check(
            self._cu.cuMemCreate(ctypes.byref(handle), self._size(), ctypes.byref(prop), 0),
            "cuMemCreate",
        )
        status = self._cu.cuMemMap(ctypes.c_uint64(at), self._size(), 0, handle, 0)
        if status == _SUCCESS:
            access = _Access(_Location(_LOCATION_DEVICE, self.index), _ACCESS_READWRITE)
            status = self._cu.cuMemSetAccess(
                ctypes.c_uint64(at), self._size(), ctypes.byref(access), 1
            )
            if status != _SUCCESS:
                self._cu.cuMemUnmap(ctypes.c_uint64(at), self._size())
        if status != _SUCCESS:
            self._cu.cuMemRelease(handle)
            self._check(status, "cuMemMap/cuMemSetAccess")
        self._handles[layer].append(handle.value)

    def _prop(self) -> _Prop:
        prop = _Prop()
        prop.type = _ALLOCATION_PINNED
        prop.location = _Location(_LOCATION_DEVICE, self.index)
        return prop

    def _granularity(self) -> int:
        out = ctypes.c_size_t()
        prop = self._prop()
        self._check(
            self._cu.cuMemGetAllocationGranularity(ctypes.byref(out), ctypes.byref(prop), 0),
            "cuMemGetAllocationGranularity",
        )
        return int(out.value)

    def _size(self) -> ctypes.c_size_t:
        return ctypes.c_size_t(self.granule)

    def _context(self) -> None:
        """Make the device's primary context (torch's) current on this thread."""
        ctx = ctypes.c_void_p()
        dev = ctypes.c_int()
        self._check(self._cu.cuDeviceGet(ctypes.byref(dev), self.index), "cuDeviceGet")
        self._check(
            self._cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain"
        )
        self._check(self._cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        self._cu.cuDevicePrimaryCtxRelease(dev)  # (torch keeps it retained)

    def _check(self, status: int, call: str) -> None:
        if status != _SUCCESS:
            raise ConfigError(f"kv_pool 'virtual': {call} failed (CUDA driver error {status})")


def _driver() -> Any:
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError as err:
        raise ConfigError(
            f"kv_pool 'virtual' needs the CUDA driver (libcuda.so.1): {err}"
        ) from None
    for name in ("cuMemAddressReserve", "cuMemCreate", "cuMemMap", "cuMemSetAccess"):
        getattr(cu, name).restype = ctypes.c_int
    return cu
