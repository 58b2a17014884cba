"""The multi-engine DeepSpeed strategy (train.runtime.strategy) on CPU with two gloo processes.

- a deterministic two-network method under ZeRO-2 and ZeRO-3 on 2 processes equals a single-process run
  on the same global batch (losses to 1e-6, weight updates to 1e-5 of their size);
- every method (teacher, guidance distillation, one-step with three engines, erasure) under ZeRO stages 2
  and 3 on 2 processes equals one process on the same global batch (losses to 1e-5, weight updates to 1e-4 of
  their size), and the ZeRO checkpoint converted to one state dict equals the trained weights exactly;
The equality runs train with SGD + momentum (ds_run.use_sgd), whose update is linear in the gradient: Adam's
is not (a near-zero gradient still takes a learning-rate-sized step, with the sign of its rounding error), so
comparing Adam-trained weights would compare the CPU's float reduction order.
- progressive distillation (its student reloaded at every round boundary) under ZeRO-2 and ZeRO-3 equals one process
  across round boundaries;
- a run resumed from a ZeRO checkpoint repeats the uninterrupted run's losses exactly;
- the CLI entry point under torchrun (the multi-node launch path), and export from a ZeRO checkpoint.
Each run is a subprocess (tests/train/ds_run.py or `python -m train`), so no process group leaks into pytest.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY_TEACHER
from train.runtime.strategy import EnginePrecision, MultiEngineDeepSpeed, trainable_state_dict

RUN = ROOT / "tests" / "train" / "ds_run.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}


def run(args: list[str], root: Path, timeout: int = 600) -> None:
    proc = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    (root.parent / f"{root.name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def fit(method: str, root: Path, stage: int = 0, devices: int = 1, steps: int = 3, batch: int = 8,
        teacher: Path | None = None, ckpt: Path | None = None, extra: tuple[str, ...] = ()) -> list[dict]:
    """Run ds_run.py; the per-rank losses {batch index: {metric: value}}."""
    args = [sys.executable, str(RUN), "--method", method, "--stage", str(stage), "--devices", str(devices),
            "--steps", str(steps), "--batch", str(batch), "--root", str(root), *extra]
    args += ["--teacher", str(teacher)] if teacher else []
    args += ["--ckpt", str(ckpt)] if ckpt else []
    run(args, root)
    return [{int(k): v for k, v in json.loads((root / f"losses.rank{r}.json").read_text()).items()}
            for r in range(devices)]


SGD = ("--optimizer", "sgd")


def assert_same_updates(root: Path, single_root: Path, rtol: float) -> None:
    """The weights trained at `root` equal those trained at `single_root` from the same start: each tensor's update
    (trained - initial) agrees to `rtol` of the largest entry of that update, plus the float32 rounding of the stored
    weights (a few ulps of the tensor's largest weight), and training did move the weights."""
    start = torch.load(single_root / "weights0.pt", weights_only=True)
    single = torch.load(single_root / "weights.pt", weights_only=True)
    trained = torch.load(root / "weights.pt", weights_only=True)
    start_here = torch.load(root / "weights0.pt", weights_only=True)
    assert sorted(trained) == sorted(single) == sorted(start)
    moved = 0.0
    for k, w in single.items():
        assert torch.equal(start_here[k], start[k]), k  # both runs start from the same weights
        update = (w - start[k]).double()
        size = update.abs().max().item()
        moved = max(moved, size)
        ulps = 4 * torch.finfo(torch.float32).eps * w.abs().max().item()
        torch.testing.assert_close((trained[k] - start[k]).double(), update, rtol=rtol, atol=rtol * size + ulps,
                                   msg=lambda m: f"{k}: {m}")
    assert moved > 0, "training did not change any weight"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_teacher_ckpt):
    """Two-process runs shared by the tests below, each started once: runs(method, stage) -> (root, losses)."""
    base, done = tmp_path_factory.mktemp("zero_runs"), {}

    def get(method: str, stage: int):
        """stage 0: one process without DeepSpeed on the global batch (16); else two processes x 8."""
        if (method, stage) not in done:
            root = base / f"{method}-zero{stage}"
            devices, batch = (1, 16) if stage == 0 else (2, 8)
            done[method, stage] = root, fit(method, root, stage=stage, devices=devices, batch=batch,
                                            teacher=tiny_teacher_ckpt, extra=SGD)
        return done[method, stage]

    return get


def global_mean(per_rank: list[dict]) -> dict[int, dict[str, float]]:
    """The mean over ranks of each metric (equal local batches: the global batch mean)."""
    return {i: {k: sum(r[i][k] for r in per_rank) / len(per_rank) for k in per_rank[0][i]} for i in per_rank[0]}


