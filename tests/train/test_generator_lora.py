"""LoRA generators of train.methods.onestep (generator.lora_rank > 0, DMD2's SDXL LoRA): fitted through the CLI only
their LoRA weights move; `export --format lora` writes the adapters alone (peft files for the digits UNet, diffusers'
LoRA file for SD 1.5 / SDXL), which on the ORIGINAL model with diffusers' LCMScheduler set to the generator's
timesteps (first input sigma(t_0) z, re-noise from the same seeded generator) reproduce `module.generate` at k = 1
and 2 steps, as the model card's own code does; `--format diffusers` merges them."""
from __future__ import annotations

import ast
import json

import diffusers
import pytest
import torch
from diffusers import LCMScheduler, UNet2DModel

from guidance.schedules import VPLinear
from models.diffusers_export import LORA_WEIGHTS, generator_scheduler
from tests.train.test_export import LABELS, TOL, run_card
from tests.train.test_guidance_distillation import write_config
from tests.train.text_fits import PIPELINES, PROMPTS, pipeline_latents, randomised
from train.cli import main
from train.export import _base_weights
from train.methods.onestep_config import GeneratorArgs
from train.runtime.checkpoint import load_method

ONESTEP = "train.methods.onestep.OneStepDistillation"
TOL_TEXT = dict(rtol=1e-4, atol=1e-4)  # as tests/train/test_text_lora_export.py


def only_lora_moved(module) -> None:
    """The generator's (and its EMA's) base weights are still the frozen teacher's (rounded to its frozen_dtype); its
    LoRA B weights moved off 0."""
    teacher = _base_weights(module.teacher.net)
    for net in [module.generator.net] + ([module.ema.module] if module.ema is not None else []):
        base = _base_weights(net)
        assert base.keys() == teacher.keys()
        assert all(torch.equal(v.to(teacher[k].dtype), teacher[k]) for k, v in base.items())
        lora_b = [p for n, p in net.named_parameters() if "lora_B" in n]
        assert lora_b and any(p.abs().max() > 0 for p in lora_b)
    trainable = {n for n, p in module.generator.net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_generator_lora_arguments_are_checked():
    assert GeneratorArgs(lora_rank=4, lora_alpha=8.0, lora_targets=["to_q"]).lora_rank == 4
    for bad, match in [({"lora_rank": -1}, "lora_rank must be >= 0"),
                       ({"lora_alpha": 4.0}, "set generator.lora_rank > 0"),
                       ({"lora_targets": ["to_q"]}, "set generator.lora_rank > 0"),
                       ({"lora_rank": 2, "lora_alpha": 0.0}, "lora_alpha must be positive"),
                       ({"lora_rank": 2, "lora_targets": []}, "non-empty list")]:
        with pytest.raises(ValueError, match=match):
            GeneratorArgs(**bad)


def test_generator_scheduler_takes_integer_timesteps_and_bounds_c_skip():
    sched = generator_scheduler(VPLinear(1000, 0.00085, 0.012, scaled=True), "eps", {"timesteps": [999.0, 499.0]})
    assert isinstance(sched, LCMScheduler) and sched.config.timestep_scaling == 10.0  # diffusers' default
    assert sched.config.original_inference_steps == 1000
    c_skip, _ = sched.get_scalings_for_boundary_condition_discrete(499)
    assert c_skip < 1e-6
    low = generator_scheduler(VPLinear(), "eps", {"timesteps": [999.0, 19.0]})
    assert low.get_scalings_for_boundary_condition_discrete(19)[0] <= 1.0001e-6  # raised scaling keeps c_skip small
    with pytest.raises(ValueError, match="are not integers, and LCMScheduler takes integer timesteps"):
        generator_scheduler(VPLinear(), "eps", {"timesteps": [699.3]})


# ------------------------------------------------------------------------------------------------ digits

def fit_generator(teacher, root, steps: int, **overrides):
    """last.ckpt of a rank-2 LoRA generator (k = steps, EMA 0.9) fitted 2 steps through `python -m train fit`."""
    args = {"teacher": str(teacher), "fake_score": {"rank": 4}, "ema_decay": 0.9, "val_samples": 0,
            "generator": {"steps": steps, "lr": 1e-3, "lora_rank": 2, "lora_alpha": 4.0}, **overrides}
    main(["fit", "--config", str(write_config(root / "g.yaml", ONESTEP, args, root / "run", max_steps=2,
                                              ckpt_every=2))])
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def teacher_export(tiny_teacher_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("generator_base") / "teacher"
    main(["export", "--ckpt", str(tiny_teacher_ckpt), "--out", str(out)])
    return out


@pytest.mark.parametrize("steps", [1, 2])
def test_class_lora_generator_exports_adapters_and_samples_like_generate(tiny_teacher_ckpt, teacher_export, tmp_path,
                                                                         steps):
    ckpt = fit_generator(tiny_teacher_ckpt, tmp_path, steps)
    only_lora_moved(load_method(ckpt))
    ckpt = randomised(ckpt, tmp_path / "g.ckpt", "lora_B")  # so that a dropped adapter could not pass
    module = load_method(ckpt)
    out = tmp_path / "lora"
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--format", "lora"])
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                              "guidedistill.json", "README.md"}
    (theirs,) = run_card(out, tmp_path, f"path, base, seed = {str(out)!r}, {str(teacher_export)!r}, 3")
    ours, nfe = module.generate(LABELS, seed=3)
    assert nfe == steps
    torch.testing.assert_close(ours, theirs, **TOL)
    (plain,) = run_card(teacher_export, tmp_path, "")
    assert (module.generate(LABELS, seed=0)[0] - plain).abs().max() > 1e-2  # not the teacher

    merged = tmp_path / "merged"  # --format diffusers: the adapters merged into unet/, LCMScheduler in scheduler/
    main(["export", "--ckpt", str(ckpt), "--out", str(merged)])
    unet = UNet2DModel.from_pretrained(merged / "unet").eval()
    assert not [k for k in unet.state_dict() if "lora" in k]
    (card,) = run_card(merged, tmp_path, f"path, seed = {str(merged)!r}, 3")
    torch.testing.assert_close(ours, card, **TOL)
    # diffusers' LCMScheduler at the generator's timesteps, from sigma(t_0) z, re-noise from the same generator
    meta = json.loads((merged / "guidedistill.json").read_text())
    sched = LCMScheduler.from_pretrained(merged / "scheduler")
    sched.set_timesteps(timesteps=[int(t) for t in meta["sampling"]["timesteps"]])
    assert sched.timesteps.tolist() == [round(t) for t in meta["generator"]["timesteps"]]
    assert len(sched.timesteps) == steps
    gen = torch.Generator().manual_seed(3)
    x = meta["generator"]["sigma"][0] * torch.randn(ours.shape, generator=gen)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t, class_labels=LABELS).sample, t, x, generator=gen).prev_sample
    torch.testing.assert_close(x, ours, **TOL_TEXT)


