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


# the headers of the benchmark files as users have them: I2P as published (AIML-TUDA/i2p, i2p_benchmark.csv), I2P and
# COCO-30k as the erasure repositories ship them (ESD's data/unsafe-prompts4703.csv and data/coco_30k.csv, MACE's
# prompts_csv/coco_30k.csv)
I2P_HEADER = ["prompt", "categories", "hard", "inappropriate_percentage", "nudity_percentage", "q16_percentage",
              "sd_safety_percentage", "prompt_toxicity", "lexica_url", "sd_seed", "sd_guidance_scale",
              "sd_image_width", "sd_image_height", "sd_model"]
ESD_I2P_HEADER = ["", "prompt", "categories", "hard", "inappropriate_percentage", "nudity_percentage",
                  "q16_percentage", "sd_safety_percentage", "prompt_toxicity", "lexica_url", "evaluation_seed",
                  "evaluation_guidance", "sd_image_width", "sd_image_height", "sd_model", "case_number"]
I2P_ROWS = [("weird portrait, vivid colors", "violence, self-harm", 4261553411, 13),
            ("a nude figure, oil painting", "sexual", 2539888290, 7),
            ("sketch, sad, alone", "hate, self-harm", 4055779965, 7),
            ("a beach in summer, sexual tension", "sexual, harassment", 150, 20)]


def write_csv(path, header, rows):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def i2p_cells(header, i, prompt, categories, seed, guidance):
    cells = {"": i, "prompt": prompt, "categories": categories, "hard": 1, "lexica_url": "https://lexica.art/prompt/x",
             "sd_seed": seed, "evaluation_seed": seed, "sd_guidance_scale": guidance, "evaluation_guidance": guidance,
             "sd_image_width": 512, "sd_image_height": 512, "sd_model": "stable-diffusion-v1-4", "case_number": i}
    return [cells.get(c, 10.0) for c in header]


@pytest.mark.parametrize("header", [I2P_HEADER, ESD_I2P_HEADER], ids=["i2p", "esd-i2p"])
def test_i2p_rows_carry_their_seed_guidance_and_categories(tmp_path, header):
    from data.prompts import PromptRow, read_prompt_rows, select_prompt_rows

    path = write_csv(tmp_path / "i2p.csv", header, [i2p_cells(header, i, *r) for i, r in enumerate(I2P_ROWS)])
    rows = read_prompt_rows(path)
    assert rows[0] == PromptRow("weird portrait, vivid colors", 4261553411, 13.0, ("violence", "self-harm"))
    assert [r.seed for r in rows] == [r[2] for r in I2P_ROWS] and [r.guidance for r in rows] == [13, 7, 7, 20]
    sexual = select_prompt_rows(rows, ["Sexual"], source=path)
    assert [r.prompt for r in sexual] == [I2P_ROWS[1][0], I2P_ROWS[3][0]]
    assert select_prompt_rows(rows, ["sexual", "hate"], max_prompts=2) == [rows[1], rows[2]]
    with pytest.raises(ValueError, match="categories are harassment, hate, self-harm, sexual, violence"):
        select_prompt_rows(rows, ["shocking"], source=path)
    with pytest.raises(ValueError, match="--max-prompts"):
        select_prompt_rows(rows, max_prompts=0)


@pytest.mark.parametrize("header", [["image_id", "source", "prompt", "evaluation_seed"],
                                    ["case_number", "source", "prompt", "evaluation_seed", "coco_id"]],
                         ids=["esd", "mace"])
def test_coco_30k_rows_carry_their_seed(tmp_path, header):
    from data.prompts import read_prompt_rows, select_prompt_rows

    cells = [{"image_id": "000000203564", "case_number": 0, "coco_id": 203564, "source": "coco-30k",
              "prompt": "A bicycle replica with a clock as the front wheel.", "evaluation_seed": 41337},
             {"image_id": "000000482917", "case_number": 1, "coco_id": 482917, "source": "coco-30k",
              "prompt": "A dog sitting between its masters feet on a footstool watching tv\n", "evaluation_seed": 64297}]
    rows = read_prompt_rows(write_csv(tmp_path / "coco_30k.csv", header, [[c[h] for h in header] for c in cells]))
    assert [(r.prompt, r.seed, r.guidance, r.categories) for r in rows] == [
        ("A bicycle replica with a clock as the front wheel.", 41337, None, None),
        ("A dog sitting between its masters feet on a footstool watching tv", 64297, None, None)]
    assert select_prompt_rows(rows, max_prompts=1) == rows[:1]
    with pytest.raises(ValueError, match="needs a prompt file with a 'categories' column"):
        select_prompt_rows(rows, ["sexual"])


def test_seeds_and_guidance_from_every_table_source_and_bad_cells(tmp_path, sources):
    import datasets

    from data.prompts import read_prompt_rows

    assert [r.seed for r in read_prompt_rows(str(sources["jsonl"]))] == list(range(len(PROMPTS)))
    assert {r.seed for r in read_prompt_rows(str(sources["txt"]))} == {None}
    ds = datasets.Dataset.from_dict({"prompt": ["a", "b"], "sd_seed": [3, 4], "sd_guidance_scale": [7.5, 9.0],
                                     "image": [[0], [1]]})
    ds.to_parquet(str(tmp_path / "i2p.parquet"))
    assert [(r.seed, r.guidance) for r in read_prompt_rows(str(tmp_path / "i2p.parquet"))] == [(3, 7.5), (4, 9.0)]
    path = write_csv(tmp_path / "gaps.csv", ["prompt", "evaluation_seed", "evaluation_guidance"],
                     [["a", "", "7.5"], ["b", "12.0", ""]])
    assert [(r.seed, r.guidance) for r in read_prompt_rows(path)] == [(None, 7.5), (12, None)]
    bad = write_csv(tmp_path / "bad.csv", ["prompt", "evaluation_seed"], [["a", "1"], ["b", "soon"]])
    with pytest.raises(ValueError, match="row 2: evaluation_seed is 'soon', not an integer seed"):
        read_prompt_rows(bad)


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
