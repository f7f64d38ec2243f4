"""A step-time model fitted online: seconds ≈ a + b · tokens, by least squares over the last
`window` measured steps. It predicts what a prefill chunk would add to a step (SLO-aware
admission) and the prefill speed (the swap-or-recompute cost model)."""

from __future__ import annotations

from collections import deque


class StepTimeModel:
    def __init__(self, window: int = 128) -> None:
        self._steps: deque[tuple[int, float]] = deque(maxlen=window)
        self.a = 0.0  # fixed seconds per step
        self.b = 0.0  # seconds per token
        self._dirty = False

    def record(self, num_tokens: int, seconds: float) -> None:
        self._steps.append((num_tokens, seconds))
        self._dirty = True

    @property
    def fitted(self) -> bool:
        self._fit()
        return self.b > 0.0

    def predict(self, num_tokens: int) -> float:
        self._fit()
        return self.a + self.b * num_tokens

    def tokens_per_s(self) -> float:
        """Marginal prefill speed (0: not measured yet)."""
        self._fit()
        return 1.0 / self.b if self.b > 0.0 else 0.0

    def _fit(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        n = len(self._steps)
        if n < 2:
            return
        mx = sum(x for x, _ in self._steps) / n
        my = sum(y for _, y in self._steps) / n
        sxx = sum((x - mx) ** 2 for x, _ in self._steps)
        if sxx <= 0.0:
            return
        sxy = sum((x - mx) * (y - my) for x, y in self._steps)
        self.b = max(sxy / sxx, 0.0)
        self.a = max(my - self.b * mx, 0.0)
