"""One memory budget per worker (eLLM's elastic memory, policy only): the KV pool, the copy
staging and the activation peak of the step must fit in `memory_budget_bytes`, every step:

    max(kv cap, live top) · block bytes + staging + activation(step tokens) <= budget

The KV pool's physical extent is its cap (blocks handed out lie below it) or, while a shrink
is in progress, the top of its live blocks (blocks above the cap wait to be moved down or to
leave). Each step the scheduler asks `plan` for the step's token budget, given the extent, the
tokens it would like to run and the blocks the prefill it would like to run needs; the
activation share is what the extent leaves. So the chunk budget and the KV cap are chosen
together:
- while the KV is large the step's chunk is small: a prefill runs in the chunks the extent
  leaves beside the decodes;
- a prefill left fewer than min(its tokens, `min_prefill_tokens`) for `shrink_after_steps`
  steps shrinks the cap (deflate): to what leaves it its whole chunk (up to max_tokens) if no
  live block is then above the cap, else to the live blocks (plus a block per running
  request) if that still leaves it its least chunk, else to what does (never below the blocks
  it needs); the scheduler then moves blocks above the cap down (compaction) or swaps their
  holders to the host tier, one victim a step (lazily, like a balloon); a cap below the
  blocks that prefill needs grows to them instead;
- `grow_after_steps` steps with no prefill held back grow the cap back (inflate; hysteresis):
  to its maximum when no prefill waits, else to the most that leaves the next prefill its
  least chunk;
- at most `max_flips` changes of direction per `window_steps` steps (no oscillation).
The maximum cap is what the budget leaves beside a step of `min_tokens` tokens, so a step of
at least that many tokens always fits. The mechanism (which memory backs the pool, how it is
given back) is kv_memory.py's.

The activation peak is an analytic estimate (`activation_model`), not a measurement: the live
tensors of one layer per token of the step (times ACTIVATION_SAFETY: temporaries, rotary
tables, per-thread allocator arenas), plus the float32 logits of every row, plus the K/V
gather buffers of one layer for the longest context, plus (a backend that gathers pages, torch)
one layer's share of every KV block of the extent. Measured on mell-tiny (CPU, torch
attention), a 1,500-token prefill raised the peak RSS (VmHWM) by 18 MiB with one intra-op
thread and 31 MiB with two; the estimate is 40 MiB, and a test checks it bounds the rise.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from mell.common.errors import ConfigError
from mell.workerd.model.config import ModelConfig

SHRINK_AFTER_STEPS = 2
GROW_AFTER_STEPS = 16
WINDOW_STEPS = 64
MAX_FLIPS = 4
ACTIVATION_SAFETY = 4


@dataclass(frozen=True, slots=True)
class ActivationModel:
    per_token: int  # bytes per token of the step
    fixed: int  # bytes whatever the step's size
    per_block: int = 0  # bytes per KV block of the pool's extent (K/V gathered per layer)

    def peak(self, tokens: int, kv_blocks: int = 0) -> int:
        return self.fixed + self.per_token * tokens + self.per_block * kv_blocks


def activation_model(
    cfg: ModelConfig, dtype: torch.dtype, block_size: int = 16, gathers: bool = False
) -> ActivationModel:
    """An estimate of a step's activation memory (see the module docstring); `gathers`: the
    attention backend copies the batch's K/V pages of a layer out of the pool (torch), so a
    step holds up to one layer's share of the live KV again."""
    elem = torch.empty((), dtype=dtype).element_size()
    h, d = cfg.hidden_size, cfg.head_dim
    heads, kv = cfg.num_heads, cfg.num_kv_heads
    per_layer = 3 * h + (2 * heads + 2 * kv) * d + 3 * cfg.intermediate_size
    gather = 2 * cfg.max_model_len * kv * d
    per_token = ACTIVATION_SAFETY * elem * per_layer + 4 * cfg.vocab_size
    per_block = elem * 2 * block_size * kv * d if gathers else 0
    return ActivationModel(per_token=per_token, fixed=elem * gather, per_block=per_block)


@dataclass(frozen=True, slots=True)
class StepMemory:
    """One step's accounting: the KV extent (blocks), the token budget and the bytes."""

    extent: int
    tokens: int
    kv_bytes: int
    staging_bytes: int
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.kv_bytes + self.staging_bytes + self.activation_bytes


