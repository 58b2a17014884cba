"""Export: diffusers folders, peft LoRA weights and safetensors that the ecosystem alone loads and samples identically
(teacher, guidance-distilled and progressive students, one-step generators, erased models); atomic, no silent overwrite."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from train.runtime.checkpoint import load_method
from train.cli import main

DIFFUSERS_ONLY = r"""
import sys, numpy as np, torch
from diffusers import DDIMScheduler, UNet2DModel
path, out, w, steps = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
unet = UNet2DModel.from_pretrained(path + "/unet").eval()
sched = DDIMScheduler.from_pretrained(path + "/scheduler")
labels = torch.arange(10)
null = torch.full_like(labels, unet.config.num_class_embeds - 1)
x = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
sched.set_timesteps(steps)
with torch.no_grad():
    for t in sched.timesteps:
        c, u = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
        x = sched.step(u + w * (c - u), t, x).prev_sample
assert "guidance" not in sys.modules and "train" not in sys.modules
np.save(out, x.numpy())
"""


def test_export_round_trip_through_diffusers_alone(tiny_teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "export"
    main(["export", "--ckpt", str(tiny_teacher_ckpt), "--out", str(out)])
    assert {p.name for p in out.iterdir()} == {"unet", "scheduler", "guidedistill.json", "README.md"}
    meta = json.loads((out / "guidedistill.json").read_text())
    assert meta["method"] == "teacher" and meta["parameterization"] == "v" and meta["null_class_label"] == 10
    script = tmp_path / "sample.py"
    script.write_text(DIFFUSERS_ONLY)
    subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "theirs.npy"), "2.5", "8"], check=True,
                   cwd=tmp_path)
    theirs = torch.from_numpy(np.load(tmp_path / "theirs.npy"))
    ours, _ = load_method(tiny_teacher_ckpt).generate(torch.arange(10), scale=2.5, steps=8, seed=0)
    # diffusers steps to t - T // steps, which is the "trailing" grid when steps divides T (here 8 of 1000)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)


def test_export_never_replaces_a_folder_that_is_not_an_earlier_export(tiny_teacher_ckpt, tmp_path, capsys):
    """Replaces the old test that pinned `--force` deleting any folder: only an earlier export is ever replaced."""
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    for force in ([], ["--force"]):
        with pytest.raises(SystemExit):
            main(["export", "--ckpt", str(tiny_teacher_ckpt), "--out", str(out), *force])
        err = capsys.readouterr().err
        assert "is not an earlier export" in err and "pass a new --out" in err and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_safetensors_export_loads_into_the_network(tiny_teacher_ckpt, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "teacher.safetensors"
    main(["export", "--ckpt", str(tiny_teacher_ckpt), "--out", str(out), "--format", "safetensors"])
    module = load_method(tiny_teacher_ckpt)
    state = load_file(out)
    for k, v in module.sampling_denoiser().net.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)


# ------------------------------------------------------------------------------- every method, through its model card

# Runs the ```python block of an export's README.md as written, once per parameter line (replacing the card's
# `path, ... = ...` line; an empty line keeps the card's defaults, with PATH the export), and saves each run's samples `x`.
CARD_DRIVER = r"""
import re, sys, numpy as np
folder, out, lines = sys.argv[1], sys.argv[2], sys.argv[3:]
code = re.search(r"```python\n(.*?)```", open(folder + "/README.md").read(), re.S).group(1)
code = code.replace('"PATH"', repr(folder))
results = {}
for i, line in enumerate(lines):
    ns = {}
    exec(re.sub(r"^path, .*$", line, code, count=1, flags=re.M) if line else code, ns)
    results[str(i)] = ns["x"].numpy()
assert not {"guidance", "models", "losses", "train", "data"} & set(sys.modules), "the card must not need guidedistill"
np.savez(out, **results)
"""
LABELS = torch.arange(10)
TOL = dict(atol=1e-5, rtol=0)  # float rounding only (measured ~4e-7): same grid, weights and embeddings


def run_card(folder: Path, tmp_path: Path, *lines: str) -> list[torch.Tensor]:
    """Samples of the card's code in a fresh interpreter that imports only torch / diffusers / peft."""
    script, out = tmp_path / "card_driver.py", tmp_path / "card.npz"
    script.write_text(CARD_DRIVER)
    run = subprocess.run([sys.executable, str(script), str(folder), str(out), *lines], cwd=tmp_path, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    data = np.load(out)
    return [torch.from_numpy(data[str(i)]) for i in range(len(lines))]


def fit_checkpoint(path: Path, class_path: str, init_args: dict, data=None, perturb=None) -> Path:
    """A checkpoint after one optimizer step of a method built from its config (so load_method rebuilds it).
    `perturb(module)` then moves zero-initialised weights (w projection, LoRA B) well away from zero, so that an
    export that dropped them could not pass."""
    import lightning as L

    from data.digits import DigitsDataModule
    from train.runtime.config import instantiate

    module = instantiate({"class_path": class_path, "init_args": init_args})
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(path.parent))
    torch.manual_seed(0)
    trainer.fit(module, data if data is not None else DigitsDataModule(batch_size=8))
    if perturb is not None:
        with torch.no_grad():
            perturb(module)
    trainer.save_checkpoint(path)
    return path


