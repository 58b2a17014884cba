"""`python -m train export`: a training checkpoint -> a diffusers model folder or one safetensors file.

Writes are atomic (a hidden temporary folder next to the target, then a rename); an existing target
is refused unless `force`. The folder holds what diffusers loads unchanged (`unet/` for
`UNet2DModel.from_pretrained`, `scheduler/` for the matching scheduler), `guidedistill.json`
(method, parameterisation, schedule, guidance convention, null class) and a model card `README.md`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from train.checkpoint import load_method

FORMATS = ("diffusers", "safetensors")


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


def _model_card(meta: dict) -> str:
    return f"""# {meta['method']} exported by guidedistill

- method: `{meta['method']}`; parameterisation: `{meta['parameterization']}`; schedule: `{meta['schedule']['class']}`
- guidance convention: D = D_u + w (D_c - D_u) (w = 1 conditional); null class label: {meta.get('null_class_label')}

## Sample with diffusers alone

```python
import torch
from diffusers import DDIMScheduler, UNet2DModel
unet = UNet2DModel.from_pretrained("PATH/unet"); sched = DDIMScheduler.from_pretrained("PATH/scheduler")
labels = torch.arange(10); null = torch.full_like(labels, {meta.get('null_class_label')}); w = 2.0
sched.set_timesteps(50); x = torch.randn(10, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
for t in sched.timesteps:
    out = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
    c, u = out.chunk(2)
    x = sched.step(u + w * (c - u), t, x).prev_sample
```

## Training config

```json
{json.dumps(meta.get('config'), indent=2)}
```

## Metrics

```json
{json.dumps(meta.get('metrics'), indent=2)}
```
"""


def export(ckpt: str | os.PathLike, out: str | os.PathLike, fmt: str = "diffusers", force: bool = False,
           metrics: dict | None = None) -> Path:
    """Export the sampling network of a checkpoint; returns the written path."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"export target {str(out)!r} exists; choose another --out or pass --force to replace it")
    module = load_method(ckpt)
    den = module.sampling_denoiser()
    net = den.net
    meta = {"method": module.method_name, "parameterization": den.parameterization, "schedule": den.schedule.describe(),
            "guidance_convention": "D_u + w * (D_c - D_u)", **net.describe(), "metrics": metrics,
            "config": dict(module.hparams) if module.hparams else None}
    meta.pop("config", None) if meta["config"] is None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
            target = tmp / "model.safetensors"
            save_file(state, target, metadata={"guidedistill": json.dumps(meta, default=str)})
            os.replace(target, _free(out, force))
            return out
        scheduler = diffusers_scheduler(den.schedule, den.parameterization)
        net.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "guidedistill.json").write_text(json.dumps(meta, indent=2, default=str))
        (tmp / "README.md").write_text(_model_card(meta))
        os.replace(tmp, _free(out, force))
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _free(out: Path, force: bool) -> Path:
    """Remove an existing target when forced (just before the rename that replaces it)."""
    if out.exists() and force:
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    return out
