"""Shared fixtures: a private cache, offline W&B, the evaluation classifier and a tiny trained teacher."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_TEACHER = ROOT / "tests" / "configs" / "tiny_teacher.yaml"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def cli_error(capsys, argv: list[str]) -> str:
    """What `python -m train <argv>` says when it refuses: exit status 2 and one line `error: ...` on stderr, no
    traceback."""
    from train.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A private cache for the whole session; $GUIDEDISTILL_CACHE points at it so defaults use it too."""
    d = tmp_path_factory.mktemp("guidedistill_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GUIDEDISTILL_CACHE", str(d))
        yield d


@pytest.fixture(scope="session")
def classifier(cache_dir):
    """The evaluation classifier, trained once per test session into the private cache."""
    from train.evaluation import classifier as clf_mod

    clf_mod._MEMO.pop(clf_mod.cache_path(cache_dir).resolve(), None)
    return clf_mod.load_digits_classifier(cache_dir)


@pytest.fixture(scope="session")
def tiny_teacher_ckpt(tmp_path_factory, classifier) -> Path:
    """A tiny digits teacher trained for a few steps through the real CLI (`python -m train fit`)."""
    from train.cli import main

    root = tmp_path_factory.mktemp("tiny_teacher")
    main(["fit", "--config", str(TINY_TEACHER), "--trainer.default_root_dir", str(root)])
    ckpt = root / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt
