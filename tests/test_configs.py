"""Every YAML under configs/ (and the test configs) parses and type-checks without building anything."""
from __future__ import annotations

from pathlib import Path

import pytest

from train.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "tests" / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "teacher.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses(path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(path), "--print_config"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path" in out and "trainer:" in out


def test_unknown_field_is_refused(tmp_path, capsys):
    cfg = (ROOT / "tests/configs/tiny_teacher.yaml").read_text().replace("p_uncond: 0.1", "p_uncond: 0.1\n    p_uncnd: 0.2")
    bad = tmp_path / "typo.yaml"
    bad.write_text(cfg)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(bad), "--print_config"])
    assert e.value.code != 0
    assert "p_uncnd" in capsys.readouterr().err
