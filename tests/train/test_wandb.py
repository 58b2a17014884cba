"""W&B runs offline by default; the offline run holds the resolved config, losses, learning rates, gradient
norms, metrics (scalars and a table), sample grids and, with ExportArtifact, the exported model."""
from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_TEACHER
from train.evaluation.callbacks import TABLE_COLUMNS
from train.cli import main


def read_wandb_records(path: Path) -> list:
    """Records of an offline run file (run-*.wandb): a LevelDB-style log (7-byte file header; 32 KiB blocks of
    records framed as crc32[4] length[2] type[1], type 1 full, 2 first, 3 middle, 4 last) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, block, pos, buf, out = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        if pos + length > len(raw):  # a record wandb is still writing: stop before it
            break
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        buf += raw[pos:pos + length]
        pos += length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def offline_run(root: Path) -> tuple[Path, list]:
    """The one offline run under <root>/wandb and its records, once wandb has written the exit record."""
    runs = list((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "the run must be offline and live in the run folder"
    log = next(runs[0].glob("run-*.wandb"))
    from google.protobuf.message import DecodeError

    records: list = []
    for _ in range(60):  # wandb-core may still be flushing the transaction log just after finish()
        try:
            records = read_wandb_records(log)
        except DecodeError:  # read in the middle of a write: the file is not complete yet
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(1)
    return runs[0], records


def merged(records: list, kind: str) -> dict:
    """The config or summary of a run: its update records merged, values decoded from JSON."""
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == kind:
            out.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in getattr(r, kind).update})
    return out


def history_keys(records: list) -> set[str]:
    return {i.key or "/".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "history"
            for i in r.history.item}


def test_offline_run_has_config_losses_metrics_and_grids(tmp_path, classifier, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the CLI itself must choose offline
    root = tmp_path / "run"
    main(["fit", "--config", str(TINY_TEACHER), "--trainer.default_root_dir", str(root),
          "--trainer.logger", "lightning.pytorch.loggers.WandbLogger", "--trainer.logger.project", "guidedistill-test",
          "--trainer.callbacks+=train.evaluation.callbacks.SampleMetrics", "--trainer.callbacks.num_per_class", "2"])
    run, records = offline_run(root)

    config = merged(records, "config")
    assert config["config"]["model"]["class_path"] == "train.methods.teacher.TeacherPretraining"
    assert config["config"]["model"]["init_args"]["parameterization"] == "v"

    summary = merged(records, "summary")
    for key in ("train/loss", "val/loss", "val/fd", "val/accuracy", "val/precision", "val/recall", "val/nfe",
                "train/lr/denoiser", "train/grad_norm/denoiser"):
        assert key in summary, key
    assert summary["val/nfe"] == 2 * 4  # CFG: 2 evaluations x 4 validation steps
    assert summary["train/lr/denoiser"] == pytest.approx(0.002)  # tiny_teacher.yaml: lr 0.002, warm-up over by step 12
    assert summary["train/grad_norm/denoiser"] > 0
    assert {"train/lr/denoiser", "train/grad_norm/denoiser"} <= history_keys(records)  # logged along the run too

    # the metrics table: one row per validation (steps 6 and 12 of tiny_teacher.yaml), the scalars' values
    assert summary["val/metrics_table/_type"] == "table-file" and summary["val/metrics_table/nrows"] == 2
    table = json.loads((run / "files" / summary["val/metrics_table/path"]).read_text())
    assert table["columns"] == TABLE_COLUMNS
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [r["step"] for r in rows] == [6, 12]
    assert rows[-1]["fd"] == pytest.approx(summary["val/fd"]) and rows[-1]["nfe"] == 8
    assert rows[-1]["erased_rate"] is None and len([k for k in rows[-1] if k.startswith("accuracy_")]) == 10

    assert list((run / "files" / "media" / "images").rglob("*.png")), "sample grids are logged as images"
    assert list((root / "samples").glob("*.png")), "sample grids are also written as PNG files"
    assert not [a for a in records_of(records, "artifact") if a.type == "model"], "a model only with ExportArtifact"


def records_of(records: list, kind: str):
    return (getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind)


ONESTEP = """
model:
  class_path: train.methods.onestep.OneStepDistillation
  init_args:
    teacher: {teacher}
    objective: {{divergence: jensen_shannon}}
    fake_score: {{rank: 4, updates: 2, lr: 2.0e-4}}
    discriminator: {{gan_weight: 0.1, hidden: 16}}
    generator: {{lr: 1.0e-4}}
    optimizer: {{warmup_steps: 2}}
    ema_decay: 0.9
    val_samples: 20
