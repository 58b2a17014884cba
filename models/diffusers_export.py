"""What every adapter's diffusers export shares: the DDIM scheduler equal to our sampler, the plain (LoRA-merged)
network, weights on the CPU, and the w-embedding files of guidance-distilled students."""
from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from models.param_select import lora_layers, merge_lora

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for

# why a guidance-distilled student's w-embedding lives beside the network (the adapters' W_EMBEDDING_NOTE)
W_EMBEDDING_NOTE = (
    "diffusers' {cls} has no input for a guidance-scale embedding added to the OUTPUT of its time embedding (the "
    "student's w enters there, Meng et al. 2023 sec. 4.1), and its pipeline has no place for one, so the "
    "w-embedding is stored beside it in w_embedding/: the weights of diffusers' own `TimestepEmbedding` over a "
    "`Timesteps` code of w * w_scale, whose output the card's forward hook adds to the output of `{hooked}`. "
    "The network alone samples as if that term were zero.")


def diffusers_scheduler(schedule, parameterization: str):
    """The diffusers scheduler whose DDIM steps equal ours (same alphas_cumprod, 'trailing' spacing)."""
    from diffusers import DDIMScheduler

    from guidance.schedules import VPCosine, VPLinear

    prediction = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}.get(parameterization)
    if prediction is None:
        raise ValueError(f"export to diffusers supports eps, v and x0 networks on VP schedules; this one predicts "
                         f"{parameterization!r} — export --format safetensors instead")
    common = dict(num_train_timesteps=schedule.num_steps if hasattr(schedule, "num_steps") else 1000,
                  prediction_type=prediction, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    if isinstance(schedule, VPCosine) and schedule.s == 0.008 and schedule.max_beta == 0.999:
        return DDIMScheduler(beta_schedule="squaredcos_cap_v2", **common)
    if isinstance(schedule, VPLinear):
        return DDIMScheduler(beta_schedule="scaled_linear" if schedule.scaled else "linear",
                             beta_start=schedule.beta_start, beta_end=schedule.beta_end, **common)
    raise ValueError(f"no diffusers scheduler reproduces {type(schedule).__name__}; export --format safetensors instead")


def plain_network(net: nn.Module) -> nn.Module:
    """`net` with any LoRA adapters merged into its weights (the original parameter names), else `net` itself."""
    return merge_lora(net) if lora_layers(net) else net


def cpu_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict as safetensors writes it: detached, contiguous, on the CPU."""
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_w_embedding(embedding: nn.Module, folder: Path, added_to: str) -> None:
    """A models.w_embedding.GuidanceScaleEmbedding as diffusers' `TimestepEmbedding` weights + the config that rebuilds
    it (names follow TimestepEmbedding's and Timesteps' arguments: our sinusoidal code is Timesteps(flip_sin_to_cos=True,
    shift 0)); `added_to` names the module whose output it is added to, as the card's code reaches it."""
    from safetensors.torch import save_file

    folder.mkdir()
    save_file(cpu_state(embedding.state_dict()), folder / "diffusion_pytorch_model.safetensors")
    config = {"_class_name": "TimestepEmbedding", "in_channels": embedding.embed_dim,
              "time_embed_dim": embedding.hidden_dim, "out_dim": embedding.out_dim, "act_fn": "silu",
              "flip_sin_to_cos": True, "downscale_freq_shift": 0, "w_scale": embedding.w_scale,
              "input": "Timesteps(in_channels, flip_sin_to_cos, downscale_freq_shift)(w * w_scale)",
              "added_to": added_to}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
