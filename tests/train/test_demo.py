"""`python -m train demo` at smoke size: every digits stage end to end (fit + evaluation), progress in the terminal and
<out>/demo.log (stage i of n, steps of each stage, time left), tables labelled with their profile, and a second demo
into the same folder reusing finished stages and resuming an interrupted one. (The text stages: test_text_digits.py.)"""
from __future__ import annotations

import json

import pytest
import torch

from train.demo import STAGES, run_demo

DIGITS = [s.name for s in STAGES if not s.name.startswith("text_")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, classifier):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, max_steps=2, stages=DIGITS, num_per_class=2)


def test_every_digits_stage_trains_and_reports_its_metrics(demo):
    out, metrics = demo
    assert metrics["profile"] == "quick" and list(metrics["stages"]) == DIGITS
    for name, stage in metrics["stages"].items():
        assert stage["training_steps"] == 2 and stage["rows"], name
        assert all(r["fd"] > 0 and 0 <= r["accuracy"] <= 1 for r in stage["rows"]), name
        assert torch.load(stage["checkpoint"], weights_only=True)["global_step"] == 2, name
    assert len(metrics["stages"]["teacher"]["rows"]) == 4  # w = 1, 2, 3, 5
    assert json.loads((out / "metrics.json").read_text()) == metrics
    tables = (out / "tables.md").read_text()
    assert tables.startswith("Demo tables (quick profile)") and "### erase_one (quick profile" in tables
    assert "erased_rate" in tables  # the erasure stages add their erasure columns


def test_progress_goes_to_the_log_with_stages_steps_and_time_left(demo):
    out, _ = demo
    log = (out / "demo.log").read_text()
    assert f"stage 1/{len(DIGITS)}: teacher" in log and f"stage {len(DIGITS)}/{len(DIGITS)}: sfd" in log
    assert "left" in log and "teacher: step 2/2 (100%)" in log  # the per-step lines of train.runtime.progress.ProgressLog
    assert "python -m train fit --config" in log  # each stage's command, to rerun it by hand


def test_a_second_demo_reuses_finished_stages_and_resumes_an_interrupted_one(demo):
    out, metrics = demo
    first = torch.load(metrics["stages"]["teacher"]["checkpoint"], weights_only=True)["state_dict"]
    again = run_demo(out, max_steps=2, stages=["teacher"], num_per_class=2)
    log = (out / "demo.log").read_text()
    assert "already holds 2 steps; reusing it" in log
    assert all(torch.equal(v, first[k]) for k, v in
               torch.load(again["stages"]["teacher"]["checkpoint"], weights_only=True)["state_dict"].items())
    run_demo(out, max_steps=3, stages=["teacher"], num_per_class=2)  # one more step: the run is resumed, not redone
    assert "resuming the interrupted run" in (out / "demo.log").read_text()
    assert torch.load(out / "teacher" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_bad_demo_arguments_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="unknown demo profile"):
        run_demo(tmp_path, profile="slow")
    with pytest.raises(ValueError, match="unknown demo stage"):
        run_demo(tmp_path, stages=["nope"])
