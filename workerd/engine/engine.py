"""The in-process inference engine: `ServingEngine` and the KV side of a migration
(`engine/contract.py`), on a real model and KV cache.

One `step()` is one story: schedule → run the model → sample → update the requests → return
their new tokens. The worker daemon wraps this; nothing here does I/O.
"""

from __future__ import annotations

import time
from collections import abc
from pathlib import Path

import torch

from mell.common.config import EngineConfig
from mell.common.errors import ConfigError, InvalidRequest, ModelError
from mell.common.hashing import block_hashes
from mell.common.messages import MigratedRequest
from mell.common.sampling import SamplingParams, TokenLogprobs
from mell.common.slo import RequestSLO
from mell.common.tiny_model import TINY_MODEL_NAME
from mell.workerd.engine.block_manager import BlockManager, OutOfBlocks
from mell.workerd.engine.contract import (
    EngineBusy,
    Frame,
    KVLayout,
    MigratableEngine,
    RequestState,
)
from mell.workerd.engine.copy_engine import D2H, H2D, make_copy_engine
from mell.workerd.engine.elastic import ElasticPool
from mell.workerd.engine.host_tier import HostTier
from mell.workerd.engine.kv_cache import KVCache, KVStorage, kv_bytes_per_block
from mell.workerd.engine.kv_memory import make_storage
from mell.workerd.engine.memory_budget import MemoryBudget, activation_model
from mell.workerd.engine.outputs import EngineStats, RequestOutput
from mell.workerd.engine.runner import ModelRunner, StagedRows, resolve_device, resolve_dtype
from mell.workerd.engine.scheduler import OffloadPolicy, ScheduledBatch, Scheduler
from mell.workerd.engine.sequence import Sequence, SequenceStatus
from mell.workerd.engine.shared_prefill import SharedPrefill
from mell.workerd.engine.step_model import StepTimeModel
from mell.workerd.model.config import ModelConfig, load_model_config
from mell.workerd.model.grammar import Guide, grammar_tokenizer

__all__ = ["Engine", "EngineStats", "RequestOutput"]

