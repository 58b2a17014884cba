"""Where `sample` and `evaluate` run: the --device and --dtype flags checked (one line saying what this machine has),
and a loaded method module placed there with everything its sampling uses (networks, VAE, prompt encoders)."""
from __future__ import annotations

import torch
from torch import nn

from models.adapters import ConditionalNetwork
from models.frozen_dtype import FROZEN_DTYPES, run_frozen_in

SAMPLING_DTYPES = tuple(FROZEN_DTYPES)  # float32 (the networks as loaded), bfloat16, float16
MPS_FLOAT64 = ("--device mps is not supported yet: the schedules' exact math (guidance/schedules.py: log-SNR grids, "
               "sampling times, derivatives) runs in float64, which Apple's MPS has no kernels for; sample with "
               "--device cpu")


def available_devices() -> list[str]:
    """The devices of this machine a --device may name: cpu, then cuda and cuda:0 .. cuda:N-1."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return out


def default_device() -> str:
    """cuda when torch sees a CUDA device, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def sampling_device(name: str | None = None) -> torch.device:
    """--device NAME as a torch.device (None: default_device()): cpu, cuda or cuda:N. A device this machine does not
    have is a ValueError naming the ones it has; mps is one too (MPS_FLOAT64)."""
    name = default_device() if name is None else str(name).strip()
    here = f"this machine has: {', '.join(available_devices())}"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is not None and device.type == "mps":
        raise ValueError(MPS_FLOAT64)
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r} ({here})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
            raise ValueError(f"--device {name} is not available ({why}); {here}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name} is not available: torch sees {torch.cuda.device_count()} CUDA "
                             f"device(s); {here}")
    return device


def sampling_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype NAME (float32, bfloat16, float16) as a torch.dtype for the diffusion networks on `device`; float16 on a
    CPU is a ValueError: a CPU runs it tens of times slower than float32 (a small diffusers UNet's forward on the
    2-core test machine: 13.2 s in float16, 0.38 s in float32, 0.28 s in bfloat16), and bfloat16 saves the same
    memory."""
    if name not in FROZEN_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(SAMPLING_DTYPES)}, got {name!r}")
    if name == "float16" and device.type == "cpu":
        raise ValueError("--dtype float16 is for GPUs: a CPU runs float16 networks tens of times slower than "
                         "float32; on the CPU use --dtype bfloat16 (the same half memory) or float32")
    return FROZEN_DTYPES[name]


def diffusion_networks(module: nn.Module) -> list[nn.Module]:
    """The network adapters (models.adapters.ConditionalNetwork) in `module` that hold their diffusers network (UNet,
    transformer) themselves: the teacher's, the student's, its EMA copy, a generator's, a fake score's, a weak teacher's.
    Wrappers around one (a w-input student's guidance-scale embedding, text-encoder unlearning's edited encoder) are
    not: what they add stays in its own dtype and feeds the wrapped network."""
    return [m for m in module.modules() if isinstance(m, ConditionalNetwork)
            and any(child is getattr(m, "unet", None) for child in m.children())]


def place_for_sampling(module: nn.Module, device: torch.device | str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Put a loaded method module (train.runtime.checkpoint.load_method: eval mode, on the CPU) and what its sampling
    uses on `device`, its diffusion networks in `dtype`. Returns `module`, changed in place.

    dtype (not float32): the module is frozen (nothing here trains; an attack's gradients reach its own tokens, not
    the weights) and each of diffusion_networks(module) stores its weights in dtype and runs in it
    (models.frozen_dtype.run_frozen_in: x and the condition cast on the way in, the output back to float32), so
    latents, guidance and the scheduler's math stay float32, as do the VAE and the prompt encoders. A network that
    already runs in a frozen dtype (its config's frozen_dtype) keeps it. The cast is made before the move, so only
    the smaller weights travel. float32 leaves the networks as loaded.
    device: module.to(device) (every network it registers: teacher, student, EMA, generator, autoguidance's weak
    teacher), then the process's shared prompt encoder (module.conditioner.to) and a latent model's VAE
    (models.vae.shared_vae). Samples still come back to the CPU (MethodModule.generate), and their initial and later
    noise is drawn on CPU generators, so a seed gives the same noise on every device."""
    from models.vae import shared_vae

    device = torch.device(device)
    if dtype != torch.float32:
        networks = diffusion_networks(module)
        if not networks:
            raise ValueError(f"--dtype {str(dtype).removeprefix('torch.')} applies to diffusers networks (UNets, "
                             f"transformers); {type(module).__name__} holds none: sample it with --dtype float32")
        module.requires_grad_(False)
        for net in networks:
            if getattr(net, "_frozen_dtype", None) is None:
                run_frozen_in(net, dtype, warn_cpu=False)  # its CPU note is about training
    module.to(device)
    module.conditioner.to(device)
    if module.vae_folder is not None:
        shared_vae(module.vae_folder).to(device)
    return module
