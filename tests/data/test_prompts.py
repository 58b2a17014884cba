"""Prompt sets from every supported source, the prompt data module, and concept specifications for erasure."""
from __future__ import annotations

import json
import os

import pytest

from data.concepts import load_concepts, parse_concepts
from data.prompts import PromptDataModule, read_prompts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = ["a photo of a cat", "a red car, at night", 'an "oil" painting', "ünïcode prompt", "a dog"]


@pytest.fixture
def sources(tmp_path):
    import csv

    import datasets

    out = {}
    out["txt"] = tmp_path / "p.txt"
    out["txt"].write_text("\n".join(PROMPTS[:2] + ["", "   "] + PROMPTS[2:]) + "\n", encoding="utf-8")
    out["csv"] = tmp_path / "p.csv"
    with open(out["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "caption"])
        w.writerows([[i, p] for i, p in enumerate(PROMPTS)])
    out["jsonl"] = tmp_path / "p.jsonl"
    out["jsonl"].write_text("".join(json.dumps({"prompt": p, "seed": i}) + "\n" for i, p in enumerate(PROMPTS)),
                            encoding="utf-8")
    out["json"] = tmp_path / "p.json"
    out["json"].write_text(json.dumps(PROMPTS), encoding="utf-8")
    ds = datasets.Dataset.from_dict({"text": PROMPTS, "n": list(range(len(PROMPTS)))})
    out["parquet"] = tmp_path / "p.parquet"
    ds.to_parquet(str(out["parquet"]))
    out["disk"] = tmp_path / "disk"
    datasets.DatasetDict({"train": ds}).save_to_disk(str(out["disk"]))
    return out


@pytest.mark.parametrize("kind", ["txt", "csv", "jsonl", "json", "parquet", "disk"])
def test_every_source_reads_the_same_prompts_in_order(sources, kind):
    assert read_prompts(str(sources[kind])) == PROMPTS


def test_explicit_column_and_clear_errors(sources, tmp_path):
    assert read_prompts(str(sources["csv"]), column="caption") == PROMPTS
    with pytest.raises(ValueError, match="no column 'prompt'.*id, caption"):
        read_prompts(str(sources["csv"]), column="prompt")
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="set `column`"):
        read_prompts(str(tmp_path / "x.csv"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="line 2"):
        read_prompts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "num.jsonl").write_text('{"prompt": 3}\n')
    with pytest.raises(ValueError, match="must be strings"):
        read_prompts(str(tmp_path / "num.jsonl"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "p.xlsx").write_text("")
    with pytest.raises(ValueError, match="unsupported"):
        read_prompts(str(tmp_path / "p.xlsx"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(str(tmp_path / "no_such_dir" / "prompts"))


def test_data_module_splits_and_batches(sources):
    dm = PromptDataModule(str(sources["txt"]), batch_size=2, val_size=2, seed=0)
    dm.setup()
    assert sorted(dm.train_prompts + dm.val_prompts) == sorted(PROMPTS)
    assert len(dm.val_prompts) == 2 and not set(dm.val_prompts) & set(dm.train_prompts)
    again = PromptDataModule(str(sources["csv"]), batch_size=2, val_size=2, seed=0)
    assert again.val_prompts == dm.val_prompts  # the held-out choice depends on the seed only
    batches = list(dm.train_dataloader())
    assert all(isinstance(b, list) and len(b) == 2 and all(isinstance(p, str) for p in b) for b in batches)
    seen = [p for b in batches for p in b]
    assert len(batches) == len(dm.train_prompts) // 2 and len(set(seen)) == len(seen) and set(seen) <= set(dm.train_prompts)
    assert [len(b) for b in dm.val_dataloader()] == [2]
    with pytest.raises(ValueError, match="lower val_size"):
        PromptDataModule(str(sources["txt"]), val_size=5).setup()


def test_concept_spec_from_yaml(tmp_path):
    (tmp_path / "anchors.txt").write_text("a photo of a cat\na painting by monet\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text("""
concepts:
  - name: van gogh
    prompts: ["van gogh", "a painting in the style of van gogh"]
    alternative: a painting
  - nudity
anchors: ["a portrait"]
anchors_file: anchors.txt
""")
    cs = load_concepts(str(spec))
    assert [c.name for c in cs.concepts] == ["van gogh", "nudity"]
    assert cs.concepts[0].alternative == "a painting" and cs.concepts[1].alternative == ""
    assert cs.concepts[1].prompts == ("nudity",)
    assert cs.anchors == ("a portrait", "a photo of a cat", "a painting by monet")
    assert cs.erased_prompts == ["van gogh", "a painting in the style of van gogh", "nudity"]


@pytest.mark.parametrize("spec, needle", [
    ([], "must be a mapping"),
    ({"concept": ["x"]}, "unknown key.*concept"),
    ({"concepts": []}, "at least one concept"),
    ({"concepts": [{"name": "a", "promts": ["x"]}]}, r"concepts\[0\] has unknown key.*promts"),
    ({"concepts": [{"name": "a", "prompts": [1]}]}, r"concepts\[0\].prompts must be"),
    ({"concepts": [{"name": "a", "prompts": ["x"], "alternative": "x"}]}, "one of the concept's own prompts"),
    ({"concepts": ["x", "x"]}, "distinct"),
    ({"concepts": ["x"], "anchors": ["x", "y"]}, "also erased"),
])
def test_bad_concept_specs_say_what_to_change(spec, needle):
    with pytest.raises(ValueError, match=needle) as e:
        parse_concepts(spec)
    assert "concepts:" in str(e.value)  # the message shows a valid example


def test_missing_or_invalid_spec_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="write a YAML"):
        load_concepts(str(tmp_path / "none.yaml"))
    (tmp_path / "bad.yaml").write_text("concepts: [a, b\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_concepts(str(tmp_path / "bad.yaml"))