def randomise(module, *name_parts: str) -> None:
    g = torch.Generator().manual_seed(1)
    for name, p in module.named_parameters():
        if any(part in name for part in name_parts):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def student_ckpt(tiny_teacher_ckpt, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export_gd")
    return fit_checkpoint(root / "gd.ckpt", "train.methods.guidance_distillation.GuidanceDistillation",
                          {"teacher": str(tiny_teacher_ckpt), "ema_decay": 0.0, "lr": 1e-3},
                          perturb=lambda m: randomise(m, "w_embedding.linear_2"))


def test_guidance_distilled_student_samples_through_diffusers_at_several_w(student_ckpt, tmp_path):
    out = tmp_path / "student"
    main(["export", "--ckpt", str(student_ckpt), "--out", str(out)])
    assert {p.name for p in out.iterdir()} == {"unet", "scheduler", "w_embedding", "guidedistill.json", "README.md"}
    meta = json.loads((out / "guidedistill.json").read_text())
    assert meta["sampling"] == {"recipe": "w_input", "steps": 50, "distilled": False, "evaluations_per_step": 1}
    assert meta["w_embedding"]["in_unet"] is False and "time_cond_proj_dim" in (out / "README.md").read_text()
    module = load_method(student_ckpt)
    scales = (1.0, 3.0, 5.5)
    theirs = run_card(out, tmp_path, *(f"path, w, steps, seed = {str(out)!r}, {w}, 4, 0" for w in scales))
    for w, x in zip(scales, theirs):
        ours, nfe = module.generate(LABELS, scale=w, steps=4, seed=0)
        assert nfe == 4  # one network evaluation per step
        torch.testing.assert_close(ours, x, **TOL)
    assert (theirs[0] - theirs[2]).abs().max() > 1e-2  # w changes the samples: the w-embedding was exported


def test_progressive_student_exports_and_samples_with_its_distilled_step_count(student_ckpt, tmp_path):
    ckpt = fit_checkpoint(tmp_path / "pd.ckpt", "train.methods.progressive.ProgressiveDistillation",
                          {"student": str(student_ckpt), "start_steps": 4, "end_steps": 1, "steps_per_round": 1,
                           "ema_decay": 0.0, "lr": 1e-3})
    module = load_method(ckpt)
    assert module.recipe().default_steps == 2
    out = tmp_path / "progressive"
    main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    meta = json.loads((out / "guidedistill.json").read_text())
    assert meta["sampling"]["steps"] == 2 and meta["sampling"]["distilled"]
    assert "for 2 steps (the step count it was distilled for)" in (out / "README.md").read_text()
    (theirs,) = run_card(out, tmp_path, "")  # the card's own defaults: w = 2, the distilled 2 steps
    ours, nfe = module.generate(LABELS, scale=2.0, seed=0)
    assert nfe == 2
    torch.testing.assert_close(ours, theirs, **TOL)
    main(["sample", "--ckpt", str(ckpt), "--num-per-class", "1", "--out", str(tmp_path / "samples")])
    assert float(np.load(tmp_path / "samples" / "samples.npz")["nfe_per_sample"]) == 2  # not 50


@pytest.mark.parametrize("steps", [1, 2])
def test_one_step_generator_samples_through_diffusers_exactly(tiny_teacher_ckpt, tmp_path, steps):
    ckpt = fit_checkpoint(tmp_path / "onestep.ckpt", "train.methods.onestep.OneStepDistillation",
                          {"teacher": str(tiny_teacher_ckpt), "fake_score": {"rank": 4}, "ema_decay": 0.9,
                           "generator": {"steps": steps, "lr": 1e-3}})
    out = tmp_path / "generator"
    main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    meta = json.loads((out / "guidedistill.json").read_text())
    assert meta["sampling"]["recipe"] == "generator" and meta["generator"]["steps"] == steps
    module = load_method(ckpt)
    (theirs,) = run_card(out, tmp_path, f"path, seed = {str(out)!r}, 3")
    ours, nfe = module.generate(LABELS, seed=3)
    assert nfe == steps
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)  # same times, alpha, sigma (measured: bit-identical)


@pytest.fixture(scope="module")
def lora_erased_ckpt(tiny_teacher_ckpt, tmp_path_factory) -> Path:
    return erased_checkpoint(tiny_teacher_ckpt, tmp_path_factory.mktemp("export_erase_lora"), "lora")


