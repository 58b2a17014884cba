"""What every adapter's diffusers export shares: the scheduler equal to our sampler (DDIM, or LCMScheduler for latent
consistency models and k-step generators), the plain (LoRA-merged) network, weights on the CPU, and the w-embedding
files of guidance-distilled students."""
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


def _vp_scheduler_args(schedule, parameterization: str) -> dict | None:
    """The betas and prediction type of a diffusers VP scheduler with our schedule's alphas_cumprod; None when no
    diffusers beta schedule reproduces it. Raises for a parameterisation diffusers' VP schedulers lack."""
    from guidance.schedules import VPCosine, VPLinear

    prediction = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}.get(parameterization)
    if prediction is None:
        raise ValueError(f"export to diffusers supports eps, v and x0 networks on VP schedules; this one predicts "
                         f"{parameterization!r} — export --format safetensors instead")
    common = dict(num_train_timesteps=schedule.num_steps if hasattr(schedule, "num_steps") else 1000,
                  prediction_type=prediction, clip_sample=False, set_alpha_to_one=True)
    if isinstance(schedule, VPCosine) and schedule.s == 0.008 and schedule.max_beta == 0.999:
        return dict(beta_schedule="squaredcos_cap_v2", **common)
    if isinstance(schedule, VPLinear):
        return dict(beta_schedule="scaled_linear" if schedule.scaled else "linear",
                    beta_start=schedule.beta_start, beta_end=schedule.beta_end, **common)
    return None


def diffusers_scheduler(schedule, parameterization: str):
    """The diffusers scheduler whose DDIM steps equal ours (same alphas_cumprod, 'trailing' spacing)."""
    from diffusers import DDIMScheduler

    args = _vp_scheduler_args(schedule, parameterization)
    if args is None:
        raise ValueError(f"no diffusers scheduler reproduces {type(schedule).__name__}; export --format safetensors "
                         f"instead")
    return DDIMScheduler(timestep_spacing="trailing", **args)


def lcm_scheduler(schedule, parameterization: str, sampling: dict):
    """diffusers' LCMScheduler whose multistep consistency sampling equals train.methods.sampling.ConsistencySampling
    (`sampling`: its describe()): our alphas_cumprod, original_inference_steps = the solver grid N it was distilled
    on, its timestep_scaling (c_skip / c_out, LCM Eq. 9), and the check that its grid (timesteps k - 1, 2k - 1, ...,
    k = T // N) is our solver grid (trailing DDIM over N steps), which needs N to divide T."""
    import numpy as np
    from diffusers import LCMScheduler

    n = sampling["solver_steps"]
    args = None if parameterization == "flow" else _vp_scheduler_args(schedule, parameterization)
    if args is None:
        raise ValueError(f"a latent consistency model on the {type(schedule).__name__} schedule ({parameterization} "
                         f"network) has no diffusers scheduler (LCMScheduler is a VP scheduler); export --format "
                         f"safetensors instead")
    scheduler = LCMScheduler(original_inference_steps=n, timestep_scaling=sampling["timestep_scaling"], **args)
    scheduler.set_timesteps(n)
    ours = np.round(schedule.net_time(schedule.sampling_times(n)).numpy()).astype(np.int64)
    if not np.array_equal(scheduler.timesteps.numpy(), ours):
        t = args["num_train_timesteps"]
        raise ValueError(f"LCMScheduler's {n}-point grid (timesteps k - 1, 2k - 1, ... with k = {t} // {n}) is not the "
                         f"solver grid this model was distilled on ({n} does not divide {t}); export --format "
                         f"safetensors instead")
    return scheduler


def generator_timesteps(sampling: dict) -> list[int] | None:
    """A k-step generator's network timesteps (`sampling["timesteps"]`, as train.export records them) as the integers
    LCMScheduler takes, or None when one is not an integer (to float32 rounding of t (T - 1): 1e-3)."""
    ts = [float(t) for t in sampling.get("timesteps") or []]
    ints = [int(round(t)) for t in ts]
    return ints if ts and all(abs(t - i) <= 1e-3 for t, i in zip(ts, ints)) and min(ints) >= 1 else None


def generator_scheduler(schedule, parameterization: str, sampling: dict):
    """diffusers' LCMScheduler that, set to `timesteps=` the generator's network timesteps, samples a k-step generator
    (train.methods.onestep.OneStepDistillation.run_generator) exactly: its step keeps denoised = c_out x0 + c_skip x
    and re-noises it to the next timestep, alpha' denoised + sigma' z with fresh noise drawn from the call's
    generator; the last step returns denoised. c_skip = 0.25 / ((s t)^2 + 0.25) (LCM Eq. 9 with its
    timestep_scaling s) is not exactly 0: s is the diffusers default 10 (c_skip 2.5e-9 at timestep 999) raised where
    needed so that c_skip <= 1e-6 at the smallest timestep. original_inference_steps = T (every integer timestep is on
    its grid, so no warning). The first input is the pipeline's latents as given (LCMScheduler's init_noise_sigma is
    1): pass sigma(t_0) z, as run_generator's step 0 denoises (the card does)."""
    from diffusers import LCMScheduler

    args = None if parameterization == "flow" else _vp_scheduler_args(schedule, parameterization)
    if args is None:
        raise ValueError(f"a generator on the {type(schedule).__name__} schedule ({parameterization} network) has no "
                         f"diffusers LCMScheduler (a VP scheduler); export --format safetensors instead")
    ts = generator_timesteps(sampling)
    if ts is None:
        raise ValueError(f"the generator's network timesteps {sampling.get('timesteps')} are not integers, and "
                         f"LCMScheduler takes integer timesteps; train with generator.times t = i / (T - 1) (the "
                         f"default grid is), or export --format safetensors")
    scaling = max(10.0, 500.0 / min(ts))  # c_skip = 0.25 / ((scaling t)^2 + 0.25) <= 1e-6 for every t >= min(ts)
    return LCMScheduler(original_inference_steps=args["num_train_timesteps"], timestep_scaling=scaling, **args)


def export_scheduler(schedule, parameterization: str, sampling: dict | None = None):
    """The diffusers scheduler that samples an export as the project's recipe (`sampling`: the recipe's describe())
    does: LCMScheduler for a latent consistency model (recipe "consistency") and for a k-step generator (recipe
    "generator") whose network timesteps are integers, else the DDIM 'trailing' one (a class model's card samples a
    generator at other times with its own loop, which needs no scheduler)."""
    recipe = None if sampling is None else sampling.get("recipe")
    if recipe == "consistency":
        return lcm_scheduler(schedule, parameterization, sampling)
    if recipe == "generator" and parameterization != "flow" and generator_timesteps(sampling) is not None:
        return generator_scheduler(schedule, parameterization, sampling)
    return diffusers_scheduler(schedule, parameterization)


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
