"""Checkpoints leave out the frozen networks a method reads from its config's paths (train.runtime.frozen): for
erasure, guidance distillation, one-step DMD with a LoRA fake score (its shared base out, its adapters in) and
progressive distillation (round 0's teacher), each fitted once through the CLI on the tiny teacher. The checkpoint
holds no frozen weights and is smaller; load_method rebuilds the in-memory module bit for bit; a resumed fit continues
exactly; export writes the same files; a changed or missing source is one line; a checkpoint that holds the frozen
weights (written before, or with --self_contained_checkpoints true) loads its own copies."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from train.cli import main
from train.runtime.checkpoint import CHECKPOINT_KEY, CheckpointError, load_method
from train.runtime.frozen import FROZEN_KEY, SAMPLES, fingerprint

torch.set_num_threads(1)
TRAINER = {"max_steps": 4, "accelerator": "cpu", "limit_val_batches": 0, "num_sanity_val_steps": 0,
           "enable_progress_bar": False, "enable_model_summary": False, "logger": False, "callbacks": [
               {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"save_last": True, "every_n_train_steps": 2, "save_top_k": -1, "filename": "{step}"}}]}
DIGITS = {"class_path": "data.digits.DigitsDataModule", "init_args": {"batch_size": 8}}
LABELS = torch.tensor([0, 3, 7, -1])


@dataclass
class Run:
    """A CLI fit: its in-memory module, config, checkpoint folder, the config key naming the frozen network's source
    and that source, and the state-dict prefixes of the frozen networks left out of `slim` (a checkpoint of the run)."""

    module: object
    config: Path
    ckpts: Path
    source_key: str
    source: Path
    frozen: tuple[str, ...]
    slim: str = "last.ckpt"


def fit(root: Path, class_path: str, init_args: dict, data: dict, *flags: str):
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"seed_everything": 0, "model": {"class_path": class_path, "init_args": init_args},
                                      "data": data, "trainer": {**TRAINER, "default_root_dir": str(root / "run")}}))
    cli = main(["fit", "--config", str(config), *flags])
    return cli.model, config, root / "run" / "checkpoints"


@pytest.fixture(scope="module")
def teacher(tiny_teacher_ckpt, tmp_path_factory) -> Path:
    """This file's own copy of the tiny teacher: tests change it for a while and put it back."""
    path = tmp_path_factory.mktemp("sources") / "teacher.ckpt"
    shutil.copy(tiny_teacher_ckpt, path)
    return path


ERASURE = {"concepts": [3], "lr": 0.05, "batch_size": 4, "trajectory_steps": 3, "bank_size": 4, "val_samples": 0}