# ------------------------------------------------------------------------------------------------ SD 1.5 / SDXL

def card_code(folder) -> str:
    return (folder / "README.md").read_text().split("```python\n", 1)[1].split("\n```", 1)[0]


def card_pipeline(folder):
    """The model card's code run up to its sampling call (EXPORT = folder): its pipeline."""
    namespace: dict = {}
    exec(card_code(folder).rsplit("image =", 1)[0].replace("EXPORT", str(folder)), namespace)
    namespace["pipe"].set_progress_bar_config(disable=True)
    return namespace["pipe"]


def card_latents(folder):
    """The model card's code run as written (EXPORT = folder), its pipeline call returning latents."""
    code = card_code(folder).replace("EXPORT", str(folder)).replace(").images[0]", ', output_type="latent").images')
    namespace: dict = {"__name__": "card"}
    exec(code, namespace)
    return namespace["image"]


def pipeline_generate(pipe, kind, module, prompts, seed, meta):
    """The pipeline's latents from generate's noise: z from a CPU generator seeded `seed`, latents = sigma(t_0) z,
    the same generator (in the state after z) for LCMScheduler's re-noise, at the generator's timesteps."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(len(prompts), *module.sample_shape(), generator=gen)
    args = {"prompt": prompts, "guidance_scale": 1.0, "generator": gen,
            "timesteps": [round(t) for t in meta["generator"]["timesteps"]]}
    return pipeline_latents(pipe, kind, meta["generator"]["sigma"][0] * z, args)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_text_lora_generator_samples_on_the_original_pipeline(t2i_workspace, kind, steps, tmp_path):
    fitted = t2i_workspace.fitted("dmd", kind, generator={"lr": 1e-3, "steps": steps, "lora_rank": 2})
    only_lora_moved(load_method(fitted))
    ckpt = randomised(fitted, tmp_path / "g.ckpt", "lora_B")
    module = load_method(ckpt)
    base = t2i_workspace.model(kind)
    out = tmp_path / "lora"
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--format", "lora"])
    assert {p.name for p in out.iterdir()} == {LORA_WEIGHTS, "scheduler", "guidedistill.json", "README.md"}
    meta = json.loads((out / "guidedistill.json").read_text())
    assert meta["sampling"]["timesteps"] == meta["generator"]["timesteps"] and len(meta["generator"]["t"]) == steps
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"
    ours, nfe = module.generate(PROMPTS, seed=5)
    assert nfe == steps

    pipe = getattr(diffusers, PIPELINES[kind]).from_pretrained(base, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(out)
    pipe.scheduler = LCMScheduler.from_pretrained(out / "scheduler")
    card = card_pipeline(out)
    assert isinstance(card.scheduler, LCMScheduler)
    for p in (pipe, card):
        torch.testing.assert_close(pipeline_generate(p, kind, module, PROMPTS, 5, meta), ours, **TOL_TEXT)
    call = ast.parse(card_code(out).rsplit("image = ", 1)[1]).body[0].value.value.value
    keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
    assert keywords == {"guidance_scale": "1.0", "timesteps": str([round(t) for t in meta["generator"]["timesteps"]]),
                        "latents": "latents", "generator": "gen"}
    # the card as written: its prompt, seed 0, latents sigma(t_0) z of the pipeline's default size
    prompt = ast.literal_eval(call.args[0])
    torch.testing.assert_close(card_latents(out), module.generate([prompt], seed=0)[0], **TOL_TEXT)

    plain = getattr(diffusers, PIPELINES[kind]).from_pretrained(base, local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    plain.scheduler = LCMScheduler.from_pretrained(out / "scheduler")
    assert (pipeline_generate(plain, kind, module, PROMPTS, 5, meta) - ours).abs().max() > 1e-2  # the LoRA matters

    full = tmp_path / "full"  # --format diffusers: the LoRA merged, model_index.json naming LCMScheduler
    main(["export", "--ckpt", str(ckpt), "--out", str(full), "--format", "diffusers"])
    merged = card_pipeline(full)
    assert isinstance(merged.scheduler, LCMScheduler)
    assert not [k for k in merged.unet.state_dict() if "lora" in k]
    torch.testing.assert_close(pipeline_generate(merged, kind, module, PROMPTS, 5, meta), ours, **TOL_TEXT)
    torch.testing.assert_close(card_latents(full), module.generate([prompt], seed=0)[0], **TOL_TEXT)


def test_shipped_sdxl_lora_generator_config_exports_onto_the_original_pipeline(t2i_workspace, tmp_path):
    """configs/sdxl/dmd_lora.yaml (DMD2's 4-step SDXL LoRA: rank 64, alpha 8, timesteps 999, 749, 499, 249) fitted one
    step on the tiny SDXL folder (tests/train/test_text_configs.py's shrinking), exported as LoRA: the original
    pipeline as the card builds it samples like generate at those four timesteps."""
    import yaml

    from tests.train.test_text_configs import ROOT, shrunk
    from train.runtime.config import read_yaml

    shipped = read_yaml(ROOT / "configs" / "sdxl" / "dmd_lora.yaml")
    gen = shipped["model"]["init_args"]["generator"]
    assert (gen["steps"], gen["lora_rank"], gen["lora_alpha"]) == (4, 64, 8.0)
    base = t2i_workspace.model("sdxl")
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(shrunk(shipped, base, t2i_workspace, tmp_path / "run"),
                                                    sort_keys=False))
    main(["fit", "--config", str(tmp_path / "g.yaml")])
    ckpt = randomised(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "g.ckpt", "lora_B", std=0.02)
    module = load_method(ckpt)
    only_lora_moved(module)
    out = tmp_path / "lora"
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--format", "lora"])
    meta = json.loads((out / "guidedistill.json").read_text())
    assert [round(t) for t in meta["generator"]["timesteps"]] == [999, 749, 499, 249]
    ours, nfe = module.generate(PROMPTS, seed=1)
    assert nfe == 4
    pipe = card_pipeline(out)
    adapted = lambda unet: {n for n, m in unet.named_modules() if hasattr(m, "lora_A")}  # noqa: E731
    assert adapted(pipe.unet) == adapted(module.generator.net.unet)
    torch.testing.assert_close(pipeline_generate(pipe, "sdxl", module, PROMPTS, 1, meta), ours, **TOL_TEXT)


def test_the_generator_optimizer_holds_only_the_lora_weights(tiny_teacher_ckpt):
    """The generator's optimizer (and so its DeepSpeed engine's model_parameters and ZeRO partitions of optimizer
    state) holds its LoRA weights only; the fake score's holds its own."""
    from train.runtime.config import instantiate

    module = instantiate({"class_path": ONESTEP, "init_args": {
        "teacher": str(tiny_teacher_ckpt), "fake_score": {"rank": 4}, "generator": {"lora_rank": 2}}})
    opts = module.configure_optimizers()
    opt_g = (opts[0] if isinstance(opts, list) else opts[0][0])
    opt_g = opt_g["optimizer"] if isinstance(opt_g, dict) else opt_g
    held = {id(p) for g in opt_g.param_groups for p in g["params"]}
    lora = {id(p) for n, p in module.generator.net.named_parameters() if "lora_" in n}
    assert held == lora and lora
    assert set(module.trainable_networks()) == {"generator.net", "fake_score.net"}
