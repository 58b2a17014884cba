"""UCE on MMDiT transformers (train.methods.uce.ClosedFormErasure on the tiny SD3 and Flux folders): only
context_embedder and the pooled text projection change, each to UCE's closed form computed here from rows taken through
the diffusers pipeline's own prompt encoding; with a vanishing lamb the preserved rows keep their projections and the
erased rows take their guides', and so does the whole transformer on conditions made of those rows (nothing else of a
prompt reaches it); the CLI fit exports into StableDiffusion3Pipeline / FluxPipeline; text teacher checkpoints of these
families are edited through the same layers."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from losses.uce import uce_weight
from tests.train.text_fits import CONCEPTS, PIPELINES

TOKENS, POOLED = "transformer.context_embedder", "transformer.time_text_embed.text_embedder.linear_1"
ERASED, GUIDES, ANCHORS = ["a cat", "the cat", "a red car"], ["", "", "a car"], ["the dog"]  # CONCEPTS, in order


@pytest.fixture(scope="module", params=["sd3", "flux"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def fitted(kind, t2i_workspace):
    """(checkpoint, module) of UCE fitted through the CLI on the tiny folder with the authors' scales (the method
    matrix's fit)."""
    from train.runtime.checkpoint import load_method

    ckpt = t2i_workspace.fitted("uce", kind)
    return ckpt, load_method(ckpt)


@pytest.fixture(scope="module")
def exact(kind, t2i_workspace):
    """UCE with lamb 1e-8 (built and edited in-process): the least-squares terms alone, which the rows (8 SD3, 4 Flux
    of 48 and 32 dimensions, independent) can satisfy exactly."""
    from train.methods.uce import ClosedFormErasure

    module = ClosedFormErasure(model=str(t2i_workspace.model(kind)), concepts=CONCEPTS, lamb=1e-8, val_samples=0)
    module.apply_edit()
    return module


def pipeline_rows(pipe, kind: str, prompts: list[str]) -> dict[str, torch.Tensor]:
    """{layer: rows} through the diffusers pipeline's own prompt encoding: context_embedder's rows are the token
    embeddings at each prompt's last word (before CLIP's and T5's end token) of each stream, prompt-major (SD3: CLIP's,
    then T5's after CLIP's model_max_length tokens; Flux: T5's); the pooled projection's are the pooled embeddings."""
    def last(tok, length):
        tokens = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return (tokens.attention_mask.sum(1) - 2).clamp(min=0)

    if kind == "sd3":
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, None, None, "cpu", 1, False)
        clip = pipe.tokenizer.model_max_length
        positions = torch.stack([last(pipe.tokenizer, clip), clip + last(pipe.tokenizer_3, 256)], 1)
    else:
        hidden, pooled, _ = pipe.encode_prompt(prompts, None, "cpu", 1)
        positions = last(pipe.tokenizer_2, 512)[:, None]
    rows = hidden[torch.arange(len(prompts))[:, None], positions]
    return {TOKENS: rows.flatten(0, 1), POOLED: pooled}


def test_only_the_text_projections_change_each_to_the_closed_form(fitted, kind, t2i_workspace):
    import diffusers

    _, module = fitted
    pipe = getattr(diffusers, PIPELINES[kind]).from_pretrained(t2i_workspace.model(kind), local_files_only=True)
    erase, guide, preserve = (pipeline_rows(pipe, kind, p) for p in (ERASED, GUIDES, ANCHORS))
    frozen, edited = module.frozen.net.state_dict(), module.student.net.state_dict()
    changed = {k for k in frozen if not torch.equal(frozen[k], edited[k])}
    assert changed == {f"{TOKENS}.weight", f"{POOLED}.weight"}  # the biases cancel in UCE's terms: kept
    assert erase[TOKENS].shape[0] == (6 if kind == "sd3" else 3)  # two token streams in SD3, T5's alone in Flux
    for layer in (TOKENS, POOLED):
        want = uce_weight(frozen[f"{layer}.weight"], erase[layer], guide[layer], preserve[layer], 1.0, 1.0, 0.5)
        torch.testing.assert_close(edited[f"{layer}.weight"], want, rtol=1e-5, atol=1e-6)
    assert bool(module.edited) and module.erased_requests() == ERASED