class MemoryBudget:
    def __init__(
        self,
        budget_bytes: int,
        block_bytes: int,
        staging_bytes: int,
        activations: ActivationModel,
        *,
        min_tokens: int,
        max_tokens: int,
        min_prefill_tokens: int = 0,
        shrink_after_steps: int = SHRINK_AFTER_STEPS,
        grow_after_steps: int = GROW_AFTER_STEPS,
        window_steps: int = WINDOW_STEPS,
        max_flips: int = MAX_FLIPS,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.block_bytes = block_bytes  # one block, every layer
        self.staging_bytes = staging_bytes
        self.act = activations
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        # The least chunk a waiting prefill is given before KV shrinks for it.
        self.min_prefill_tokens = min_prefill_tokens or max(max_tokens // 4, 1)
        self.max_blocks = self.kv_blocks_for(min_tokens)
        if self.max_blocks < 1:
            least = staging_bytes + activations.peak(min_tokens, 1) + block_bytes
            raise ConfigError(
                f"memory_budget_bytes {budget_bytes} is too small: staging {staging_bytes} + "
                f"activations of a {min_tokens}-token step {activations.peak(min_tokens)} + one "
                f"KV block {block_bytes} need at least {least}"
            )
        self.cap = self.max_blocks
        self.shrink_after, self.grow_after = shrink_after_steps, grow_after_steps
        self.window, self.max_flips = window_steps, max_flips
        self.step = 0
        self.shrinks = self.grows = 0
        self._starved = self._calm = 0
        self._direction = 0  # -1: last move shrank, +1: grew
        self._flips: deque[int] = deque()  # steps at which the direction changed

    def kv_blocks_for(self, tokens: int) -> int:
        """The most KV blocks beside a step of `tokens` tokens (may be negative)."""
        room = self.budget_bytes - self.staging_bytes - self.act.peak(tokens)
        return room // (self.block_bytes + self.act.per_block)

    def tokens_for(self, kv_blocks: int) -> int:
        """The most step tokens beside `kv_blocks` KV blocks."""
        room = self.budget_bytes - self.staging_bytes - self.act.peak(0, kv_blocks)
        return max((room - kv_blocks * self.block_bytes) // self.act.per_token, 0)

    def plan(
        self, top: int, decode_tokens: int, prefill_tokens: int, need_blocks: int, headroom: int = 0
    ) -> int:
        """This step's token budget, the cap updated first. `top`: one past the highest live
        block; `decode_tokens`: the running decodes; `prefill_tokens`: the tokens left of the
        prefill the step would run next (0: none waits); `need_blocks`: the blocks the next
        request to be admitted or reloaded needs in all (the cap never stays below them);
        `headroom`: blocks the running requests may take this step. The prefill is held back
        when the budget leaves it fewer than min(its tokens, min_prefill_tokens)."""
        self.step += 1
        while self._flips and self._flips[0] <= self.step - self.window:
            self._flips.popleft()
        chunk = min(prefill_tokens, self.min_prefill_tokens)
        room = self.tokens_for(max(self.cap, top)) - decode_tokens
        # the most KV that still leaves a waiting prefill its least chunk
        least = self.kv_blocks_for(decode_tokens + chunk) if prefill_tokens else self.max_blocks
        least = min(max(least, need_blocks, 1), self.max_blocks)
        if self.cap < need_blocks:  # (liveness: what must come next fits under the cap)
            self._move_to(min(need_blocks, self.max_blocks))
        if prefill_tokens > 0 and room < chunk:
            self._starved, self._calm = self._starved + 1, 0
            if self._starved >= self.shrink_after:
                whole = self.kv_blocks_for(decode_tokens + min(prefill_tokens, self.max_tokens))
                live = top + headroom
                target = max(whole, live, need_blocks) if live <= least else least
                self._move_to(target)
        else:
            self._starved, self._calm = 0, self._calm + 1
            if self._calm >= self.grow_after and self.cap < least:
                self._move_to(least)
        return self.tokens_for(max(self.cap, top))

    def _move_to(self, target: int) -> None:
        """Move the cap (a shrink or a grow), if the flips left in the window allow it."""
        if target == self.cap or not self._may_move(-1 if target < self.cap else 1):
            return
        if target < self.cap:
            self.shrinks += 1
        else:
            self.grows += 1
        self.cap = target

    def account(self, top: int, tokens: int) -> StepMemory:
        """The bytes a step of `tokens` tokens holds with the pool's live top at `top`."""
        extent = max(self.cap, top)
        return StepMemory(
            extent=extent,
            tokens=tokens,
            kv_bytes=extent * self.block_bytes,
            staging_bytes=self.staging_bytes,
            activation_bytes=self.act.peak(tokens, extent),
        )

    def flips_in_window(self) -> int:
        return len(self._flips)

    def _may_move(self, direction: int) -> bool:
        if direction == self._direction:
            return True
        if len(self._flips) >= self.max_flips:
            return False
        if self._direction != 0:
            self._flips.append(self.step)
        self._direction = direction
        return True
