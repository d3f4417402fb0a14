"""Per-step training scalars (losses) kept on the device and read to the host in one transfer when asked.

Reading a step's loss with `.item()` makes the host wait until the GPU has finished that step, so the host cannot
queue the next step's kernels while the GPU runs this one: the GPU idles for the host's launch time at every step.
That matters most at small batches (the paper trains with 10 images per device), where a step's GPU time is short.
"""

from __future__ import annotations

import numpy as np
import torch


class StepScalars:
    def __init__(self):
        self._steps: list[int] = []
        self._values: list[torch.Tensor] = []

    def add(self, step: int, *values: torch.Tensor) -> None:
        """Keep this step's scalars where they are (no host wait)."""
        self._steps.append(step)
        self._values.append(torch.stack([v.detach().float() for v in values]))

    def __len__(self) -> int:
        return len(self._steps)

    def read(self) -> list[tuple[int, list[float]]]:
        """Every step added since the last read, in order, as (step, its values): one wait for the device. The
        values are the float32 scalars as Python floats, exactly what `.item()` of each would have returned."""
        if not self._steps:
            return []
        rows = torch.stack(self._values).tolist()
        steps = self._steps
        self._steps, self._values = [], []
        return list(zip(steps, rows, strict=True))

    def sums(self, n_values: int) -> np.ndarray:
        """Read, and sum each of the `n_values` values over the steps in step order (float64, as adding up
        `.item()`s would); zeros where no step was added."""
        rows = [values for _, values in self.read()]
        return np.cumsum(rows, axis=0)[-1] if rows else np.zeros(n_values)
