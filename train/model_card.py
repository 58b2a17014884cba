"""The model card (README.md) of an export: what the files are, how the model samples, runnable code that samples it
with diffusers alone (the network adapter's `card_code`), the training config and the metrics."""
from __future__ import annotations

import json


def _scheduler(meta: dict) -> str:
    """Which scheduler reproduces the project's sampler grid."""
    if meta["parameterization"] == "flow":
        return "the pipeline's flow-matching scheduler (Euler steps on the rectified-flow grid 1 - i / steps)"
    return "the DDIMScheduler ('trailing' spacing) that the code below loads"


def _grid_note(meta: dict) -> str:
    if meta["parameterization"] == "flow":
        return ""
    n = meta["schedule"].get("num_steps", 1000)
    return (f" DDIMScheduler steps from t to t - {n} // steps, so with a step count that divides {n} its grid is "
            f"exactly the one `python -m train sample` uses.")


def _lcm_generator_note(meta: dict) -> str:
    """How diffusers' LCMScheduler reproduces a VP generator at integer timesteps (models.diffusers_export)."""
    ts = meta["sampling"].get("timesteps")
    if meta["parameterization"] == "flow" or not ts or any(abs(t - round(t)) > 1e-3 for t in ts):
        return ""
    return (f" With diffusers: LCMScheduler with `timesteps={[round(t) for t in ts]}` and initial latents sigma * z "
            f"(sigma = {meta['generator']['sigma'][0]:.6g}; re-noise drawn from the call's generator) is the same "
            f"sampler (its c_skip is at most 1e-6).")


def recipe_text(meta: dict) -> str:
    """How the exported model samples (guidedistill.json's "sampling" recipe), whatever network it is."""
    s = meta["sampling"]
    if s["recipe"] == "generator":
        g, w = meta["generator"], meta.get("distilled_guidance_scale")
        return (f"A {g['steps']}-step generator trained by distribution matching against a guided teacher (guidance "
                f"w = {w} is built in): step 0 denoises sigma * z (unit noise z) at the first recorded time and keeps "
                f"the network's x0 prediction; each further step re-noises that x0 to the next time. The network times "
                f"and their alpha, sigma are `guidedistill.json[\"generator\"]` (the values used in training): "
                f"{g['steps']} network evaluation(s) per sample.{_lcm_generator_note(meta)}")
    if s["recipe"] == "consistency":
        lo, hi = s["scale_range"] or (None, None)
        w = ("the guidance scale w is an INPUT (the w-embedding)" if s["w_input"] else
             f"the guidance it was distilled with (w in [{lo:g}, {hi:g}]) is part of the network, so no guidance scale"
             if lo is not None else "the guidance it was distilled with is part of the network")
        text = (f"A latent consistency model (Luo et al. 2023, arXiv 2310.04378) distilled on a {s['solver_steps']}-"
                f"point solver grid: {w}; one network evaluation per step. Sample with diffusers' LCMScheduler "
                f"(`scheduler/`: original_inference_steps {s['solver_steps']}, timestep_scaling "
                f"{s['timestep_scaling']:g}) for 1 to {s['solver_steps']} steps ({s['steps']} below): each step keeps "
                f"c_skip x + c_out x0 and re-noises it to the next time, as `python -m train sample` does.")
        e = meta.get("w_embedding", {})
        return text + (f"\n\n**The w-embedding is not in the network's folder.** {e['why']}" if "why" in e else "")
    if s["recipe"] == "w_input":
        text = (f"A guidance-distilled student (Meng et al. 2023, arXiv 2210.03142): the guidance scale w is an INPUT, "
                f"so each step is one network evaluation. Sample with {_scheduler(meta)}, for {s['steps']} steps"
                f"{' (the step count it was distilled for)' if s['distilled'] else ''}.{_grid_note(meta)}")
        e = meta.get("w_embedding", {})
        return text + (f"\n\n**The w-embedding is not in the network's folder.** {e['why']}" if "why" in e else "")
    return ("A conditional diffusion model. Sample with classifier-free guidance, D = D_u + w (D_c - D_u), two network "
            f"evaluations per step (the conditional and the null or negative branch), with {_scheduler(meta)}."
            f"{_grid_note(meta)}")


def classes_line(meta: dict) -> str:
    """The card's line naming a class model's classes by label ("" without class names)."""
    names = meta.get("class_names")
    if not names or names == [str(i) for i in range(len(names))]:  # no names, or names that are the ids (digits)
        return ""
    return f"- classes (class label = name): {', '.join(f'{i} = {n}' for i, n in enumerate(names))}\n"


def model_card(meta: dict, code: str) -> str:
    """README.md of an export: meta is guidedistill.json (with the files' "contents"), code the adapter's card_code."""
    s = meta["sampling"]
    return f"""# {meta['method']} exported by guidedistill ({meta.get('pipeline', meta['diffusers_class'])})

{meta['contents']}

{recipe_text(meta)}

- method: `{meta['method']}`; parameterisation: `{meta['parameterization']}`; schedule: `{meta['schedule']['class']}`
- guidance convention: D = D_u + w (D_c - D_u) (w = 1 conditional; diffusers' guidance_scale, Flux's true_cfg_scale)
- network evaluations per sample: {s['steps'] * s['evaluations_per_step']} at the default steps below
{classes_line(meta)}
## Sample with diffusers alone

```python
{code}
```

## Training config

```json
{json.dumps(meta.get('training_config'), indent=2, default=str)}
```

## Metrics

```json
{json.dumps(meta.get('metrics'), indent=2)}
```
"""