@pytest.fixture(scope="module")
def single_two_networks(tmp_path_factory) -> tuple[Path, dict]:
    """The deterministic two-network method on one process without DeepSpeed, global batch 16."""
    root = tmp_path_factory.mktemp("single") / "run"
    return root, fit("two_networks", root, devices=1, batch=16, extra=SGD)[0]


@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_equal_one_process_on_the_same_global_batch(stage, single_two_networks, tmp_path):
    """ZeRO's gradient reduction over two engines (one loss reaching both, one through an aborted forward)
    gives the single-process update: same losses and weights, steps 0-2."""
    single_root, single = single_two_networks
    zero = global_mean(fit("two_networks", tmp_path / "zero", stage=stage, devices=2, batch=8, extra=SGD))
    assert sorted(zero) == sorted(single) == [0, 1, 2]
    for i in single:
        assert zero[i]["train/loss"] == pytest.approx(single[i]["train/loss"], rel=1e-6, abs=1e-6)
    assert_same_updates(tmp_path / "zero", single_root, rtol=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("method", ["teacher", "guidance_distillation", "consistency", "onestep", "sid", "erasure",
                                    "onestep_lora_generator"])
def test_every_method_under_zero_equals_one_process_and_converts_exactly(method, stage, runs):
    """Two processes x 8 samples under ZeRO compute what one process computes on the 16-sample global batch
    (every random draw is made for the global batch and sliced per process: MethodModule.per_sample), so
    every loss term agrees to float rounding (1e-5) and every weight update to 1e-4 of its size (SGD runs);
    the ZeRO checkpoint converted to one state dict equals the trained weights exactly."""
    root, losses = runs(method, stage)
    single_root, single = runs(method, 0)
    assert losses[0] != losses[1]  # each process trained on its own share of the batch
    zero = global_mean(losses)
    assert sorted(zero) == sorted(single[0]) == [0, 1, 2]
    for i, row in single[0].items():
        for k, v in row.items():
            assert zero[i][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (i, k)
    assert_same_updates(root, single_root, rtol=1e-4)
    trained = torch.load(root / "weights.pt", weights_only=True)
    converted = trainable_state_dict(root / "checkpoints" / "last.ckpt")
    assert sorted(converted) == sorted(trained)
    for k in trained:
        assert torch.equal(converted[k], trained[k]), k


@pytest.mark.parametrize(("method", "stage"), [("onestep", 3), ("teacher", 2)])
def test_resume_from_a_zero_checkpoint_repeats_the_losses(method, stage, runs, tiny_teacher_ckpt, tmp_path):
    """Stopped after step 1 and resumed from its ZeRO checkpoint (every engine's shards and optimizer
    state), the run logs the uninterrupted run's losses, bit for bit, on every rank."""
    root, straight = runs(method, stage)
    resumed = fit(method, tmp_path / "resumed", stage=stage, devices=2, teacher=tiny_teacher_ckpt,
                  ckpt=root / "checkpoints" / "step=1.ckpt", extra=SGD)
    for rank in range(2):
        assert sorted(resumed[rank]) == [1, 2]
        assert {i: straight[rank][i] for i in (1, 2)} == resumed[rank]


def test_bf16_offload_and_activation_checkpointing(runs, tiny_teacher_ckpt, tmp_path):
    """ZeRO-3 with optimizer states and weights offloaded to CPU, activations recomputed, bf16 autocast:
    the losses are the fp32 run's up to bf16 rounding (close, not equal), the weights stay fp32."""
    root = tmp_path / "bf16"
    losses = fit("onestep", root, stage=3, devices=2, teacher=tiny_teacher_ckpt,
                 extra=("--precision", "bf16-mixed", "--offload", "--checkpointing", *SGD))
    fp32 = runs("onestep", 3)[1]
    for rank in range(2):
        for i, row in losses[rank].items():
            for k, v in row.items():
                assert v == pytest.approx(fp32[rank][i][k], rel=0.1, abs=1e-3), (i, k)
    assert losses[0][0]["train/fake_score"] != fp32[0][0]["train/fake_score"]  # bf16 compute did happen
    trained, converted = torch.load(root / "weights.pt", weights_only=True), trainable_state_dict(root / "checkpoints" / "last.ckpt")
    assert all(torch.equal(converted[k], trained[k]) and trained[k].dtype == torch.float32 for k in trained)


def test_frozen_weights_in_bfloat16_under_zero3(runs, tiny_teacher_ckpt, tmp_path):
    """frozen_dtype: bfloat16 with the LoRA fake score's engine partitioning its bfloat16 base at stage 3: the
    losses are the float32 run's up to bfloat16 rounding, the base stays bfloat16, LoRA / generator / discriminator
    weights float32, and the ZeRO checkpoint converts to exactly the trained weights."""
    root = tmp_path / "frozen_bf16"
    losses = fit("onestep", root, stage=3, devices=2, teacher=tiny_teacher_ckpt, extra=("--frozen-dtype", "bfloat16", *SGD))
    fp32 = runs("onestep", 3)[1]
    for rank in range(2):
        for i, row in losses[rank].items():
            for k, v in row.items():
                assert v == pytest.approx(fp32[rank][i][k], rel=0.1, abs=1e-3), (i, k)
    assert losses[0][0]["train/fake_score"] != fp32[0][0]["train/fake_score"]
    trained, converted = torch.load(root / "weights.pt", weights_only=True), trainable_state_dict(root / "checkpoints" / "last.ckpt")
    for k, v in trained.items():
        frozen = k.startswith("fake_score.") and "lora_" not in k
        assert v.dtype == (torch.bfloat16 if frozen else torch.float32), k
        assert torch.equal(converted[k], v), k


def test_a_nonfinite_gradient_is_skipped_by_the_engines_and_reported(tmp_path):
    """A NaN loss at batch 1: every engine skips that update (DeepSpeed's gradient-norm check), the module's
    NaN/inf policy records it, and training goes on with finite weights."""
    root = tmp_path / "nan"
    fit("two_networks", root, stage=2, devices=2, batch=8, extra=("--nan-at", "1"))
    for rank in range(2):
        skipped = json.loads((root / f"skipped.rank{rank}.json").read_text())
        assert [(s["step"], s["phase"]) for s in skipped] == [(1, "DeepSpeed engine"), (1, "DeepSpeed engine")]
    assert all(torch.isfinite(v).all() for v in torch.load(root / "weights.pt", weights_only=True).values())


def test_cli_under_torchrun_then_export_from_the_zero_checkpoint(tmp_path):
    """The entry point users launch on a cluster (torchrun sets the ranks; Lightning's TorchElastic
    environment picks them up), with the strategy chosen by name; the ZeRO checkpoint exports directly."""
    root = tmp_path / "run"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "train", "fit", "--config", str(TINY_TEACHER), "--trainer.strategy", "zero2", "--trainer.devices", "2",
         "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
         "--trainer.default_root_dir", str(root)], root)
    ckpt = root / "checkpoints" / "last.ckpt"
    assert (ckpt / "lightning.pt").is_file() and (ckpt / "denoiser.net").is_dir()
    out = tmp_path / "teacher.safetensors"
    run([sys.executable, "-m", "train", "export", "--ckpt", str(ckpt), "--out", str(out), "--format", "safetensors"],
        tmp_path / "export")
    from safetensors.torch import load_file

    from train.runtime.checkpoint import load_method

    exported = load_file(out)
    sampling = load_method(ckpt, expect="teacher").sampling_denoiser().net.state_dict()
    assert sorted(exported) == sorted(sampling)
    assert all(torch.equal(exported[k], sampling[k]) for k in sampling)