@pytest.fixture(scope="module")
def erasure(teacher, tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("erasure")
    out = fit(root, "train.methods.erasure.ConceptErasure", {"model": str(teacher), **ERASURE},
              {"class_path": "data.steps.ErasureSteps", "init_args": {"steps_per_epoch": 4}})
    return Run(*out, "model", teacher, ("frozen.net",))


@pytest.fixture(scope="module")
def guidance_distillation(teacher, tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("gd")
    out = fit(root, "train.methods.guidance_distillation.GuidanceDistillation",
              {"teacher": str(teacher), "w_min": 1.0, "w_max": 5.0, "lr": 1e-3, "warmup_steps": 1, "ema_decay": 0.5,
               "val_samples": 0}, DIGITS)
    return Run(*out, "teacher", teacher, ("teacher.net",))


@pytest.fixture(scope="module")
def dmd_lora(teacher, tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("dmd")
    out = fit(root, "train.methods.onestep.OneStepDistillation",
              {"teacher": str(teacher), "fake_score": {"mode": "lora", "rank": 4, "updates": 1}, "ema_decay": 0.9,
               "generator": {"lr": 1e-3}, "val_samples": 0}, DIGITS)
    return Run(*out, "teacher", teacher, ("fake_score.net",))


@pytest.fixture(scope="module")
def progressive(guidance_distillation, tmp_path_factory) -> Run:
    """4 -> 2 -> 1 steps, 2 steps per round: step=2.ckpt is round 0 (its teacher the stage-1 student, left out),
    last.ckpt round 1 (its teacher the end of round 0: trained state, kept)."""
    root = tmp_path_factory.mktemp("progressive")
    stage1 = root / "stage1.ckpt"
    shutil.copy(guidance_distillation.ckpts / "last.ckpt", stage1)
    out = fit(root, "train.methods.progressive.ProgressiveDistillation",
              {"student": str(stage1), "start_steps": 4, "end_steps": 1, "steps_per_round": 2, "lr": 1e-3,
               "warmup_steps": 1, "ema_decay": 0.5, "val_samples": 0}, DIGITS)
    return Run(*out, "student", stage1, ("round_teacher.net",), slim="step=2.ckpt")


METHODS = ["erasure", "guidance_distillation", "dmd_lora", "progressive"]


@pytest.fixture(params=METHODS)
def run(request) -> Run:
    return request.getfixturevalue(request.param)


def left_out(run: Run, key: str) -> bool:
    """Whether `key` is a frozen entry the run's checkpoint leaves out (a LoRA fake score keeps its adapters)."""
    return key.startswith(tuple(p + "." for p in run.frozen)) and "lora_" not in key


def states_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def with_config(ckpt: Path, out: Path, state_dict: dict | None = None, **config) -> Path:
    """A copy of checkpoint `ckpt` at `out` with config values replaced (a source moved) and, given `state_dict`,
    those weights and no record of left-out networks: a checkpoint as written before they were left out."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state[CHECKPOINT_KEY]["config"].update(config)
    state["hyper_parameters"].update(config)
    if state_dict is not None:
        state["state_dict"] = state_dict
        state[CHECKPOINT_KEY].pop(FROZEN_KEY, None)
    torch.save(state, out)
    return out


def changed(source: Path, out: Path) -> Path:
    """A copy of checkpoint `source` at `out` with every floating weight moved by 1e-3: another model, same shapes."""
    state = torch.load(source, map_location="cpu", weights_only=True)
    state["state_dict"] = {k: v + 1e-3 if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    torch.save(state, out)
    return out


def test_the_checkpoint_holds_no_frozen_weights_and_is_smaller(run, tmp_path):
    ckpt = run.ckpts / run.slim
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    records = state[CHECKPOINT_KEY][FROZEN_KEY]
    assert [r["path"] for r in records] == list(run.frozen) and all(r["source"] == str(run.source) for r in records)
    full = load_method(ckpt).state_dict()
    assert set(full) - set(state["state_dict"]) == {k for k in full if left_out(run, k)}
    assert sum(r["tensors"] for r in records) == len(set(full) - set(state["state_dict"])) > 0
    if run.source_key == "teacher" and run.frozen == ("fake_score.net",):  # the LoRA fake score's adapters stay
        assert any(k.startswith("fake_score.net.") and "lora_" in k for k in state["state_dict"])
    old = with_config(ckpt, tmp_path / "old.ckpt", full)
    assert old.stat().st_size > ckpt.stat().st_size
    frozen_bytes = sum(v.numel() * v.element_size() for k, v in full.items() if left_out(run, k))
    assert weight_bytes(old) - weight_bytes(ckpt) == frozen_bytes  # (file sizes also count per-entry zip names)


def weight_bytes(ckpt: Path) -> int:
    return sum(v.numel() * v.element_size() for v in torch.load(ckpt, weights_only=True)["state_dict"].values())


def test_load_method_rebuilds_the_trained_module_bit_for_bit(run):
    trained, loaded = run.module.eval(), load_method(run.ckpts / "last.ckpt")
    assert states_equal(loaded.state_dict(), trained.state_dict())
    a, _ = loaded.generate(LABELS, seed=1)  # each method's own sampling defaults
    b, _ = trained.generate(LABELS, seed=1)
    assert torch.equal(a, b)


def test_progressive_leaves_out_round_0s_teacher_and_keeps_later_ones(progressive):
    stage1 = load_method(progressive.source).sampling_denoiser().net.state_dict()
    assert states_equal(load_method(progressive.ckpts / "step=2.ckpt").round_teacher.net.state_dict(), stage1)
    last = torch.load(progressive.ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert FROZEN_KEY not in last[CHECKPOINT_KEY] and any(k.startswith("round_teacher.net.") for k in last["state_dict"])


def test_a_resumed_fit_continues_exactly(run, tmp_path):
    cli = main(["fit", "--config", str(run.config), "--ckpt_path", str(run.ckpts / "step=2.ckpt"),
                "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.global_step == 4
    assert states_equal(cli.model.state_dict(), run.module.state_dict())  # as the uninterrupted run
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (FROZEN_KEY in resumed[CHECKPOINT_KEY]) == (run.slim == "last.ckpt")  # progressive's round 1: kept


def test_export_writes_what_it_wrote_from_a_checkpoint_holding_the_frozen_weights(run, tmp_path):
    ckpt = run.ckpts / run.slim
    old = with_config(ckpt, tmp_path / "old.ckpt", load_method(ckpt).state_dict())
    for name, path in (("slim", ckpt), ("old", old)):
        main(["export", "--ckpt", str(path), "--out", str(tmp_path / name)])
    files = sorted(p.relative_to(tmp_path / "slim") for p in (tmp_path / "slim").rglob("*.safetensors"))
    assert files and all((tmp_path / "slim" / f).read_bytes() == (tmp_path / "old" / f).read_bytes() for f in files)


def test_a_changed_or_missing_source_is_one_line(run, tmp_path):
    ckpt = run.ckpts / run.slim
    other = with_config(ckpt, tmp_path / "other.ckpt", **{run.source_key: str(changed(run.source, tmp_path / "x.ckpt"))})
    gone = with_config(ckpt, tmp_path / "gone.ckpt", **{run.source_key: str(tmp_path / "gone" / "model.ckpt")})
    for path, why in ((other, "no longer holds the model it was trained with"), (gone, "which does not exist")):
        with pytest.raises(CheckpointError) as e:
            load_method(path)
        message = str(e.value)
        assert "\n" not in message and why in message and repr(run.frozen[0]) in message
        assert f"restore the original model at '{tmp_path}/" in message


def test_resuming_from_a_changed_source_is_one_line(erasure, tmp_path, capsys):
    original = erasure.source.read_bytes()
    changed(erasure.source, erasure.source)
    try:
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(erasure.config), "--ckpt_path", str(erasure.ckpts / "step=2.ckpt"),
                  "--trainer.default_root_dir", str(tmp_path)])
    finally:
        erasure.source.write_bytes(original)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the frozen network 'frozen.net' was left out") and str(erasure.source) in err


def test_a_checkpoint_holding_the_frozen_weights_loads_them(run, tmp_path):
    """As written before frozen networks were left out: the stored weights are used (no fingerprint), also when the
    source has changed or is gone."""
    ckpt = run.ckpts / run.slim
    full = load_method(ckpt).state_dict()
    for source in (changed(run.source, tmp_path / "x.ckpt"), tmp_path / "gone.ckpt"):
        old = with_config(ckpt, tmp_path / "old.ckpt", full, **{run.source_key: str(source)})
        assert states_equal(load_method(old).state_dict(), full)


def test_a_run_resumed_from_a_checkpoint_holding_the_frozen_weights_keeps_writing_them(erasure, tmp_path):
    """Loaded from a checkpoint, the frozen network no longer is what its source gave: saved whole from then on."""
    ckpt = erasure.ckpts / "step=2.ckpt"
    old = with_config(ckpt, tmp_path / "old.ckpt", load_method(ckpt).state_dict())
    cli = main(["fit", "--config", str(erasure.config), "--ckpt_path", str(old),
                "--trainer.default_root_dir", str(tmp_path / "run")])
    assert states_equal(cli.model.state_dict(), erasure.module.state_dict())
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert FROZEN_KEY not in state[CHECKPOINT_KEY] and states_equal(state["state_dict"], cli.model.state_dict())


def test_self_contained_checkpoints_keep_the_frozen_weights(erasure, tmp_path):
    module, _, ckpts = fit(tmp_path, "train.methods.erasure.ConceptErasure", {"model": str(erasure.source), **ERASURE},
                           {"class_path": "data.steps.ErasureSteps", "init_args": {"steps_per_epoch": 4}},
                           "--self_contained_checkpoints", "true", "--trainer.max_steps", "2")
    state = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert FROZEN_KEY not in state[CHECKPOINT_KEY] and states_equal(state["state_dict"], module.state_dict())
    moved = with_config(ckpts / "last.ckpt", tmp_path / "moved.ckpt", model=str(tmp_path / "gone.ckpt"))
    assert states_equal(load_method(moved).state_dict(), module.state_dict())


@pytest.mark.parametrize("method", ["erase", "uce"])
def test_text_models_leave_out_the_pipeline_network(t2i_workspace, method):
    ckpt = t2i_workspace.fitted(method, "sd15")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert [r["path"] for r in state[CHECKPOINT_KEY][FROZEN_KEY]] == ["frozen.net"]
    full = load_method(ckpt).state_dict()
    assert set(full) - set(state["state_dict"]) == {k for k in full if k.startswith("frozen.")} != set()


def test_the_fingerprint_covers_names_shapes_dtypes_and_sampled_values():
    t = torch.arange(3 * SAMPLES, dtype=torch.float32).reshape(3, SAMPLES)
    base = fingerprint({"w": t})
    assert fingerprint({"w": t.clone()}) == base
    assert fingerprint({"v": t}) != base and fingerprint({"w": t.reshape(SAMPLES, 3)}) != base
    assert fingerprint({"w": t.double()}) != base
    first, last, between = t.clone(), t.clone(), t.clone()
    first[0, 0], last[-1, -1], between[0, 1] = -1, -1, -1  # entries 0 and n - 1 are sampled; entry 1 is not
    assert fingerprint({"w": first}) != base and fingerprint({"w": last}) != base
    assert fingerprint({"w": between}) == base  # what the fingerprint does not cover (train.runtime.frozen)
