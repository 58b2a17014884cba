"""The samplers' random draws: standard normal noise made on its generator's device, so that a seed gives the same
noise whatever device sampling runs on."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def standard_normal(shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """z ~ N(0, I) of `shape` in `dtype`, on `device`.

    With a generator, z is drawn on the generator's device and then moved: the project seeds its sampling draws with
    CPU generators (MethodModule.generate, the evaluation's per-scale generators), so the noise of a seed is the same
    bits on a CPU, a GPU or MPS, and exactly what `torch.randn(shape, generator=generator, dtype=dtype)` gives (a CPU
    generator cannot draw on CUDA: torch refuses). Without one, z comes from `device`'s global generator (training
    draws, seeded per batch by train.runtime.resume.StepSeed)."""
    where = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=where, dtype=dtype).to(device)
