"""Closed-form erasure (UCE, train.methods.uce.ClosedFormErasure) fitted through the CLI on the tiny SD 1.5 folder:
only the cross-attention key/value projections change, each to UCE's solution computed here from the frozen weights
and embeddings taken independently through the diffusers pipeline's own prompt encoding; the export carries the
edited weights into StableDiffusionPipeline; settings UCE cannot honour, and networks with no projection it edits,
are refused (SD3 and Flux: tests/train/test_uce_mmdit.py). token_rows from_last_word: its rows are each prompt's states
from the hand-read last-word position on, the weights UCE's solution on them, and at a vanishing lamb the UNet on an
erased prompt's end and padding states gives the guide's output (which the last word alone does not)."""
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


# Where each prompt's last word sits on the tiny SD 1.5 tokenizer (16 tokens, padded with <eos>), read by hand:
# <bos> a cat <eos>..., <bos> the cat ..., <bos> a r e d</w> c a r</w> ..., <bos> a c a r</w> ..., <bos> the dog ...,
# and <bos> <eos>... for the empty prompt, whose "last word" is its start token.
LAST_WORD = {"a cat": 2, "the cat": 2, "a red car": 7, "a car": 4, "the dog": 2, "": 0}


@pytest.fixture(scope="module")
def uce_from_last_word(t2i_workspace):
    from train.runtime.checkpoint import load_method

    return load_method(t2i_workspace.fitted("uce", "sd15", token_rows="from_last_word"))


def pipeline_states(pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """{prompt: [L, D]}: the diffusers pipeline's own prompt embeddings, every position."""
    hidden, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    return dict(zip(prompts, hidden))


def test_from_last_word_rows_are_the_last_word_and_every_position_after_it(uce_from_last_word, t2i_workspace):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(t2i_workspace.model("sd15"), local_files_only=True)
    states = pipeline_states(pipe, list(LAST_WORD))
    _, rows = next(iter(uce_from_last_word.projections.values()))
    blocks = rows(list(LAST_WORD))
    assert [len(b) for b in blocks] == [14, 14, 9, 12, 14, 16]  # 16 - the last word's position
    for (prompt, start), block in zip(LAST_WORD.items(), blocks):
        torch.testing.assert_close(block, states[prompt][start:], rtol=0, atol=1e-6)


def test_from_last_word_weights_are_the_closed_form_on_those_rows(uce_from_last_word, t2i_workspace):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(t2i_workspace.model("sd15"), local_files_only=True)
    s = pipeline_states(pipe, list(LAST_WORD))
    # each erased row paired with its guide's row at the same offset from the guide's last word, truncated to the
    # shorter block: "a cat" 2..15 with "" 0..13, "a red car" 7..15 with "a car" 4..12
    erase = torch.cat([s["a cat"][2:], s["the cat"][2:], s["a red car"][7:]])
    guide = torch.cat([s[""][:14], s[""][:14], s["a car"][4:13]])
    preserve = s["the dog"][2:]
    frozen, edited = uce_from_last_word.frozen.net.unet.state_dict(), uce_from_last_word.student.net.unet.state_dict()
    changed = {k for k in frozen if not torch.equal(frozen[k], edited[k])}
    assert changed == {k for k in frozen if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    for key in changed:
        want = uce_weight(frozen[key], erase, guide, preserve, 1.0, 1.0, 0.5)
        torch.testing.assert_close(edited[key], want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def pinned(t2i_workspace):
    """{token_rows: UCE erasing "a cat" (guide "") with anchor "the dog" at lamb 1e-8}: the least-squares terms alone,
    which from_last_word's 28 rows (of 32 dimensions, independent) satisfy exactly."""
    from train.methods.uce import ClosedFormErasure

    modules = {}
    for token_rows in ("last_word", "from_last_word"):
        module = ClosedFormErasure(model=str(t2i_workspace.model("sd15")), concepts=["a cat"], anchors=["the dog"],
                                   token_rows=token_rows, lamb=1e-8, val_samples=0)
        module.apply_edit()
        modules[token_rows] = module
    return modules


def test_from_last_word_pins_the_end_and_padding_states_that_the_last_word_leaves(pinned):
    """The UNet reads every position of the condition; on the erased prompt's states from its last word on (the last
    word, <eos> and padding), the edited UNet gives what the original gives on the guide's, and keeps the anchor's,
    with from_last_word; with last_word only the last word's row is pinned and the output stays the erased prompt's."""
    g = torch.Generator().manual_seed(0)
    encoder = pinned["last_word"].conditioner.encoder
    erased = encoder.from_last_word_embeddings(["a cat"])[0]
    guide = encoder.from_last_word_embeddings([""])[0][:len(erased)]
    anchor = encoder.from_last_word_embeddings(["the dog"])[0]
    x, t = torch.randn(1, *pinned["last_word"].sample_shape(), generator=g), torch.tensor([700.0])

    def out(net, states):
        with torch.no_grad():
            return net(x, t, {"encoder_hidden_states": states[None]})

    frozen = pinned["last_word"].frozen.net
    want = out(frozen, guide)
    assert (out(frozen, erased) - want).abs().max() > 1e-2  # far apart before the edit
    student = pinned["from_last_word"].student.net
    torch.testing.assert_close(out(student, erased), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(out(student, anchor), out(frozen, anchor), rtol=0, atol=1e-5)
    assert (out(pinned["last_word"].student.net, erased) - want).abs().max() > 1e-2


def test_from_last_word_is_refused_for_t5_token_streams_and_unknown_rows_in_one_line():
    from models.text_encoders import PromptEncoder
    from models.tiny_pipelines import tiny_clip_text_encoder, tiny_clip_tokenizer
    from train.methods.uce import uce_projections

    mmdit = torch.nn.ModuleDict({"context_embedder": torch.nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="T5's bidirectional tokens .* use token_rows: last_word") as e:
        uce_projections(mmdit, None, "from_last_word")
    with pytest.raises(ValueError, match="token_rows must be one of last_word, from_last_word") as f:
        uce_projections(mmdit, None, "first_word")
    tok = tiny_clip_tokenizer()
    sd3 = PromptEncoder("sd3", [tok, tok, None], [tiny_clip_text_encoder(tok), tiny_clip_text_encoder(tok), None],
                        t5_dim=64)
    with pytest.raises(ValueError, match="causal CLIP token streams .* 'sd3'") as g:
        sd3.from_last_word_embeddings(["a cat"])
    assert all("\n" not in str(x.value) for x in (e, f, g))
