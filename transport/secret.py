"""The cluster secret: who may join the worker plane and speak on the data ports.

One random key per cluster, created at the gateway's first start in its data dir (mode 0600)
and read by every worker from a file. Workers prove they hold it by signing their `Hello`
(HMAC-SHA256 over the route, the identity and the time); every data-port message carries an
HMAC of its body (`SignedCodec`), so a forged one is dropped. The KV frames beside a body are
not signed themselves: they ride on the signed body's connection, which a peer without the
secret cannot open as a worker (nothing it sends is accepted). Against an eavesdropper on the
network the plane is not encrypted.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from mell.common.errors import ConfigError, ProtocolError
from mell.transport.codec import Buffer, Codec

T = TypeVar("T")
SECRET_FILE = "cluster.secret"  # in the gateway's data dir
_KEY_BYTES = 32
MAC_BYTES = 32


class ClusterSecret:
    """The shared key; signs and verifies sequences of byte strings."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ConfigError("the cluster secret is shorter than 16 bytes")
        self._key = key

    @classmethod
    def create_or_load(cls, path: str | Path) -> ClusterSecret:
        """The secret in `path`, created (random, mode 0600) when the file does not exist."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls.load(path)
        except OSError as err:
            raise ConfigError(f"cannot create the cluster secret {path}: {err.strerror}") from None
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(_KEY_BYTES) + "\n")
        return cls.load(path)

    @classmethod
    def load(cls, path: str | Path) -> ClusterSecret:
        """The secret in `path` (hex text); ConfigError naming the file when it is unusable."""
        path = Path(path)
        try:
            text = path.read_text().strip()
        except OSError as err:
            raise ConfigError(
                f"cannot read the cluster secret {path}: {err.strerror} (copy the gateway's "
                f"DATA_DIR/{SECRET_FILE})"
            ) from None
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise ConfigError(f"the cluster secret {path} is not hex text") from None

    def sign(self, *parts: Buffer) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in parts:  # length-prefixed: no two sequences sign alike
            mac.update(len(part).to_bytes(8, "little"))
            mac.update(part)
        return mac.digest()

    def verify(self, mac: Buffer, *parts: Buffer) -> bool:
        return hmac.compare_digest(bytes(mac), self.sign(*parts))


class SignedCodec(Codec[T]):
    """A `Codec` whose messages start with a frame holding the HMAC of their body; a message
    whose MAC does not verify is a ProtocolError (dropped by the receive loops)."""

    def __init__(self, union: Any, secret: ClusterSecret) -> None:
        super().__init__(union)
        self._secret = secret

    def encode(self, message: Any, buffers: Sequence[Buffer] = ()) -> list[Buffer]:
        frames = super().encode(message, buffers)
        return [self._secret.sign(frames[0]), *frames]

    def decode(self, frames: Sequence[Buffer]) -> tuple[T, list[memoryview]]:
        if len(frames) < 2 or not self._secret.verify(frames[0], frames[1]):
            raise ProtocolError("unsigned or forged message (not signed with the cluster secret)")
        return super().decode(frames[1:])