data:
  class_path: data.digits.DigitsDataModule
  init_args: {{batch_size: 8}}
trainer:
  max_steps: 3
  accelerator: cpu
  check_val_every_n_epoch: null
  val_check_interval: 3
  limit_val_batches: 1
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.WandbLogger
    init_args: {{project: guidedistill-test, name: onestep, offline: false}}
  callbacks:
    - class_path: train.evaluation.callbacks.SampleMetrics
      init_args: {{num_per_class: 2}}
    - class_path: train.export.ExportArtifact
"""


def test_three_optimizers_log_their_learning_rates_and_gradient_norms_and_the_export_is_an_artifact(
        tmp_path, tiny_teacher_ckpt, monkeypatch):
    """The one-step module (manual optimization: generator, LoRA fake score, discriminator) logs one learning
    rate and one gradient norm per network, and ExportArtifact logs the diffusers export as a model artifact.
    `offline: false` in the config does not make the run online: the mode is offline unless asked for."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config, root = tmp_path / "onestep.yaml", tmp_path / "run"
    config.write_text(ONESTEP.format(teacher=tiny_teacher_ckpt))
    main(["fit", "--config", str(config), "--trainer.default_root_dir", str(root)])
    run, records = offline_run(root)

    summary = merged(records, "summary")
    for net in ("generator", "fake_score", "disc_head"):
        assert summary[f"train/grad_norm/{net}"] > 0, net
    # AdamW with a 2-step linear warm-up, stepped once per update: after 3 generator updates every rate is full
    assert summary["train/lr/generator"] == pytest.approx(1e-4)
    assert summary["train/lr/fake_score"] == summary["train/lr/disc_head"] == pytest.approx(2e-4)
    assert summary["train/dmd"] is not None and summary["val/metrics_table/nrows"] == 1

    artifacts = [a for a in records_of(records, "artifact") if a.type == "model"]  # tables are "run_table" ones
    assert len(artifacts) == 1
    art = artifacts[0]
    assert art.type == "model" and art.name == "onestep-model"
    assert json.loads(art.metadata)["method"] == "onestep" and "latest" in list(art.aliases)
    paths = {e.path for e in art.manifest.contents}
    assert {"unet/config.json", "unet/diffusion_pytorch_model.safetensors", "guidedistill.json", "README.md"} <= paths
    meta = json.loads((root / "export" / "guidedistill.json").read_text())
    assert meta["method"] == "onestep" and "val/fd" in meta["metrics"]  # the card holds the last validation metrics
    assert not (root / ".export-checkpoint").exists()


def test_wandb_flag_and_environment_choose_the_mode(tmp_path, monkeypatch):
    """--wandb (else $WANDB_MODE, else offline) decides the mode, over the logger's own `offline: true`, which
    alone would force offline. Shown with "disabled" (no run folder written); "online" takes the same path."""
    from train.fit import finish_wandb, lightning_cli

    def fit(root, *extra):
        cli = lightning_cli(["fit", "--config", str(TINY_TEACHER), "--trainer.default_root_dir", str(root),
                             "--trainer.logger", "lightning.pytorch.loggers.WandbLogger", "--trainer.max_steps", "1",
                             "--trainer.limit_val_batches", "0", "--trainer.logger.offline", "true", *extra])
        finish_wandb()
        return cli.trainer.logger._wandb_init["mode"]

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert fit(tmp_path / "flag", "--wandb", "disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert fit(tmp_path / "env") == "disabled"
    assert not list(tmp_path.glob("*/wandb/*-run-*")), "a disabled run writes nothing"
