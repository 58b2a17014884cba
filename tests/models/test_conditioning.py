"""The conditioners (models.conditioning): class labels and prompts behind one interface — parse, encode, null,
drop, key — and one prompt encoder per process however many networks and modules use it."""
from __future__ import annotations

import copy

import pytest
import torch

from models.conditioning import NULL_LABEL, ClassConditioner, TextConditioner


def test_class_requests_are_ids_or_names_and_wrong_kinds_say_what_to_give():
    c = ClassConditioner(3, names=["circle", "square", "triangle"])
    assert c.parse_all([0, "triangle", "1", torch.tensor(2), -1]) == [0, 2, 1, 2, -1]
    assert c.encode(["square", 0]).tolist() == [1, 0] and c.encode(torch.tensor([2, -1])).tolist() == [2, -1]
    assert c.key("triangle") == c.key(2) == "2" and c.name(2) == "triangle" and c.enumerate() == [0, 1, 2]
    with pytest.raises(ValueError, match="circle, square, triangle"):
        c.parse("hexagon")
    with pytest.raises(ValueError, match="out of range"):
        c.encode(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="one name per class"):
        ClassConditioner(3, names=["a"])


def test_class_null_and_drop_follow_the_given_uniforms():
    c = ClassConditioner(10)
    cond = torch.tensor([1, 2, 3, 4])
    assert c.null(cond).tolist() == [NULL_LABEL] * 4
    u = torch.tensor([0.05, 0.5, 0.09, 0.95])
    assert c.drop(cond, 0.1, u=u).tolist() == [NULL_LABEL, 2, NULL_LABEL, 4]  # Ho & Salimans 2022, Algorithm 1
    assert torch.equal(c.drop(cond, 0.0, u=u), cond)


def _text(embedded_guidance=None) -> TextConditioner:
    null = {"encoder_hidden_states": torch.full((1, 4, 3), -1.0), "pooled_projections": torch.full((1, 2), -2.0)}
    return TextConditioner(["encoder_hidden_states", "pooled_projections"], null_embedding=null,
                           embedded_guidance=embedded_guidance, width=3)


def test_text_null_and_drop_replace_only_the_text_entries():
    c = _text()
    cond = {"encoder_hidden_states": torch.randn(3, 4, 3), "pooled_projections": torch.randn(3, 2),
            "time_ids": torch.arange(3.0)}
    null = c.null(cond)
    assert torch.equal(null["encoder_hidden_states"], torch.full((3, 4, 3), -1.0))
    assert torch.equal(null["pooled_projections"], torch.full((3, 2), -2.0))
    assert torch.equal(null["time_ids"], cond["time_ids"])  # SDXL micro-conditioning / Flux guidance kept
    dropped = c.drop(cond, 0.5, u=torch.tensor([0.1, 0.9, 0.4]))
    for k in ("encoder_hidden_states", "pooled_projections"):
        assert torch.equal(dropped[k][[0, 2]], null[k][[0, 2]]) and torch.equal(dropped[k][1], cond[k][1])
    assert c.encode(["", ""])["encoder_hidden_states"].eq(-1).all()  # the null prompt is the null condition
    assert c.key("a cat") == "a cat" and c.enumerate() is None and c.null_request == ""
    with pytest.raises(ValueError, match="give prompts"):
        c.parse(3)
    with pytest.raises(ValueError, match="pipeline folder"):
        c.encode(["a cat"])  # built from a null embedding alone: it cannot encode prompts
    with pytest.raises(ValueError, match="different models"):
        TextConditioner(["encoder_hidden_states"], null_embedding={"encoder_hidden_states": torch.zeros(1, 4, 5)},
                        width=3)


def test_a_text_conditioner_is_shared_by_copies_and_adds_embedded_guidance():
    c = _text(embedded_guidance=3.5)
    assert copy.deepcopy(c) is c  # EMA, generator and fake-score copies of a network share it
    assert c.encode([""] * 2)["guidance"].tolist() == [3.5, 3.5]


def test_encoding_mixes_prompts_and_null_rows(tmp_path):
    """encode(["a cat", "", "the dog"]): the prompts' embeddings where given, the null condition where "" (the
    zeros of SDXL's force_zeros_for_empty_prompt), equal to encoding them one by one."""
    from models.text_unet import TextConditionalUNet
    from models.tiny_pipelines import save_tiny_pipeline

    for kind in ("sd15", "sdxl"):
        net = TextConditionalUNet(str(save_tiny_pipeline(tmp_path / kind, kind)))
        c = net.conditioner
        mixed = c.encode(["a cat", "", "the dog"])
        alone = [c.encode([p]) for p in ("a cat", "", "the dog")]
        for k in c.text_keys:
            for i in range(3):
                torch.testing.assert_close(mixed[k][i], alone[i][k][0], rtol=0, atol=0)
        assert torch.equal(mixed[c.text_keys[0]][1], c.null_batch(1)[c.text_keys[0]][0])
    assert bool((c.null_batch(1)["text_embeds"] == 0).all())  # SDXL: zeros for the empty prompt


def test_the_prompt_encoder_is_built_once_per_process_in_a_text_dmd_run(tmp_path, monkeypatch):
    """A one-step DMD fit through the CLI on a tiny SD 1.5 folder (teacher, generator and LoRA fake score all from it;
    prompt data; validation with a prompt sample grid), then sampling the trained checkpoint through the CLI: the
    folder's tokenizer + text encoder are loaded once."""
    import yaml

    from models.text_encoders import PromptEncoder
    from tests.train.text_fits import TRAINER, TextWorkspace
    from train.cli import main

    ws = TextWorkspace(tmp_path)
    built = []
    original = PromptEncoder.__init__

    def counting(self, *args, **kwargs):
        built.append(args[0] if args else kwargs.get("kind"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(PromptEncoder, "__init__", counting)
    config = ws.config("dmd", "sd15")
    run = tmp_path / "run"
    trainer = {**TRAINER, "default_root_dir": str(run),
               "callbacks": [*TRAINER["callbacks"], {"class_path": "train.evaluation.callbacks.SampleMetrics",
                                                     "init_args": {"num_per_class": 1, "metrics": False}}]}
    (tmp_path / "dmd.yaml").write_text(yaml.safe_dump({"seed_everything": 0, **config, "trainer": trainer}))
    main(["fit", "--config", str(tmp_path / "dmd.yaml")])
    assert list((run / "samples").glob("*.png")), "the validation prompt grid was drawn"
    main(["sample", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--prompt", "a red car", "--num-per-prompt", "1",
          "--out", str(tmp_path / "samples")])
    assert built == ["clip"]