CPU_KV_CACHE_LIMIT_BYTES = 1 << 30
CUDA_KV_CACHE_FRACTION = 0.85  # of the free device memory after loading the weights
IDLE_COPY_WAIT_S = 0.0005
CACHED_HASHES_REPORTED = 4096  # the most cached block hashes a load report carries (32 KiB)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        _check_config(config)
        self.config = config
        model_dir = Path(config.model)
        if not model_dir.is_dir():
            hint = (
                " (the launcher resolves it with ensure_tiny_model)"
                if config.model == TINY_MODEL_NAME
                else ""
            )
            raise ModelError(f"model {config.model!r} is not a checkpoint directory{hint}")
        checkpoint = load_model_config(model_dir)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, checkpoint.dtype, device)
        max_len = config.max_model_len or checkpoint.max_model_len
        if max_len > checkpoint.max_position_embeddings:
            raise ConfigError(
                f"max_model_len {max_len} exceeds the model's max_position_embeddings "
                f"{checkpoint.max_position_embeddings}"
            )
        checkpoint = checkpoint.with_max_model_len(max_len)
        self.device, self.dtype = device, dtype
        self.runner = ModelRunner(
            model_dir,
            checkpoint,
            device=device,
            dtype=dtype,
            attention_backend=config.attention_backend,
            block_size=config.block_size,
            seed=config.seed,
        )
        budget = self._memory_budget(checkpoint, dtype)
        num_blocks = self._num_blocks(checkpoint, device, dtype, budget)
        storage = self._kv_storage(checkpoint, num_blocks, dtype, device, budget is not None)
        self.kv = KVCache(checkpoint, num_blocks, config.block_size, dtype, device, storage)
        # A request must always fit alone in the pool, or preemption could not make room.
        capacity = num_blocks * config.block_size
        self.model_config: ModelConfig = checkpoint.with_max_model_len(min(max_len, capacity))
        self.blocks = BlockManager(
            num_blocks,
            config.block_size,
            checkpoint.num_layers,
            low_first=budget is not None or storage is not None,
        )
        self.elastic = ElasticPool(budget, self.blocks, self.kv) if budget is not None else None
        if storage is not None and self.elastic is None:
            storage.commit(num_blocks)  # (a virtual pool with no budget: all of it, for good)
        self.tier = self._host_tier(checkpoint, device, dtype)
        self.step_model = StepTimeModel()
        self.scheduler = Scheduler(
            self.blocks,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            admission=config.admission,
            tier=self.tier,
            offload=OffloadPolicy(
                layerwise=config.kv_offload == "layerwise",
                block_bytes=kv_bytes_per_block(checkpoint, config.block_size, dtype),
                link_bytes_per_s=config.kv_link_bytes_per_s,
                force=config.kv_offload_force,
                seed=config.seed,
            ),
            step_model=self.step_model,
            tpot_slo_s=config.tpot_slo_s,
            elastic=self.elastic,
        )
        self._seqs: dict[str, Sequence] = {}
        self._shared = SharedPrefill()  # requests waiting on the prefill of their prompt
        self.slo_violations = {"ttft": 0, "tpot": 0}
        self.num_computed_tokens_total = 0  # tokens the model computed (prefill and decode)

    # -- ServingEngine -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        output_token_ids: abc.Sequence[int] = (),
        slo: RequestSLO | None = None,
    ) -> None:
        self._check_request(request_id, prompt_token_ids, sampling, output_token_ids, slo)
        self.wake()
        seq = self._new_seq(request_id, prompt_token_ids, sampling)
        seq.slo = slo
        seq.token_ids.extend(output_token_ids)
        seq.output_token_ids.extend(output_token_ids)
        seq.guide = self._guide(sampling, seq.output_token_ids)
        self._seqs[request_id] = seq
        if output_token_ids:
            self.scheduler.add(seq)
        else:
            self._queue(seq)

    def _queue(self, seq: Sequence) -> None:
        """A fresh request takes the KV of a live request with its prompt (now, or once that
        one's prompt is computed), else queues and leads its prompt."""
        shared = self._shared
        leader = shared.leader_of(seq) if shared.can_share(seq) else None
        if leader is None:
            if shared.can_share(seq):
                shared.lead(seq)
            self.scheduler.add(seq)
        elif self._holds_prompt(leader):
            self._fork(leader, seq)
        else:
            shared.wait(seq, leader)

    def _holds_prompt(self, seq: Sequence) -> bool:
        """The request's prompt KV is computed, in its device blocks (not staged to the host,
        nor being loaded back)."""
        tier = self.tier
        return (
            seq.status is SequenceStatus.RUNNING
            and seq.num_computed >= seq.num_prompt_tokens
            and self.blocks.has(seq.request_id)
            and (tier is None or seq.request_id not in tier.loading)
        )

    def _check_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        output_token_ids: abc.Sequence[int] = (),
        slo: RequestSLO | None = None,
    ) -> None:
        """What a request must be to run here, new or migrated in (with the tokens it has
        generated): sampling values and SLOs in range, a new id, a prompt, every token id in
        the vocabulary, prompt + max_tokens within max_model_len. InvalidRequest otherwise."""
        sampling.validate()
        if slo is not None:
            slo.validate()
        if request_id in self._seqs:
            raise InvalidRequest(f"duplicate request id {request_id!r}", param="request_id")
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        vocab = self.model_config.vocab_size
        for what, ids in (("prompt", prompt_token_ids), ("output", output_token_ids)):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequest(
                    f"{what} token id {bad} is out of the vocabulary (0..{vocab - 1})",
                    param="prompt",
                )
        bad = next((t for t in sampling.logit_bias if t >= vocab), None)
        if bad is not None:
            raise InvalidRequest(
                f"logit_bias token id {bad} is out of the vocabulary (0..{vocab - 1})",
                param="logit_bias",
            )
        limit = self.model_config.max_model_len
        total = len(prompt_token_ids) + sampling.max_tokens
        if total > limit:
            raise InvalidRequest(
                f"prompt of {len(prompt_token_ids)} tokens + max_tokens {sampling.max_tokens} "
                f"= {total} exceeds max_model_len {limit}",
                param="max_tokens",
            )
        if len(output_token_ids) >= sampling.max_tokens:
            raise InvalidRequest(
                f"{len(output_token_ids)} tokens generated of max_tokens {sampling.max_tokens}: "
                "nothing left to generate",
                param="max_tokens",
            )

    def abort(self, request_id: str) -> bool:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self._leave_group(seq)
        self.scheduler.remove(seq)
        return True

    def _leave_group(self, seq: Sequence) -> None:
        """`seq` stops waiting on, or leading, a shared prefill; its followers go on alone."""
        for follower in self._shared.leave(seq):
            self._queue(follower)

    def step(self) -> list[RequestOutput]:
        tier = self.tier
        if tier is not None:
            tier.poll()
        if self.elastic is not None:
            self.elastic.trim()  # (the memory of blocks freed by the last step goes back)
        batch = self.scheduler.schedule()
        if not batch:
            if tier is not None and tier.in_flight():
                time.sleep(IDLE_COPY_WAIT_S)  # nothing to run until copies land: don't spin
            return []
        hooks = None
        if tier is not None and (batch.staged or tier.loading):
            hooks = _TierHooksMaker(tier, batch)
        started = time.monotonic()
        samples = self.runner.execute(batch, self.kv.tensors, hooks)
        now = time.monotonic()
        self.step_model.record(sum(batch.num_tokens), now - started)
        self.num_computed_tokens_total += sum(batch.num_tokens)
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            seq.num_computed += n
            self._cache_computed(seq)
        for leader, followers in self._shared.computed(batch.seqs):
            for follower in followers:
                self._fork(leader, follower)
        outputs = []
        max_len = self.model_config.max_model_len
        for s in samples:
            seq = s.seq
            first = len(seq.output_token_ids)
            seq.append_token(s.token_id, max_len)
            if first == 0:
                seq.first_token_at = now
            if seq.is_finished:
                self._count_slo(seq, now)
            outputs.append(
                RequestOutput(
                    request_id=seq.request_id,
                    first_index=first,
                    new_token_ids=[s.token_id],
                    logprobs=None if s.logprobs is None else [s.logprobs],
                    finish_reason=seq.finish_reason,
                    num_prompt_tokens=seq.num_prompt_tokens,
                    prompt_logprobs=_prompt_logprobs(seq) if first == 0 else None,
                    num_cached_tokens=max(seq.num_cached_tokens, 0),
                )
            )
            if seq.is_finished:
                self._leave_group(seq)
                self.scheduler.remove(seq)
                del self._seqs[seq.request_id]
        for seq in batch.staged:
            if not seq.is_finished:
                self.scheduler.park(seq)
        return outputs

    def _new_seq(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams
    ) -> Sequence:
        seq = Sequence(request_id, prompt_token_ids, sampling, self.model_config.eos_token_ids)
        # A request that wants its prompt's logprobs computes every prompt position, so it
        # neither reads nor fills the prefix cache (as in vLLM).
        if self.config.enable_prefix_caching and sampling.prompt_logprobs is None:
            seq.prefix_hashes = block_hashes(prompt_token_ids, self.blocks.block_size)
        return seq

    def _fork(self, leader: Sequence, follower: Sequence) -> None:
        """The follower takes the leader's prompt KV but for the last prompt token (shared
        blocks, the last partial one copied), and computes that token itself (its logits give
        the follower's own first token). Without the leader's prompt KV on the device (staged
        to the host) or a free block for the copy, the follower queues as any request."""
        keep = follower.num_prompt_tokens - 1
        if not self._holds_prompt(leader):
            self.scheduler.add(follower)
            return
        try:
            copies = self.blocks.fork_prefix(leader.request_id, follower.request_id, keep)
        except OutOfBlocks:
            self.scheduler.add(follower)
            return
        self.kv.copy_blocks(copies)
        follower.num_computed = follower.num_cached_tokens = keep
        self.scheduler.resume(follower)

    def _cache_computed(self, seq: Sequence) -> None:
        """Cache the request's prompt blocks whose KV is now computed on the device (not a
        staged prompt's, nor those of a request whose KV is still being loaded)."""
        full = min(len(seq.prefix_hashes), seq.num_computed // self.blocks.block_size)
        if full <= seq.num_hashed_blocks or not self.blocks.has(seq.request_id):
            return
        if self.tier is not None and seq.request_id in self.tier.loading:
            return
        self.blocks.cache_blocks(seq.request_id, seq.prefix_hashes[:full])
        seq.num_hashed_blocks = full

    def _count_slo(self, seq: Sequence, now: float) -> None:
        """SLO violations of a finished request (TTFT from when it was added), against its
        own SLOs or the engine's."""
        own = seq.slo or RequestSLO()
        ttft_slo, tpot_slo = (
            own.ttft_or(self.config.ttft_slo_s),
            own.tpot_or(self.config.tpot_slo_s),
        )
        if ttft_slo > 0 and seq.first_token_at - seq.added_at > ttft_slo:
            self.slo_violations["ttft"] += 1
        decoded = len(seq.output_token_ids) - 1
        tpot = (now - seq.first_token_at) / decoded if decoded > 0 else 0.0
        if tpot_slo > 0 and tpot > tpot_slo:
            self.slo_violations["tpot"] += 1

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def max_model_len(self) -> int:
        return self.model_config.max_model_len

    def migratable(self) -> MigratableEngine:
        return self

    # -- sleep and wake (contract: ServingEngine) ---------------------------------------------

    @property
    def sleeping(self) -> bool:
        return self.kv.released

    def sleep(self) -> int:
        busy = self._busy()
        if busy:
            raise EngineBusy(f"cannot sleep: the engine holds {busy}")
        self.blocks.evict_cached()
        return self.kv.release()

    def wake(self) -> int:
        return self.kv.restore()

    def _busy(self) -> str:
        """What keeps the engine from sleeping, in words ("" when nothing does)."""
        sch, tier = self.scheduler, self.tier
        queues = {"running": len(sch.running), "queued": len(sch.waiting),
                  "swapped or parked": len(sch.hosted)}  # fmt: skip
        held = [f"{n} {what} requests" for what, n in queues.items() if n]
        others = len(self._seqs) - sum(queues.values())
        if others > 0:
            held.append(f"{others} paused requests")
        reserved = len(self.blocks.requests()) - len(self._seqs)
        if reserved > 0:
            held.append(f"{reserved} block reservations")
        if self.blocks.num_fenced() or (tier is not None and tier.in_flight()):
            held.append("KV copies in flight")
        return ", ".join(held)

    def stats(self) -> EngineStats:
        sch, tier = self.scheduler, self.tier
        if tier is not None:
            tier.poll()  # (blocks whose copies have landed count as free)
        host = tier.blocks if tier is not None else None
        moved = tier.copies.bytes_moved if tier is not None else {D2H: 0, H2D: 0}
        stats = EngineStats(
            num_running=len(sch.running),
            num_waiting=len(sch.waiting) + self._shared.num_followers,
            num_total_blocks=self.blocks.num_blocks,
            num_free_blocks=self.blocks.num_free(),
            block_size=self.blocks.block_size,
            num_preemptions_total=sch.num_preemptions_total,
            request_blocks=self.blocks.attributed_blocks(list(self._seqs)),  # (shared: once)
            num_host_total_blocks=host.num_blocks if host is not None else 0,
            num_host_free_blocks=host.num_free() if host is not None else 0,
            num_fenced_blocks=self.blocks.num_fenced() + (host.num_fenced() if host else 0),
            num_swapped=len(sch.hosted),
            num_swaps_total=sch.num_swaps_total,
            num_parked_total=sch.num_parked_total,
            num_tokens_recomputed_total=sch.num_tokens_recomputed_total,
            num_computed_tokens_total=self.num_computed_tokens_total,
            offload_bytes_total={"d2h": moved[D2H], "h2d": moved[H2D]},
            slo_violations_total=dict(self.slo_violations),
            prefix_cache_queries_total=sch.prefix_queries_total,
            prefix_cache_hits_total=sch.prefix_hits_total,
            cached_hashes=self.blocks.cached_hashes(CACHED_HASHES_REPORTED),
            sleeping=self.sleeping,
            kv_bytes_released=self.kv.nbytes if self.sleeping else 0,
            kv_pool_cap_blocks=self.blocks.num_blocks,
            kv_pool_mapped_bytes=self.kv.mapped_bytes,
            kv_pool_resizes_total={"shrink": 0, "grow": 0},
        )
        return self.elastic.with_counts(stats) if self.elastic is not None else stats

    # -- migration: MigratableEngine (contracts in engine/contract.py) -----------------------

    @property
    def kv_layout(self) -> KVLayout:
        return KVLayout(
            num_layers=self.kv.num_layers,
            block_size=self.blocks.block_size,
            block_bytes=self.kv.block_bytes,
            on_host=self.kv.on_host,
        )

    def request_state(self, request_id: str) -> RequestState | None:
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        return RequestState(
            num_tokens=seq.num_tokens,
            num_computed=seq.num_computed,
            num_preemptions=seq.num_preemptions,
            is_finished=seq.is_finished,
            is_decoding=seq.is_decoding,
            kv_on_host=self.tier is not None and self.tier.holds(request_id),
        )

    def pause(self, request_id: str) -> bool:
        seq = self._seqs.get(request_id)
        if seq is None or seq.is_finished:
            return False
        self._leave_group(seq)
        self.scheduler.pause(seq)
        return True

    def resume(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None and seq.status is SequenceStatus.PAUSED:
            self.scheduler.resume(seq)

    def export_request(self, request_id: str, with_kv: bool) -> MigratedRequest:
        seq = self._seqs[request_id]
        return MigratedRequest(
            request_id=request_id,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            output_token_ids=list(seq.output_token_ids),
            sampling=seq.sampling,
            num_computed=seq.num_computed if with_kv else 0,
            generator_state=None,  # randomness is a function of (seed, index): nothing to carry
            slo=seq.slo,
        )

    def reserve(self, key: str, num_blocks: int) -> bool:
        self.wake()
        tokens = num_blocks * self.blocks.block_size
        tier = self.tier
        if tier is not None and tier.holds(key):  # (received into the host: it grows there)
            return tier.reserve(key, tokens)
        if self.blocks.can_append(key, tokens):
            self.blocks.append(key, tokens)
            if self.elastic is not None:
                self.elastic.commit()  # (the blocks are written by the migration)
            return True
        return tier is not None and not self.blocks.has(key) and tier.reserve(key, tokens)

    def release(self, key: str) -> int:
        holder = self._holder(key)
        held = holder.num_blocks_of(key) if holder is not None else 0
        if self.tier is None:
            self.blocks.free(key)
        else:
            self.tier.release(key, self.blocks)  # (blocks a copy still touches: once done)
        return held

    def block_table(self, key: str, layer: int) -> list[int] | None:
        holder = self._holder(key)
        return holder.block_table(key, layer) if holder is not None else None

    def read_kv(self, key: str, layer: int, block_ids: list[int]) -> list[Frame]:
        if self.tier is not None and self._holder(key) is self.tier.blocks:
            return self.tier.read(key, layer, block_ids)
        return self.kv.read(layer, block_ids)

    def write_kv(
        self, key: str, layer: int, block_ids: list[int], frames: list[memoryview]
    ) -> None:
        if self.tier is not None and self._holder(key) is self.tier.blocks:
            self.tier.write(layer, block_ids, frames)
        else:
            self.kv.write(layer, block_ids, frames)

    def _holder(self, key: str) -> BlockManager | None:
        """The block manager of the tier whose blocks `key` holds; None when it holds none."""
        if self.blocks.has(key):
            return self.blocks
        if self.tier is not None and self.tier.holds(key):
            return self.tier.blocks
        return None

    def import_request(self, key: str, request: MigratedRequest) -> None:
        rid = request.request_id
        self._check_request(
            rid, request.prompt_token_ids, request.sampling, request.output_token_ids, request.slo
        )
        tokens = request.prompt_token_ids + request.output_token_ids
        if not 0 <= request.num_computed < len(tokens):
            raise InvalidRequest(f"request {rid!r}: {request.num_computed} computed tokens")
        holder = self._holder(key)
        held = holder.num_blocks_of(key) if holder is not None else 0
        if request.num_computed > 0 and held < self.blocks.blocks_for(request.num_computed):
            raise InvalidRequest(f"request {rid!r}: its KV blocks did not all arrive")
        self.wake()
        seq = self._new_seq(rid, request.prompt_token_ids, request.sampling)
        seq.slo = request.slo
        seq.token_ids = tokens
        seq.output_token_ids = list(request.output_token_ids)
        seq.guide = self._guide(request.sampling, seq.output_token_ids)
        if holder is not None and request.num_computed > 0:
            holder.rename(key, rid)  # (host blocks: it waits there to be reloaded)
            seq.num_computed = request.num_computed
        else:
            self.release(key)
        self._seqs[rid] = seq
        self.scheduler.resume(seq)

    def _eos_ids(self) -> list[int]:
        return self.model_config.eos_token_ids

    def _guide(self, sampling: SamplingParams, output: list[int]) -> Guide | None:
        """The request's structured-output guide (after `output`), None without a grammar."""
        if sampling.grammar is None:
            return None
        tokenizer_json = Path(self.config.model) / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise InvalidRequest("structured output needs the model's tokenizer.json")
        cfg = self.model_config
        tokenizer = grammar_tokenizer(tokenizer_json, cfg.vocab_size, tuple(cfg.eos_token_ids))
        return Guide(tokenizer, sampling.grammar, output)

    # -- extras -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the copy engine's thread (if any), after the copies in flight."""
        if self.tier is not None:
            self.tier.copies.close()

    def _host_tier(
        self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype
    ) -> HostTier | None:
        c = self.config
        if c.kv_offload == "off":
            return None
        per_block = kv_bytes_per_block(cfg, c.block_size, dtype)
        num_blocks = c.host_kv_bytes // per_block
        if num_blocks < 1:
            raise ConfigError(
                f"kv_offload {c.kv_offload!r} needs host_kv_bytes of at least one block "
                f"({per_block} bytes), got {c.host_kv_bytes}"
            )
        if c.kv_offload == "layerwise" and self.runner.attention.name != "torch":
            raise ConfigError(
                "kv_offload 'layerwise' needs the torch attention backend for now (a prompt "
                "staged to the host attends to its own K/V; FlashInfer's ragged prefill is "
                "not wired yet); use 'swap'"
            )
        return HostTier(
            self.kv.tensors, num_blocks, make_copy_engine(device, c.kv_link_bytes_per_s)
        )

    @property
    def num_total_blocks(self) -> int:
        return self.blocks.num_blocks

    def _memory_budget(self, cfg: ModelConfig, dtype: torch.dtype) -> MemoryBudget | None:
        """The elastic budget (memory_budget_bytes > 0): staging for one layer's copy of the
        longest request, activations bounded analytically (memory_budget.py)."""
        c = self.config
        if c.memory_budget_bytes == 0:
            return None
        per_block = kv_bytes_per_block(cfg, c.block_size, dtype)
        staging = per_block // cfg.num_layers * -(-cfg.max_model_len // c.block_size)
        return MemoryBudget(
            c.memory_budget_bytes,
            per_block,
            staging,
            activation_model(cfg, dtype, c.block_size, self.runner.attention.name == "torch"),
            min_tokens=min(c.max_num_seqs, c.max_num_batched_tokens),
            max_tokens=c.max_num_batched_tokens,
        )

    def _kv_storage(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        dtype: torch.dtype,
        device: torch.device,
        elastic: bool,
    ) -> KVStorage | None:
        pool = self.config.kv_pool
        if pool == "static" or (pool == "auto" and not (elastic and device.type == "cpu")):
            return None
        shape = (num_blocks, 2, self.config.block_size, cfg.num_kv_heads, cfg.head_dim)
        return make_storage(cfg.num_layers, shape, dtype, device)

    def _num_blocks(
        self,
        cfg: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        budget: MemoryBudget | None = None,
    ) -> int:
        c = self.config
        per_block = kv_bytes_per_block(cfg, c.block_size, dtype)
        if budget is not None:
            n = budget.max_blocks
            if c.num_kv_blocks > 0:
                n = min(n, c.num_kv_blocks)
                budget.max_blocks = budget.cap = n
        elif c.num_kv_blocks > 0:
            n = c.num_kv_blocks
        elif c.kv_cache_memory_bytes > 0:
            n = c.kv_cache_memory_bytes // per_block
        elif device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            n = int(free * CUDA_KV_CACHE_FRACTION) // per_block
        else:
            wanted = -(-c.max_num_seqs * cfg.max_model_len // c.block_size)
            n = min(wanted, CPU_KV_CACHE_LIMIT_BYTES // per_block)
        if n < 1:
            raise ConfigError(f"KV cache too small: {n} blocks of {per_block} bytes")
        return n


class _TierHooksMaker:
    """The step's per-layer hooks (model/llama.py LayerHooks), once the runner has laid out the
    rows of the staged prompts: wait for a loading request's layer before the layer, send a
    staged prompt's K/V of the layer to the host after it."""

    def __init__(self, tier: HostTier, batch: ScheduledBatch) -> None:
        self.tier = tier
        self.loading = [s.request_id for s in batch.seqs if s.request_id in tier.loading]
        self.staged: list[StagedRows] = []

    def __call__(self, staged: list[StagedRows]) -> _TierHooksMaker:
        self.staged = staged
        return self

    def before_layer(self, layer: int) -> None:
        for request_id in self.loading:
            self.tier.wait_layer(request_id, layer)

    def after_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for request_id, lo, hi in self.staged:
            self.tier.stage_layer(request_id, layer, k[lo:hi], v[lo:hi])


def _prompt_logprobs(seq: Sequence) -> list[TokenLogprobs] | None:
    """A request's prompt-token logprobs, when it asked for them (sent with its first token)."""
    return None if seq.sampling.prompt_logprobs is None else list(seq.prompt_logprobs)


def _check_config(c: EngineConfig) -> None:
    for key in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(c, key) < 1:
            raise ConfigError(f"engine.{key} must be at least 1, got {getattr(c, key)}")
    for key in ("num_kv_blocks", "kv_cache_memory_bytes", "max_model_len", "host_kv_bytes"):
        if getattr(c, key) < 0:
            raise ConfigError(f"engine.{key} must be >= 0, got {getattr(c, key)}")
    for key in ("kv_link_bytes_per_s", "ttft_slo_s", "tpot_slo_s"):
        if getattr(c, key) < 0:
            raise ConfigError(f"engine.{key} must be >= 0, got {getattr(c, key)}")
