"""W&B runs offline by default; the offline run holds the resolved config, losses, metrics and sample grids."""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from tests.conftest import TINY_TEACHER
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


def test_offline_run_has_config_losses_metrics_and_grids(tmp_path, classifier, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the CLI itself must choose offline
    root = tmp_path / "run"
    main(["fit", "--config", str(TINY_TEACHER), "--trainer.default_root_dir", str(root),
          "--trainer.logger", "lightning.pytorch.loggers.WandbLogger", "--trainer.logger.project", "guidedistill-test",
          "--trainer.callbacks+=train.callbacks.SampleMetrics", "--trainer.callbacks.num_per_class", "2"])
    runs = list((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "the run must be offline and live in the run folder"
    log = next(runs[0].glob("run-*.wandb"))
    for _ in range(60):  # wandb-core may still be flushing the transaction log just after finish()
        records = read_wandb_records(log)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(1)

    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
    assert config["config"]["model"]["class_path"] == "train.teacher.TeacherPretraining"
    assert config["config"]["model"]["init_args"]["parameterization"] == "v"

    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
    for key in ("train/loss", "val/loss", "val/fd", "val/accuracy", "val/precision", "val/recall", "val/nfe"):
        assert key in summary, key
    assert summary["val/nfe"] == 2 * 4  # CFG: 2 evaluations x 4 validation steps
    assert list((runs[0] / "files" / "media" / "images").rglob("*.png")), "sample grids are logged as images"
    assert list((root / "samples").glob("*.png")), "sample grids are also written as PNG files"
