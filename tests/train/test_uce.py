"""Closed-form erasure (UCE, train.methods.uce.ClosedFormErasure) fitted through the CLI on the tiny SD 1.5 folder:
only the cross-attention key/value projections change, each to UCE's solution computed here from the frozen weights
and embeddings taken independently through the diffusers pipeline's own prompt encoding; the export carries the
edited weights into StableDiffusionPipeline; settings UCE cannot honour, and networks with no projection it edits,
are refused (SD3 and Flux: tests/train/test_uce_mmdit.py)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from losses.uce import uce_weight
from tests.train.text_fits import PROMPTS


@pytest.fixture(scope="module")
def uce(t2i_workspace):
    from train.runtime.checkpoint import load_method

    ckpt = t2i_workspace.fitted("uce", "sd15")
    return ckpt, load_method(ckpt)


def pipeline_last_words(pipe, prompts: list[str]) -> torch.Tensor:
    """The diffusers pipeline's own prompt embeddings at each prompt's last word token (before end-of-text)."""
    hidden, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    lengths = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").attention_mask.sum(1)
    return hidden[torch.arange(len(prompts)), lengths - 2]


def test_only_cross_attention_keys_and_values_change_each_to_the_closed_form(uce, t2i_workspace):
    from diffusers import StableDiffusionPipeline

    _, module = uce
    pipe = StableDiffusionPipeline.from_pretrained(t2i_workspace.model("sd15"), local_files_only=True)
    erase = pipeline_last_words(pipe, ["a cat", "the cat", "a red car"])  # the spec's erased prompts, in order
    guide = pipeline_last_words(pipe, ["", "", "a car"])                   # empty prompt; car's alternative
    preserve = pipeline_last_words(pipe, ["the dog"])                      # the anchor
    frozen, edited = module.frozen.net.unet.state_dict(), module.student.net.unet.state_dict()
    changed = {k for k in frozen if not torch.equal(frozen[k], edited[k])}
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
    assert len(changed) == len([k for k in frozen if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))])
    for key in changed:
        want = uce_weight(frozen[key], erase, guide, preserve, 1.0, 1.0, 0.5)
        torch.testing.assert_close(edited[key], want, rtol=1e-5, atol=1e-6)
    assert bool(module.edited) and module.erased_requests() == ["a cat", "the cat", "a red car"]


def test_the_erased_model_samples_and_exports_its_edited_weights(uce, tmp_path):
    from diffusers import UNet2DConditionModel

    from train.cli import main

    ckpt, module = uce
    latents, nfe = module.generate(PROMPTS, scale=3.0, steps=2)
    assert latents.shape == (2, 4, 8, 8) and nfe == 4 and torch.isfinite(latents).all()
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "export")])
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "export" / "unet")
    ours = module.student.net.unet.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in unet.state_dict().items())


def test_settings_uce_cannot_honour_are_refused(t2i_workspace, tiny_teacher_ckpt, tmp_path, capsys):
    import yaml

    from tests.train.text_fits import TRAINER
    from train.cli import main
    from train.methods.uce import ClosedFormErasure, uce_projections

    with pytest.raises(ValueError, match="takes class labels"):
        ClosedFormErasure(model=str(tiny_teacher_ckpt), concepts=[3])
    with pytest.raises(ValueError, match=r"context_embedder .* this network has none") as e:
        uce_projections(torch.nn.Sequential(torch.nn.Linear(2, 2)), None)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="lamb > 0"):
        ClosedFormErasure(model=str(t2i_workspace.model("sd15")), concepts=["a cat"], lamb=0.0)
    config = t2i_workspace.config("uce", "sd15")
    trainer = {**TRAINER, **config.pop("trainer"), "max_steps": 3, "default_root_dir": str(tmp_path / "run")}
    (tmp_path / "uce.yaml").write_text(yaml.safe_dump({**config, "trainer": trainer}))
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(tmp_path / "uce.yaml")])
    assert e.value.code == 2 and "set trainer.max_steps: 1" in capsys.readouterr().err
