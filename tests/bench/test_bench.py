"""`python -m bench --quick` writes the quality, speed and memory tables (Markdown and JSON) with their rows
and columns. No timing is asserted (DESIGN.md, Testing strategy): only that every figure is there."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.distributed]  # trains tiny networks; a two-process ZeRO row


@pytest.fixture(scope="module")
def tables(tmp_path_factory, tiny_teacher_ckpt):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # GUIDEDISTILL_CACHE: the fixture's
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out), "--runs", str(out / "none"),
                           "--ckpt", f"teacher={tiny_teacher_ckpt}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out, proc.stdout


def load(out, part: str) -> dict:
    assert (out / f"{part}.md").is_file(), f"{part}.md missing"
    data = json.loads((out / f"{part}.json").read_text())
    assert data["command"].startswith("python -m bench --quick")
    assert data["machine"]["cores"] and data["machine"]["torch"]
    return data


def rows_of(data: dict, title_start: str) -> tuple[list[str], list[dict]]:
    table = next(t for t in data["tables"] if t["title"].startswith(title_start))
    return table["columns"], table["rows"]


def test_quality_table_evaluates_given_checkpoints_and_marks_the_rest_absent(tables):
    out, stdout = tables
    columns, rows = rows_of(load(out, "quality"), "Quality")
    assert {"fd", "accuracy", "precision", "recall", "erased_rate", "nfe"} <= set(columns)
    by_row = {r["row"]: r for r in rows}
    assert {"teacher", "guidance_distill", "progressive_1", "dmd", "dmd_pgsb", "fdistill_js", "erase_one",
            "erase_two", "erase_toward"} <= set(by_row)
    teacher = by_row["teacher"]
    assert teacher["status"] == "ok" and teacher["nfe"] == 2 * 50  # CFG: 2 evaluations x 50 DDIM steps
    assert teacher["fd"] >= 0 and 0 <= teacher["accuracy"] <= 1 and teacher["erased_rate"] is None
    assert all(r["status"] == "absent" for k, r in by_row.items() if k != "teacher")
    md = (out / "quality.md").read_text()
    assert "| teacher |" in md and "absent" in md and "## quality" in stdout


def test_speed_tables_pair_each_step_with_its_bare_passes(tables):
    out, _ = tables
    data = load(out, "speed")
    columns, rows = rows_of(data, "Training step vs bare")
    assert {"step_ms", "bare_ms", "ratio", "ratio_min", "ratio_max"} <= set(columns)
    by_key = {r["key"]: r for r in rows}
    assert set(by_key) == {"teacher", "guidance_distillation", "dmd_lora", "erasure"}
    for r in rows:
        assert len(r["step_s"]) == len(r["bare_s"]) == r["repeats"] > 0
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"] and r["partial_calls"] == 0
    assert "teacher.net: fwd x32" in by_key["guidance_distillation"]["passes"]  # CFG: both branches in one forward
    assert "student.net: fwd+bwd x16" in by_key["guidance_distillation"]["passes"]
    assert "(adapters off)" in by_key["dmd_lora"]["passes"]  # the LoRA fake score's base is the teacher
    _, guiders = rows_of(data, "Sampling time per step")
    assert {"cfg", "cfg, sequential branches", "apg", "autoguidance"} <= {r["guider"] for r in guiders}
    _, cfg = rows_of(data, "CFG with batched vs sequential")
    assert [r["batch"] for r in cfg] == [1, 8] and all(r["speedup"] > 0 for r in cfg)
    assert {g["target"] for g in data["goals"]} == {"<= 1.10x", ">= 1.3x faster"}


def test_memory_tables_are_relative_to_plain_fine_tuning(tables):
    out, _ = tables
    data = load(out, "memory")
    columns, rows = rows_of(data, "Peak memory per method")
    assert {"peak_mb", "x_plain"} <= set(columns)
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"plain", "dmd_copy", "dmd_lora"}
    assert by_method["plain"]["x_plain"] == 1.0 and all(r["peak_mb"] > 0 for r in rows)
    assert by_method["dmd_lora"]["trainable_m"] > by_method["plain"]["trainable_m"]  # generator + LoRA
    _, zero = rows_of(data, "Peak memory per process under")
    assert {(r["stage"], r["method"]) for r in zero} == {(2, "plain"), (2, "dmd_lora")}
    assert all(len(r["rank_peaks_mb"]) == 2 for r in zero)
    assert data["goals"][0]["target"] == "<= 1.3x"
