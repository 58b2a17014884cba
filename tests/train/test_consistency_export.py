"""Export of latent consistency models (train.methods.consistency): diffusers' own LCMScheduler in `scheduler/` (betas,
prediction type, original_inference_steps = the solver grid, timestep_scaling), and the model card's code (class models)
or the original pipeline with the LoRA and that scheduler (SD 1.5, SDXL) reproduce `module.generate` at 1, 2 and 4
steps, re-noise draws included; schedules LCMScheduler cannot reproduce are refused."""
from __future__ import annotations

import json

import diffusers
import pytest
import torch
import yaml
from diffusers import LCMScheduler

from guidance.schedules import EDM, RectifiedFlow, VPLinear
from models.diffusers_export import LORA_WEIGHTS, export_scheduler
from tests.train.test_export import LABELS, TOL, run_card
from tests.train.test_guidance_distillation import write_config
from tests.train.test_text_lora_export import card_pipeline
from tests.train.text_fits import PIPELINES, PROMPTS, TRAINER, card_call, pipeline_latents, randomised
from train.cli import main
from train.runtime.checkpoint import load_method

LCM = "train.methods.consistency.ConsistencyDistillation"
STEPS = (1, 2, 4)
TOL_TEXT = dict(rtol=1e-4, atol=1e-4)  # as tests/train/test_text_lora_export.py


