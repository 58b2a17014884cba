"""`export --format lora` for text-to-image models: LoRA students fitted through the CLI on tiny SD 1.5, SDXL, SD3, Flux
folders export diffusers' own LoRA file; the ORIGINAL pipeline folder with `load_lora_weights` (and the model card's
scheduler and w-embedding hook) generates the latents our sampler gives from the same noise."""
from __future__ import annotations

import diffusers
import pytest
import torch

from tests.train.text_fits import FLUX_GUIDANCE, PIPELINES, PROMPTS, card_call, pipeline_latents, randomised
from train.runtime.checkpoint import load_method
from train.cli import main
from models.diffusers_export import LORA_WEIGHTS

TOL = dict(rtol=1e-4, atol=1e-4)


def card_pipeline(folder, base):
    """Run the model card's code up to its sampling call, with EXPORT = folder: the pipeline it builds."""
    card = (folder / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("\n```", 1)[0]
    assert f'from_pretrained("{base}")' in code and 'load_lora_weights("EXPORT")' in code
    namespace: dict = {}
    exec(code.rsplit("image =", 1)[0].replace("EXPORT", str(folder)), namespace)
    pipe = namespace["pipe"]
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cfg_args(kind: str, steps: int, scale: float) -> dict:
    """Pipeline arguments for CFG with the negative prompt "a red car" on PROMPTS, our sampler's time grid."""
    args = {"prompt": PROMPTS, "negative_prompt": ["a red car"] * len(PROMPTS), "num_inference_steps": steps,
            **({"true_cfg_scale": scale, "guidance_scale": FLUX_GUIDANCE} if kind == "flux" else {"guidance_scale": scale})}
    if kind == "sd3":  # its pipeline's default grid ends at sigma 1/1000; ours is 1 - i/N (shifted)
        args["sigmas"] = [1 - i / steps for i in range(steps)]
        del args["num_inference_steps"]
    return args


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3", "flux"])
def test_erasure_lora_loads_onto_the_original_pipeline(t2i_workspace, kind, tmp_path):
    ckpt = randomised(t2i_workspace.fitted("erase", kind, params="lora", lora_rank=2, lora_alpha=4.0),
                      tmp_path / "erased.ckpt", "lora_B")  # alpha != rank: the scale travels in the metadata
    base = t2i_workspace.model(kind)
    out = tmp_path / "lora"
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--format", "lora"])
    assert (out / LORA_WEIGHTS).is_file() and (out / "scheduler").is_dir() == (kind in ("sd15", "sdxl"))
    assert not (out / "w_embedding").exists()

    ours, _ = load_method(ckpt).generate(PROMPTS, scale=4.0, steps=2, negative="a red car", seed=3)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    plain = getattr(diffusers, PIPELINES[kind]).from_pretrained(base, local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    if (out / "scheduler").is_dir():
        plain.scheduler = diffusers.DDIMScheduler.from_pretrained(out / "scheduler")
    without = pipeline_latents(plain, kind, noise, cfg_args(kind, 2, 4.0))
    assert (without - ours).abs().max() > 1e-2  # the LoRA changes what the base pipeline generates
    theirs = pipeline_latents(card_pipeline(out, base), kind, noise, cfg_args(kind, 2, 4.0))
    torch.testing.assert_close(ours, theirs, **TOL)
    call = card_call(out)  # the card's own call sets the knobs used here (its prompt is positional)
    assert set(call) == set(cfg_args(kind, 2, 4.0)) - {"prompt"}
    assert call.get("guidance_scale") == (FLUX_GUIDANCE if kind == "flux" else 7.5)


def test_guidance_distilled_lora_exports_with_its_w_embedding(t2i_workspace, tmp_path):
    """A LoRA w-student on SD 1.5: the LoRA file, the trailing DDIM scheduler and w_embedding/ with the card's hook
    reproduce the student at w = 5 (the card's scale) with one evaluation per step (guidance_scale 1)."""
    ckpt = randomised(t2i_workspace.fitted("gd", "sd15", lora_rank=2), tmp_path / "student.ckpt",
                      "lora_B", "w_embedding.linear_2")
    out = tmp_path / "lora"
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--format", "lora"])
    assert (out / "w_embedding" / "config.json").is_file()
    pipe = card_pipeline(out, t2i_workspace.model("sd15"))
    ours, nfe = load_method(ckpt).generate(PROMPTS, scale=5.0, steps=2, seed=7)
    assert nfe == 2
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    args = {"prompt": PROMPTS, "num_inference_steps": 2, "guidance_scale": 1.0}
    torch.testing.assert_close(ours, pipeline_latents(pipe, "sd15", noise, args), **TOL)
    for hook in list(pipe.unet.time_embedding._forward_hooks):  # the LoRA alone is not the student: w matters
        del pipe.unet.time_embedding._forward_hooks[hook]
    assert (pipeline_latents(pipe, "sd15", noise, args) - ours).abs().max() > 1e-2


def test_a_text_model_trained_without_lora_is_refused(t2i_workspace, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", "--ckpt", str(t2i_workspace.fitted("erase", "sd15")), "--out", str(tmp_path / "lora"),
              "--format", "lora"])
    assert "no LoRA adapters" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
