"""The scale bench's memory arithmetic: bytes per parameter per copy of each row, the memory a row needs before it
runs, and whether the machine has it (a row that cannot fit is reported, never started).

Per parameter of the network (P) and of its LoRA adapters (L) or ESD-x's trainable cross-attention (X):

    trained fp32 copy with AdamW    16 B  (weights 4, gradient 4, two moments 8: Loshchilov & Hutter 2019)
    frozen copy, fp32 / bf16        4 B / 2 B
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path

TRAINED, FROZEN32, FROZEN16 = 16, 4, 2
# row -> (bytes as a function of the counts, the formula in words)
ARITHMETIC = {
    "plain": (lambda c: TRAINED * c["P"], "16P: one trained copy"),
    "teacher": (lambda c: TRAINED * c["P"], "16P: one trained copy"),
    "guidance_distillation": (lambda c: (TRAINED + FROZEN32) * c["P"], "20P: trained student + fp32 teacher"),
    "dmd_lora_bf16": (lambda c: (TRAINED + FROZEN16) * c["P"] + TRAINED * c["L"],
                      "18P + 16L: trained generator + bf16 base shared by teacher and fake score + trained LoRA"),
    "dmd_copy": (lambda c: (2 * TRAINED + FROZEN32) * c["P"], "36P: trained generator + trained fake score + fp32 teacher"),
    "fdistill_gan": (lambda c: (TRAINED + FROZEN16) * c["P"] + TRAINED * c["L"],
                     "18P + 16L (+ the small discriminator head)"),
    "erasure": (lambda c: 2 * FROZEN32 * c["P"] + (TRAINED - FROZEN32) * c["X"],
                "8P + 12X: student weights + frozen copy + gradient and moments of the trained cross-attention"),
}
MARGIN_MB = 1536  # kept free on the machine beyond a row's predicted need (other processes, page cache, error)


@lru_cache(maxsize=None)
def counts(net: str, rank: int) -> dict[str, int]:
    """P (network parameters), L (LoRA parameters at `rank` on models.fake_score.DEFAULT_LORA_TARGETS, as peft builds
    them: A r x in(x k x k), B out x r) and X (ESD-x's conditioning parameters) of `net`, counted on the meta device."""
    from torch import nn

    from bench.scale_nets import structure
    from models.fake_score import DEFAULT_LORA_TARGETS
    from models.param_select import conditioning_parameter_names

    unet = structure(net)
    sizes = dict((n, p.numel()) for n, p in unet.named_parameters())
    lora = 0
    for name, m in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in DEFAULT_LORA_TARGETS):
            continue
        if isinstance(m, nn.Linear):
            lora += rank * (m.in_features + m.out_features)
        elif isinstance(m, nn.Conv2d):
            lora += rank * (m.in_channels * math.prod(m.kernel_size) + m.out_channels)
    x = sum(sizes[n] for n in conditioning_parameter_names(unet))
    return {"P": sum(sizes.values()), "L": lora, "X": x}


def arithmetic_mb(row: str, c: dict[str, int]) -> float:
    return ARITHMETIC[row][0](c) / 2**20


def mem_available_mb() -> float:
    """MemAvailable of /proc/meminfo (what the kernel can give without swapping), in MB."""
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M).group(1)) / 1024


def mem_total_mb() -> float:
    return int(re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1)) / 1024


class Predictor:
    """A row's need in MB before it runs: process baseline + arithmetic + activations, where activations come from
    what earlier rows measured (peak growth minus arithmetic): the same row, latent size and checkpointing on the
    previous network, scaled by the width (sqrt of the parameter ratio: activations grow with channels, weights with
    their square) and by latent area x batch; none measured yet: none assumed (the margin covers a small network)."""

    def __init__(self, baseline_mb: float = 1200.0):
        self.baseline_mb = baseline_mb  # RSS of a worker at its baseline (libraries, text encoder); raised as measured
        self.acts: dict[tuple, tuple[float, int, int]] = {}  # (row, ckpt) -> (activation MB, P, size^2 x batch)

    def observe(self, row: str, ckpt: bool, c: dict, size: int, batch: int, peak_mb: float, baseline_mb: float) -> None:
        self.acts[(row, ckpt)] = (max(0.0, peak_mb - arithmetic_mb(row, c)), c["P"], size * size * batch)
        self.baseline_mb = max(self.baseline_mb, baseline_mb)

    def activations_mb(self, row: str, ckpt: bool, c: dict, size: int, batch: int) -> float:
        known = self.acts.get((row, ckpt)) or self.acts.get(("plain", ckpt))
        if known is None:
            return 0.0
        act, p, area = known
        return act * math.sqrt(c["P"] / p) * (size * size * batch) / area

    def need_mb(self, row: str, ckpt: bool, c: dict, size: int, batch: int, devices: int = 1,
                per_process_mb: float | None = None) -> float:
        """Total MB the row's processes need: `devices` x (baseline + per-process need; default the single-process
        arithmetic + activations)."""
        own = per_process_mb if per_process_mb is not None else \
            arithmetic_mb(row, c) + self.activations_mb(row, ckpt, c, size, batch)
        return devices * (self.baseline_mb + own)


def zero_arithmetic_mb(stage: int, world: int, c: dict) -> float:
    """Per-process MB of DMD with the LoRA fake score under ZeRO-`stage` on `world` processes (DeepSpeed ZeRO, Rajbhandari
    et al. 2020, sec. 5, with fp32 training: every engine keeps an fp32 master partition beside the weights): generator
    weights 4P (stage 3: 4P/N) + master 4P/N + gradients 4P/N (stage 1: 4P) + moments 8P/N; the bf16 base 2P whole
    (stage 3: partitioned with the fake-score engine, 2P/N); the LoRA's the same rule on L."""
    n = world

    def trained(k: int) -> float:
        weights = 4 * k / n if stage == 3 else 4 * k
        grads = 4 * k if stage == 1 else 4 * k / n
        return weights + 4 * k / n + grads + 8 * k / n

    base = 2 * c["P"] / n if stage == 3 else 2 * c["P"]
    return (trained(c["P"]) + trained(c["L"]) + base) / 2**20


def fits(need_mb: float, limit_mb: float | None) -> tuple[bool, float]:
    """(whether `need_mb` fits, the MB there are): the memory the kernel can give now, or `limit_mb` when given
    (the --mem-limit-gb option), less MARGIN_MB."""
    have = limit_mb if limit_mb is not None else mem_available_mb()
    return need_mb + MARGIN_MB <= have, have


def no_fit_text(need_mb: float, have_mb: float) -> str:
    return f"does not fit (needs about {need_mb / 1024:.1f} GB, {have_mb / 1024:.1f} GB free)"