# --- configuration errors, before any process starts ---------------------------------------------
def test_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="ZeRO stage must be 1, 2 or 3"):
        MultiEngineDeepSpeed(stage=4)
    with pytest.raises(ValueError, match="offload_parameters needs ZeRO stage 3"):
        MultiEngineDeepSpeed(stage=2, offload_parameters=True)
    with pytest.raises(ValueError, match="use 32-true or bf16-mixed"):
        EnginePrecision("16-mixed")


@pytest.fixture(scope="module")
def progressive_runs(runs, tmp_path_factory):
    """progressive_runs(stage) -> (root, per-rank losses): progressive distillation (ds_run.build "progressive":
    8 -> 4 -> 2 -> 1 steps, one optimizer step per round) of the single-process stage-1 run's last.ckpt, for 3 steps:
    stage 0 on one process x 16 without DeepSpeed, else two processes x 8 under that ZeRO stage."""
    stage1 = runs("guidance_distillation", 0)[0] / "checkpoints" / "last.ckpt"
    base, done = tmp_path_factory.mktemp("zero_progressive"), {}

    def get(stage: int):
        if stage not in done:
            root = base / f"progressive-zero{stage}"
            devices, batch = (1, 16) if stage == 0 else (2, 8)
            done[stage] = root, fit("progressive", root, stage=stage, devices=devices, batch=batch, teacher=stage1,
                                    extra=SGD)
        return done[stage]

    return get


