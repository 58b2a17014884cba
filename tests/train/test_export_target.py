"""Export never loses user data (issue 18): `--force` replaces only an earlier export, never the run folder holding the
checkpoint, the current directory or a parent of either; the replacement is atomic, killed exports leave nothing a
later export does not clean, and exports get ordinary permissions."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from train.cli import main


def export_cli(ckpt: Path, out, *extra: str) -> None:
    main(["export", "--ckpt", str(ckpt), "--out", str(out), *extra])


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> content)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(capsys, ckpt: Path, out, *extra: str) -> str:
    """The one-line error of an export that must be refused."""
    with pytest.raises(SystemExit):
        export_cli(ckpt, out, *extra)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def run_folder(tiny_teacher_ckpt, tmp_path) -> Path:
    """A run folder as `fit` leaves it: checkpoints/last.ckpt (the source), wandb/, and a guidedistill.json, so that
    it even looks like an export."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_teacher_ckpt, run / "checkpoints" / "last.ckpt")
    (run / "wandb").mkdir()
    (run / "wandb" / "run-1.wandb").write_text("logs")
    (run / "guidedistill.json").write_text("{}")
    return run


def test_force_never_replaces_the_run_folder_or_a_parent_of_the_checkpoint(run_folder, capsys):
    ckpt = run_folder / "checkpoints" / "last.ckpt"
    before = snapshot(run_folder.parent)
    for out in (run_folder, run_folder / "checkpoints", run_folder.parent, ckpt):
        err = refused(capsys, ckpt, out, "--force")
        assert "the checkpoint being exported" in err and "pass a new --out" in err
    assert snapshot(run_folder.parent) == before
    export_cli(ckpt, run_folder / "export")  # what the message suggests works
    assert (run_folder / "export" / "guidedistill.json").is_file()


def test_force_never_replaces_the_current_directory_or_its_parents(tiny_teacher_ckpt, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("user data")
    (work / "guidedistill.json").write_text("{}")  # even one that looks like an export
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    for out in (".", str(work), "..", tmp_path):
        err = refused(capsys, tiny_teacher_ckpt, out, "--force")
        assert "the current directory" in err
    assert snapshot(tmp_path) == before


def test_force_replaces_an_earlier_export_and_nothing_else(tiny_teacher_ckpt, tmp_path, capsys):
    from safetensors.torch import save_file
    import torch

    out = tmp_path / "model"
    export_cli(tiny_teacher_ckpt, out)
    (out / "stale.txt").write_text("from the earlier export")
    assert "pass --force" in refused(capsys, tiny_teacher_ckpt, out)
    export_cli(tiny_teacher_ckpt, out, "--force")
    assert {p.name for p in out.iterdir()} == {"unet", "scheduler", "guidedistill.json", "README.md"}
    single = tmp_path / "model.safetensors"
    export_cli(tiny_teacher_ckpt, single, "--format", "safetensors")
    export_cli(tiny_teacher_ckpt, single, "--format", "safetensors", "--force")
    export_cli(tiny_teacher_ckpt, out, "--format", "safetensors", "--force")  # an export folder -> an export file
    assert out.is_file()
    foreign = tmp_path / "weights.safetensors"  # safetensors, but not ours: no "guidedistill" metadata
    save_file({"w": torch.zeros(2)}, foreign, metadata={"format": "pt"})
    assert "is not an earlier export" in refused(capsys, tiny_teacher_ckpt, foreign, "--format", "safetensors", "--force")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_next_export_cleans_what_a_killed_one_left_and_only_that(tiny_teacher_ckpt, tmp_path):
    out = tmp_path / "model"
    export_cli(tiny_teacher_ckpt, out)
    pid = dead_pid()
    stale = [tmp_path / f".model.guidedistill-tmp-{pid}-0a1b2c3d", tmp_path / f".model.guidedistill-old-{pid}-0a1b2c3e"]
    for p in stale:
        (p / "unet").mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = [tmp_path / f".model.guidedistill-tmp-{live.pid}-00000000",  # an export still running
                tmp_path / f".other.guidedistill-tmp-{pid}-00000000",       # another target's
                tmp_path / ".model.notes"]                                   # not ours at all
        for p in kept:
            p.mkdir()
        export_cli(tiny_teacher_ckpt, out, "--force")
        assert not any(p.exists() for p in stale) and all(p.is_dir() for p in kept)
    finally:
        live.kill()
        live.wait()


def test_an_export_killed_between_its_renames_is_put_back(tiny_teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "model"
    export_cli(tiny_teacher_ckpt, out)
    aside = tmp_path / f".model.guidedistill-old-{dead_pid()}-0a1b2c3d"
    os.rename(out, aside)  # killed after moving the earlier export aside, before moving the new one in
    assert "pass --force" in refused(capsys, tiny_teacher_ckpt, out)  # the earlier export is back, not replaced
    assert (out / "guidedistill.json").is_file() and not aside.exists()


SIGTERM_DURING_WRITE = r"""
import os, signal, sys, time
from pathlib import Path
from train.export import replace_atomically

def write(tmp):
    (tmp / "unet").mkdir()
    (tmp / "unet" / "weights").write_bytes(b"0" * 1000)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
replace_atomically(Path(sys.argv[1]), write)
"""


def test_a_terminated_export_leaves_the_target_and_no_hidden_folder(tiny_teacher_ckpt, tmp_path):
    out = tmp_path / "model"
    export_cli(tiny_teacher_ckpt, out)
    before = snapshot(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, "-c", SIGTERM_DURING_WRITE, str(out)], env=env, timeout=120)
    assert run.returncode == 128 + signal.SIGTERM
    assert snapshot(tmp_path) == before and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_exports_have_ordinary_permissions(tiny_teacher_ckpt, tmp_path):
    mask = os.umask(0o022)
    try:
        export_cli(tiny_teacher_ckpt, tmp_path / "model")
        export_cli(tiny_teacher_ckpt, tmp_path / "model.safetensors", "--format", "safetensors")
    finally:
        os.umask(mask)
    paths = [tmp_path / "model", *(tmp_path / "model").rglob("*"), tmp_path / "model.safetensors"]
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in paths}
    assert modes == {k: oct(0o755 if (tmp_path / k).is_dir() else 0o644) for k in modes}
    assert json.loads((tmp_path / "model" / "guidedistill.json").read_text())["method"] == "teacher"
