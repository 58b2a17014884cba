"""Frozen weights held in a lower precision: a frozen network (the teacher of one-step distillation, the shared base
of a LoRA fake score) stored and run in bfloat16 or float16 while everything trained stays in float32.

A frozen network in float32 costs as much memory as the weights of the network being trained; in bfloat16 half
of that, and its activations half too. DMD2 (arXiv 2405.14867) and diffusers' training scripts run the frozen
networks in half precision for this reason. What trains is not touched: LoRA weights stay float32 (peft computes
the LoRA branch in its weights' dtype and adds it to the base layer's output), so do their gradients and AdamW
moments.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def frozen_dtype_of(name: str) -> torch.dtype:
    """The torch dtype named `name` (one of FROZEN_DTYPES); anything else is a ValueError naming the choices."""
    if name not in FROZEN_DTYPES:
        raise ValueError(f"frozen_dtype must be one of {', '.join(FROZEN_DTYPES)}, got {name!r} "
                         f"(bfloat16 halves the frozen teacher's memory; float16 needs a GPU)")
    return FROZEN_DTYPES[name]


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


_WARNED_CPU: set[torch.dtype] = set()


def warn_cpu_once(dtype: torch.dtype) -> None:
    """Say once per process and dtype what a half-precision frozen network costs on a CPU, where bfloat16 / float16
    matmuls and convolutions are far slower than float32 (on a GPU they are the fast path)."""
    if dtype in _WARNED_CPU:
        return
    _WARNED_CPU.add(dtype)
    name = str(dtype).removeprefix("torch.")
    warnings.warn(f"frozen_dtype {name} on a CPU halves the frozen network's memory but runs it many times slower than "
                  f"float32 (measured on a 2-core Xeon, the wide network's DMD step with a LoRA r8 fake score: 74.6 s on "
                  f"a bfloat16 base against 13.2 s with a float32 full copy); on a CPU use frozen_dtype: float32 unless "
                  f"memory is what stops the run. On a GPU {name} is the fast path.", stacklevel=2)


def run_frozen_in(net: nn.Module, dtype: torch.dtype, warn_cpu: bool = True) -> nn.Module:
    """Store `net`'s frozen weights (parameters with requires_grad off, and floating buffers) in `dtype` and run
    `net(x, t, cond, ...)` in it: x and the condition's floating tensors are cast to `dtype` on the way in (the
    network time t is left in float32: 999 is not a bfloat16 number, and diffusers casts the time embedding
    itself), the output is returned in float32. Trainable parameters (LoRA adapters) keep their dtype. Gradients
    flow through to float32 inputs. float32 is a no-op. warn_cpu: say once (warn_cpu_once) when it runs on a CPU;
    a caller with its own note passes False. Returns `net`, changed in place."""
    if dtype == torch.float32:
        return net
    if getattr(net, "_frozen_dtype", None) is not None:
        raise ValueError(f"{type(net).__name__} already runs its frozen weights in {net._frozen_dtype}")
    for p in net.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)
    for module in net.modules():
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                setattr(module, name, b.to(dtype))

    def cast_inputs(module, args, kwargs):
        if not args:
            return args, kwargs
        if warn_cpu and isinstance(args[0], Tensor) and args[0].device.type == "cpu":
            warn_cpu_once(dtype)
        return (_cast(args[0], dtype), *args[1:2], *(_cast(a, dtype) for a in args[2:])), kwargs

    def output_in_float32(module, args, kwargs, output):
        return output.float() if isinstance(output, Tensor) and output.is_floating_point() else output

    net.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    net.register_forward_hook(output_in_float32, with_kwargs=True)
    net._frozen_dtype = dtype
    return net