def test_preserved_rows_keep_their_projections_and_erased_rows_take_their_guides(exact):
    frozen = dict(exact.frozen.net.named_modules())
    for name, (layer, rows) in exact.projections.items():
        erase, guide, preserve = exact.embeddings(rows)
        torch.testing.assert_close(layer(preserve), frozen[name](preserve), rtol=0, atol=1e-5)
        torch.testing.assert_close(layer(erase), frozen[name](guide), rtol=0, atol=1e-5)
        assert (frozen[name](erase) - frozen[name](guide)).abs().max() > 0.1  # they were far apart before the edit


def rows_condition(module, prompt: str) -> dict[str, torch.Tensor]:
    """The condition of `prompt` whose tokens are its rows of context_embedder alone (its last-word tokens), with its
    pooled embedding (and Flux's embedded guidance): everything of the prompt the transformer reads is a row UCE
    pinned."""
    cond = module.encode([prompt])
    tokens = module.projections[TOKENS][1]([prompt])[0]
    return {**cond, "encoder_hidden_states": tokens[None]}


def test_the_transformer_gives_the_guides_output_for_erased_rows_and_keeps_the_anchors(exact):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *exact.sample_shape(), generator=g)
    t = torch.tensor([700.0])
    student, frozen = exact.student.net, exact.frozen.net
    with torch.no_grad():
        anchor = rows_condition(exact, "the dog")
        torch.testing.assert_close(student(x, t, anchor), frozen(x, t, anchor), rtol=0, atol=1e-5)
        for erased, guide in zip(ERASED, GUIDES):
            erased_out = student(x, t, rows_condition(exact, erased))
            guide_out = frozen(x, t, rows_condition(exact, guide))
            torch.testing.assert_close(erased_out, guide_out, rtol=0, atol=1e-5)
            assert (frozen(x, t, rows_condition(exact, erased)) - guide_out).abs().max() > 1e-3


def test_the_cli_fit_exports_into_the_diffusers_pipeline(fitted, kind, tmp_path):
    import diffusers

    from models.text_transformer import pack_latents
    from train.cli import main

    ckpt, module = fitted
    latents, nfe = module.generate(["a cat", "the dog"], scale=3.0, steps=2)
    assert torch.isfinite(latents).all() and nfe >= 2
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "export")])
    pipe = getattr(diffusers, PIPELINES[kind]).from_pretrained(tmp_path / "export", local_files_only=True)
    ours = module.student.net.transformer.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in pipe.transformer.state_dict().items())
    noise = torch.randn(1, *latents.shape[1:], generator=torch.Generator().manual_seed(0))
    size = {"height": 16, "width": 16} if kind == "flux" else {}
    out = pipe("a cat", num_inference_steps=1, latents=pack_latents(noise) if kind == "flux" else noise,
               output_type="latent", **size).images
    assert torch.isfinite(out).all()


def test_a_text_teacher_checkpoint_is_edited_through_the_same_layers(kind, t2i_workspace):
    from train.methods.uce import ClosedFormErasure

    teacher = t2i_workspace.fitted("teacher", kind)
    module = ClosedFormErasure(model=str(teacher), concepts=["a cat"], anchors=["the dog"], val_samples=0)
    assert set(module.layers) == {TOKENS, POOLED}
    module.apply_edit()
    frozen = dict(module.frozen.net.named_modules())
    for name, (layer, rows) in module.projections.items():
        erase, guide, preserve = module.embeddings(rows)
        torch.testing.assert_close(layer.weight, uce_weight(frozen[name].weight, erase, guide, preserve), rtol=1e-5,
                                   atol=1e-6)