@pytest.mark.parametrize("stage", [2, 3])
def test_progressive_distillation_under_zero_equals_one_process_across_round_boundaries(stage, progressive_runs):
    """Replaces the refusal this strategy used to give progressive distillation. Round boundaries before steps 1 and 2
    load the EMA weights into the round teacher and the student and clear the optimizer state (SGD's momentum here);
    under ZeRO the student is reloaded through MultiEngineDeepSpeed.load_network, which re-partitions the weights at
    stage 3 and refreshes the fp32 master partitions (without it the next step would write the old weights back, and
    a kept momentum would push them on). Two processes x 8 then compute what one process computes on the 16-sample
    global batch (every draw through per_sample): losses to 1e-5 in every round, weight updates to 1e-4 of their size,
    and the ZeRO checkpoint converts to exactly the trained weights."""
    root, losses = progressive_runs(stage)
    single_root, single = progressive_runs(0)
    assert losses[0] != losses[1]  # each process trained on its own share of the batch
    zero = global_mean(losses)
    assert sorted(zero) == sorted(single[0]) == [0, 1, 2]
    assert [single[0][i]["train/round"] for i in (0, 1, 2)] == [0.0, 1.0, 2.0]
    for i, row in single[0].items():
        for k, v in row.items():
            assert zero[i][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (i, k)
    assert_same_updates(root, single_root, rtol=1e-4)
    trained = torch.load(root / "weights.pt", weights_only=True)
    converted = trainable_state_dict(root / "checkpoints" / "last.ckpt")
    assert sorted(converted) == sorted(trained) and all(k.startswith("student.net.") for k in trained)
    for k in trained:
        assert torch.equal(converted[k], trained[k]), k
    assert (root / "checkpoints" / "round_1_2steps.ckpt" / "lightning.pt").is_file()  # RoundCheckpoint under ZeRO


def test_strategy_names_are_registered():
    from lightning.pytorch.strategies import StrategyRegistry

    for name in ("zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "guidedistill_deepspeed"):
        assert StrategyRegistry[name]["strategy"] is MultiEngineDeepSpeed
    assert StrategyRegistry["zero3_offload"]["init_params"] == {"stage": 3, "offload_optimizer": True,
                                                               "offload_parameters": True}


# --- text-to-image methods on a tiny SD 1.5 folder (tests/train/ds_run_text.py) ---------------------------------
TEXT_RUN = ROOT / "tests" / "train" / "ds_run_text.py"


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    """text_runs(method, devices) -> (root, per-rank losses): 1 process x 6 samples without DeepSpeed, or 2 processes
    x 3 under ZeRO-2, on a tiny SD 1.5 folder with captioned images beside it; each run started once."""
    import numpy as np
    from PIL import Image

    from models.tiny_pipelines import save_tiny_pipeline

    base, done = tmp_path_factory.mktemp("zero_text"), {}
    folder = save_tiny_pipeline(base / "sd15", "sd15")
    (base / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(14):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(base / "images" / f"{i}.png")
        (base / "images" / f"{i}.txt").write_text(["a cat", "the dog", "a red car"][i % 3])

    def get(method: str, devices: int):
        if (method, devices) not in done:
            root = base / f"{method}-{devices}"
            stage, batch = (0, 6) if devices == 1 else (2, 3)
            run([sys.executable, str(TEXT_RUN), "--method", method, "--stage", str(stage), "--devices", str(devices),
                 "--steps", "3", "--batch", str(batch), "--root", str(root), "--teacher", str(folder), *SGD], root)
            done[method, devices] = root, [{int(k): v for k, v in json.loads((root / f"losses.rank{r}.json").read_text()).items()}
                                           for r in range(devices)]
        return done[method, devices]

    return get


@pytest.mark.parametrize("method", ["text_onestep", "text_erasure"])
def test_text_methods_under_zero2_equal_one_process_on_the_same_global_batch(method, text_runs):
    """Text one-step distillation (f-distill JS + GAN: the discriminator taps the UNet's mid block; h(r) normalised
    over the all-gathered global batch) and text concept erasure (prompt picks, t, trajectories drawn through
    MethodModule.per_sample) on 2 processes x 3 samples under ZeRO-2 compute, term by term, what one process
    computes on the 6-sample global batch; the weight updates agree to 1e-4 of their size (SGD runs)."""
    root, losses = text_runs(method, 2)
    single_root, single = text_runs(method, 1)
    assert losses[0] != losses[1]  # each process trained on its own share of the batch
    zero = global_mean(losses)
    assert sorted(zero) == sorted(single[0]) == [0, 1, 2]
    for i, row in single[0].items():
        assert set(row) == set(zero[i]) and len(row) >= 3
        for k, v in row.items():
            assert zero[i][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (i, k)
    assert_same_updates(root, single_root, rtol=1e-4)