def erased_checkpoint(teacher: Path, root: Path, params: str) -> Path:
    from data.steps import ErasureSteps

    args = {"model": str(teacher), "concepts": [3], "params": params, "lora_rank": 2, "lr": 0.05, "batch_size": 4,
            "trajectory_steps": 3, "bank_size": 4, "val_samples": 0}
    return fit_checkpoint(root / f"erase_{params}.ckpt", "train.methods.erasure.ConceptErasure", args,
                          data=ErasureSteps(steps_per_epoch=2), perturb=lambda m: randomise(m, "lora_B"))


@pytest.mark.parametrize("params", ["esd-u", "lora"])
def test_erased_model_exports_as_a_plain_diffusers_folder(tiny_teacher_ckpt, lora_erased_ckpt, tmp_path, params):
    ckpt = lora_erased_ckpt if params == "lora" else erased_checkpoint(tiny_teacher_ckpt, tmp_path, params)
    out = tmp_path / "erased"
    main(["export", "--ckpt", str(ckpt), "--out", str(out)])  # LoRA adapters are merged: no merge_lora needed first
    from diffusers import UNet2DModel

    assert not [k for k in UNet2DModel.from_pretrained(out / "unet").state_dict() if "lora" in k]
    (theirs,) = run_card(out, tmp_path, f"path, w, steps, seed = {str(out)!r}, 3.0, 5, 0")
    ours, _ = load_method(ckpt).generate(LABELS, scale=3.0, steps=5, seed=0)
    teacher, _ = load_method(tiny_teacher_ckpt).generate(LABELS, scale=3.0, steps=5, seed=0)
    torch.testing.assert_close(ours, theirs, **TOL)
    assert (ours - teacher).abs().max() > 1e-2  # the export is the erased model, not its teacher


@pytest.fixture(scope="module")
def teacher_export(tiny_teacher_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export_base") / "teacher"
    main(["export", "--ckpt", str(tiny_teacher_ckpt), "--out", str(out)])
    return out


def test_erasure_lora_loads_onto_the_exported_teacher_with_peft(lora_erased_ckpt, teacher_export, tmp_path):
    out = tmp_path / "lora"
    main(["export", "--ckpt", str(lora_erased_ckpt), "--out", str(out), "--format", "lora"])
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                              "guidedistill.json", "README.md"}
    line = f"path, base, w, steps, seed = {str(out)!r}, {str(teacher_export)!r}, 3.0, 5, 0"
    (theirs,) = run_card(out, tmp_path, line)  # PeftModel.from_pretrained on UNet2DModel.from_pretrained(base)
    module = load_method(lora_erased_ckpt)
    ours, _ = module.generate(LABELS, scale=3.0, steps=5, seed=0)
    torch.testing.assert_close(ours, theirs, **TOL)
    # the low-level peft route: inject the saved config, set the saved weights; equals our adapted network
    from diffusers import UNet2DModel
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    unet = UNet2DModel.from_pretrained(teacher_export / "unet").eval()
    inject_adapter_in_model(LoraConfig.from_pretrained(out), unet)
    assert not set_peft_model_state_dict(unet, load_peft_weights(str(out))).unexpected_keys
    x, t, c = torch.randn(4, 1, 8, 8), torch.tensor([10.0, 300.0, 600.0, 999.0]), torch.tensor([3, 4, 10, 3])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, class_labels=c).sample,
                                   module.sampling_denoiser().net.unet(x, t, class_labels=c).sample, rtol=0, atol=1e-5)


def test_lora_guidance_distilled_student_exports_adapter_and_w_embedding(tiny_teacher_ckpt, teacher_export, tmp_path):
    ckpt = fit_checkpoint(tmp_path / "gd_lora.ckpt", "train.methods.guidance_distillation.GuidanceDistillation",
                          {"teacher": str(tiny_teacher_ckpt), "ema_decay": 0.0, "lr": 1e-3, "lora_rank": 2},
                          perturb=lambda m: randomise(m, "w_embedding.linear_2", "lora_B"))
    module = load_method(ckpt)
    lora, merged = tmp_path / "lora", tmp_path / "merged"
    main(["export", "--ckpt", str(ckpt), "--out", str(lora), "--format", "lora"])
    main(["export", "--ckpt", str(ckpt), "--out", str(merged)])
    assert (lora / "w_embedding" / "config.json").is_file()
    theirs = run_card(lora, tmp_path, f"path, base, w, steps, seed = {str(lora)!r}, {str(teacher_export)!r}, 4.0, 4, 0")
    theirs += run_card(merged, tmp_path, f"path, w, steps, seed = {str(merged)!r}, 4.0, 4, 0")
    ours, _ = module.generate(LABELS, scale=4.0, steps=4, seed=0)
    for x in theirs:
        torch.testing.assert_close(ours, x, **TOL)


def test_lora_export_needs_adapters_on_the_frozen_teacher(tiny_teacher_ckpt, student_ckpt, tmp_path, capsys):
    for ckpt in (tiny_teacher_ckpt, student_ckpt):
        with pytest.raises(SystemExit):
            main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "lora"), "--format", "lora"])
        assert "no LoRA adapters" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary folder left