def fit_lcm(teacher, root, **overrides):
    """last.ckpt of ConsistencyDistillation fitted 2 steps through `python -m train fit` on the digits."""
    args = {"teacher": str(teacher), "w_min": 1.0, "w_max": 4.0, "solver_steps": 10, "lr": 1e-3, "warmup_steps": 1,
            "val_steps": 2, "val_samples": 0, **overrides}
    main(["fit", "--config", str(write_config(root / "lcm.yaml", LCM, args, root / "run", max_steps=2, ckpt_every=2))])
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def lcm_ckpt(tiny_teacher_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("lcm_export")
    return randomised(fit_lcm(tiny_teacher_ckpt, root), root / "lcm.ckpt", "w_embedding.linear_2")


def test_scheduler_is_lcm_with_the_distilled_grid_and_unsupported_schedules_are_refused():
    sampling = {"recipe": "consistency", "solver_steps": 20, "timestep_scaling": 10.0}
    sched = export_scheduler(VPLinear(1000, 0.00085, 0.012, scaled=True), "eps", sampling)
    assert isinstance(sched, LCMScheduler)
    assert (sched.config.original_inference_steps, sched.config.timestep_scaling) == (20, 10.0)
    assert (sched.config.beta_schedule, sched.config.prediction_type) == ("scaled_linear", "epsilon")
    with pytest.raises(ValueError, match=r"LCMScheduler is a VP scheduler\); export --format safetensors"):
        export_scheduler(EDM(), "x0", sampling)
    with pytest.raises(ValueError, match=r"LCMScheduler is a VP scheduler\); export --format safetensors"):
        export_scheduler(RectifiedFlow(), "flow", sampling)
    with pytest.raises(ValueError, match="30 does not divide 1000"):  # LCMScheduler's grid is then not ours
        export_scheduler(VPLinear(1000), "eps", {**sampling, "solver_steps": 30})


def test_class_lcm_exports_lcm_scheduler_and_its_card_samples_like_generate(lcm_ckpt, tmp_path):
    out = tmp_path / "lcm"
    main(["export", "--ckpt", str(lcm_ckpt), "--out", str(out), "--format", "diffusers"])
    assert {p.name for p in out.iterdir()} == {"unet", "scheduler", "w_embedding", "guidedistill.json", "README.md"}
    meta = json.loads((out / "guidedistill.json").read_text())
    assert meta["sampling"]["recipe"] == "consistency" and meta["sampling"]["solver_steps"] == 10
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "LCMScheduler" and config["original_inference_steps"] == 10
    assert config["beta_schedule"] == "squaredcos_cap_v2" and config["prediction_type"] == "v_prediction"
    card = (out / "README.md").read_text()
    assert "LCMScheduler.from_pretrained" in card and "generator=gen" in card
    module = load_method(lcm_ckpt)
    lines = [f"path, w, steps, seed = {str(out)!r}, {w}, {s}, 3" for s in STEPS for w in (1.5, 3.5)]
    theirs = iter(run_card(out, tmp_path, *lines))
    for s in STEPS:
        for w in (1.5, 3.5):
            ours, nfe = module.generate(LABELS, scale=w, steps=s, seed=3)
            assert nfe == s
            torch.testing.assert_close(ours, next(theirs), **TOL)
    a, b = (module.generate(LABELS, scale=w, steps=2, seed=3)[0] for w in (1.5, 3.5))
    assert (a - b).abs().max() > 1e-2  # w matters: the w-embedding travelled with the export
    (default,) = run_card(out, tmp_path, "")  # the card as written: w = 2, the run's val_steps (2), seed 0
    torch.testing.assert_close(module.generate(LABELS, scale=2.0, seed=0)[0], default, **TOL)


@pytest.fixture(scope="module")
def teacher_export(tiny_teacher_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("lcm_base") / "teacher"
    main(["export", "--ckpt", str(tiny_teacher_ckpt), "--out", str(out)])
    return out


def test_class_lcm_lora_loads_onto_the_exported_teacher_with_peft(tiny_teacher_ckpt, teacher_export, tmp_path):
    """LCM-LoRA on the digits (w baked in, the student as its own target): peft loads the adapters onto the exported
    teacher's UNet, the export's LCMScheduler samples it as generate does; --scale is refused by the recipe."""
    ckpt = randomised(fit_lcm(tiny_teacher_ckpt, tmp_path, w_input=False, lora_rank=2, target_decay=0.0),
                      tmp_path / "lcm_lora.ckpt", "lora_B")
    out = tmp_path / "lora"
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--format", "lora"])
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "scheduler",
                                              "guidedistill.json", "README.md"}
    module = load_method(ckpt)
    lines = [f"path, base, steps, seed = {str(out)!r}, {str(teacher_export)!r}, {s}, 0" for s in STEPS]
    for s, x in zip(STEPS, run_card(out, tmp_path, *lines)):
        ours, nfe = module.generate(LABELS, steps=s, seed=0)
        assert nfe == s
        torch.testing.assert_close(ours, x, **TOL)
    assert "path, base, steps, seed = " in (out / "README.md").read_text()  # no guidance scale: it is baked in
    with pytest.raises(ValueError, match="--scale cannot be honoured"):
        module.generate(LABELS, scale=3.0, steps=2)


# ------------------------------------------------------------------------------------------------ text-to-image

def fit_text_lcm(ws, kind: str):
    """last.ckpt of LCM-LoRA (w baked in, rank 2, the student as target) fitted 2 steps through the CLI on the tiny
    `kind` folder with captioned images (tests.train.text_fits: method "lcm")."""
    return ws.fitted("lcm", kind)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_text_lcm_lora_samples_on_the_original_pipeline_with_lcm_scheduler(t2i_workspace, kind, tmp_path):
    ckpt = randomised(fit_text_lcm(t2i_workspace, kind), tmp_path / "lcm.ckpt", "lora_B")
    base = t2i_workspace.model(kind)
    out = tmp_path / "lora"
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--format", "lora"])
    assert (out / LORA_WEIGHTS).is_file() and not (out / "w_embedding").exists()
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["original_inference_steps"] == 50

    pipe = getattr(diffusers, PIPELINES[kind]).from_pretrained(base, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(out)
    pipe.scheduler = LCMScheduler.from_pretrained(out / "scheduler")
    card = card_pipeline(out, base)
    assert isinstance(card.scheduler, LCMScheduler)
    call = card_call(out)
    assert call["guidance_scale"] == 1.0 and call["num_inference_steps"] == 4  # one evaluation per step
    module = load_method(ckpt)
    for s in STEPS:
        ours, nfe = module.generate(PROMPTS, steps=s, seed=5)
        assert nfe == s
        for p in (pipe, card):
            # generate draws the initial noise, then LCMScheduler's re-noise, from one CPU generator seeded 5: the
            # pipeline gets that noise as latents= and a generator in the state after it
            gen = torch.Generator().manual_seed(5)
            noise = torch.randn(ours.shape, generator=gen)
            args = {"prompt": PROMPTS, "num_inference_steps": s, "guidance_scale": 1.0, "generator": gen}
            torch.testing.assert_close(pipeline_latents(p, kind, noise, args), ours, **TOL_TEXT)
    plain = getattr(diffusers, PIPELINES[kind]).from_pretrained(base, local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    plain.scheduler = LCMScheduler.from_pretrained(out / "scheduler")
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(ours.shape, generator=gen)
    without = pipeline_latents(plain, kind, noise, {"prompt": PROMPTS, "num_inference_steps": 4, "guidance_scale": 1.0,
                                                    "generator": gen})
    assert (without - ours).abs().max() > 1e-2  # the LoRA changes what the base pipeline generates

    full = tmp_path / "full"  # --format diffusers: a pipeline folder whose model_index.json names LCMScheduler
    main(["export", "--ckpt", str(ckpt), "--out", str(full), "--format", "diffusers"])
    code = (full / "README.md").read_text().split("```python\n", 1)[1].split("\n```", 1)[0]
    namespace: dict = {}
    exec(code.rsplit("image =", 1)[0].replace("EXPORT", str(full)), namespace)
    merged = namespace["pipe"]
    merged.set_progress_bar_config(disable=True)
    assert isinstance(merged.scheduler, LCMScheduler) and merged.scheduler.config.original_inference_steps == 50
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(ours.shape, generator=gen)
    args = {"prompt": PROMPTS, "num_inference_steps": 4, "guidance_scale": 1.0, "generator": gen}
    torch.testing.assert_close(pipeline_latents(merged, kind, noise, args), ours, **TOL_TEXT)



@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_shipped_lcm_lora_config_exports_onto_the_original_pipeline(t2i_workspace, kind, tmp_path):
    """configs/{sd15,sdxl}/lcm.yaml (LCM-LoRA: rank 64 on the LCM-LoRA script's targets, w in [3, 15] baked in) fitted
    one step on the tiny folder (tests/train/test_text_configs.py's shrinking), exported as LoRA: the original
    pipeline with load_lora_weights and the export's LCMScheduler, as the card builds it, samples like generate."""
    from tests.train.test_text_configs import ROOT, shrunk
    from train.runtime.config import read_yaml

    shipped = read_yaml(ROOT / "configs" / kind / "lcm.yaml")
    args = shipped["model"]["init_args"]
    assert args["w_input"] is False and args["lora_rank"] == 64 and args["lr"] == 1e-4
    assert (args["w_min"], args["w_max"], args["solver_steps"], args["target_decay"]) == (3.0, 15.0, 50, 0.0)
    assert (args["loss"], args["huber_c"]) == ("huber", 0.001)
    base = t2i_workspace.model(kind)
    cfg = shrunk(shipped, base, t2i_workspace, tmp_path / "run")
    (tmp_path / "lcm.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    main(["fit", "--config", str(tmp_path / "lcm.yaml")])
    ckpt = randomised(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "lcm.ckpt", "lora_B", std=0.02)
    out = tmp_path / "lora"
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--format", "lora"])
    module = load_method(ckpt)
    assert module.hparams["lora_rank"] == 64
    ours, _ = module.generate(PROMPTS, steps=2, seed=1)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(ours.shape, generator=gen)
    args = {"prompt": PROMPTS, "num_inference_steps": 2, "guidance_scale": 1.0, "generator": gen}
    pipe = card_pipeline(out, base)
    adapted = lambda unet: {n for n, m in unet.named_modules() if hasattr(m, "lora_A")}
    assert adapted(pipe.unet) == adapted(module.student.net.unet)  # every target layer, time_emb_proj to downsamplers
    assert {"time_emb_proj", "downsamplers"} <= {part for n in adapted(pipe.unet) for part in n.split(".")}
    torch.testing.assert_close(pipeline_latents(pipe, kind, noise, args), ours, **TOL_TEXT)


def test_a_flow_consistency_model_is_refused_with_one_line(t2i_workspace, tmp_path, capsys):
    """LCM on the tiny SD3 folder (rectified flow): LCMScheduler cannot sample it, so both diffusers formats refuse
    with one line naming --format safetensors, and leave nothing behind; safetensors still exports."""
    ckpt = fit_text_lcm(t2i_workspace, "sd3")
    capsys.readouterr()  # the fit's output
    for fmt in ("diffusers", "lora"):
        with pytest.raises(SystemExit):
            main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / fmt), "--format", fmt])
        err = capsys.readouterr().err
        assert "LCMScheduler is a VP scheduler" in err and "--format safetensors" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "lcm.safetensors"), "--format", "safetensors"])
