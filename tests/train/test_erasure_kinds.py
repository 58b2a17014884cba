"""ConceptErasure's features on both kinds of model: the tiny digits teacher (class ids) and a tiny SD 1.5 folder
(prompts): ESD-x, ESD-u, erase toward, the ANT window, rank-1 LoRA, SalUn, real-data batches (labels, captions),
several concepts, anchors; each a few training steps plus exact checks of the targets it builds."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import lightning as L
import pytest
import torch

from data.steps import ErasureSteps
from guidance.conditions import cond_cat
from losses.erasure import ant_target, esd_target, preservation_target, toward_target
from models.conditioning import ClassConditioner
from models.param_select import adapters_disabled, conditioning_parameter_names
from train.methods.erasure import ConceptErasure
from train.methods.erasure_concepts import resolve_concepts

torch.set_num_threads(1)
STEPS = torch.zeros(1, dtype=torch.long)  # an ErasureSteps batch
TINY = dict(batch_size=4, trajectory_steps=2, bank_size=2, val_samples=0)


@dataclass
class Kind:
    """A model to erase from and what to erase: two concepts, their alternatives, anchors, a data batch and module."""

    model: str
    concepts: Any                  # two concepts (list shorthand or spec)
    targets: list                  # one alternative per concept
    anchors: list
    batch: tuple                   # (samples, requests) of a data batch
    data: Callable[[], L.LightningDataModule]


@pytest.fixture(scope="module", params=["digits", "sd15"])
def kind(request, tiny_teacher_ckpt, t2i_workspace) -> Kind:
    if request.param == "digits":
        from data.digits import DigitsDataModule, digits_tensors

        images, labels = digits_tensors("validation")
        return Kind(str(tiny_teacher_ckpt), [3, 7], [5, 1], [0, 1], (images[:40], labels[:40]),
                    lambda: DigitsDataModule(batch_size=32))
    from data.captions import CaptionedImageDataModule

    ws = t2i_workspace
    spec = {"concepts": [{"name": "cat", "prompts": ["a cat", "the cat"]}, {"name": "car", "prompts": ["a red car"]}]}
    captions = ["a cat", "the dog", "a red car", "the cat", "a car", "the dog"]
    return Kind(str(ws.model("sd15")), spec, ["a dog", "a car"], ["the dog"],
                (torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0)), captions),
                lambda: CaptionedImageDataModule(str(ws.images), image_size=16, batch_size=4, val_size=2))


def build(kind: Kind, **args) -> ConceptErasure:
    return ConceptErasure(model=kind.model, **{"concepts": kind.concepts, **TINY, **args})


def fit(module: ConceptErasure, data: L.LightningDataModule | None = None, steps: int = 2) -> list[str]:
    """Train `steps` steps; the names of the student's parameters that changed."""
    before = {n: p.detach().clone() for n, p in module.student.net.named_parameters()}
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(module, data or ErasureSteps(steps_per_epoch=steps))
    return [n for n, p in module.student.net.named_parameters() if not torch.equal(p, before[n])]


def encode_each(module: ConceptErasure, requests: list) -> Any:
    """The condition of requests, each encoded alone (as a user encodes one prompt)."""
    return cond_cat([module.conditioner.encode([r], module.device) for r in requests])


def group(module: ConceptErasure, term: str, seed: int = 0, batch=STEPS):
    return next(g for g in module._groups(batch, torch.Generator().manual_seed(seed)) if g.term == term)


def test_the_erase_target_is_esd_on_the_frozen_model_with_the_requests_encoding(kind):
    m = build(kind, eta=1.5, loss_space="eps")
    g = group(m, "erase")
    assert len(set(g.requests)) == 1 and g.requests[0] in m.erased_requests()  # concept_sampling="one"
    want = esd_target(m.frozen, g.x_t, g.t, encode_each(m, g.requests), 1.5, "eps")
    torch.testing.assert_close(m._target(g), want, rtol=0, atol=0)  # Gandikota et al. 2023, Eq. 6
    terms = m.losses(STEPS, torch.Generator().manual_seed(0))
    assert set(terms) == {"erase", "anchor", "uncond"} or set(terms) == {"erase", "uncond"}
    assert terms["erase"] > 0 and terms["uncond"] < 1e-10  # the student starts as the frozen model


def test_esd_x_trains_only_where_the_condition_enters(kind):
    m = build(kind, params="esd-x", lr=0.05)
    changed = fit(m)
    assert changed and set(changed) <= set(conditioning_parameter_names(m.student.net)), changed


def test_esd_u_trains_everything_but_where_the_condition_enters(kind):
    m = build(kind, params="esd-u", lr=1e-3)
    changed = fit(m)
    assert changed and not set(changed) & set(conditioning_parameter_names(m.student.net)), changed


def test_erase_toward_regresses_the_frozen_prediction_for_the_alternative(kind):
    m = build(kind, targets=kind.targets, lr=1e-3, concept_sampling="all", batch_size=6)
    g = group(m, "erase", seed=1)
    alts = [kind.targets[0] if any(r in c for c in m.spec.requests[:1]) else kind.targets[1] for r in g.requests]
    alts = [m.conditioner.parse(a) for a in alts]
    assert len(set(alts)) == 2  # both concepts, each toward its own alternative
    want = toward_target(m.frozen, g.x_t, g.t, encode_each(m, alts), 1.0, m.space)
    torch.testing.assert_close(m._target(g), want, rtol=0, atol=0)  # All but One, arXiv 2312.12807
    away = build(kind, targets=kind.targets, toward_scale=3.0, toward_away=True)
    want = toward_target(away.frozen, g.x_t, g.t, encode_each(m, alts), 3.0, m.space, source_cond=g.cond)
    torch.testing.assert_close(away.erase_target(g.x_t, g.t, g.requests), want, rtol=0, atol=0)
    assert fit(m)


def test_the_ant_window_erases_late_and_keeps_the_frozen_prediction_early(kind):
    # t from the training distribution (the frozen bank), so that one group straddles the window; at eta = 1 ANT's
    # early target e_0 + eta (e_p - e_0) is the frozen conditional prediction
    m = build(kind, t_window=0.5, eta=1.0, batch_size=8, lr=1e-3, x_t_source="frozen_bank")
    g = group(m, "erase")
    inside = g.t <= 0.5
    assert 0 < int(inside.sum()) < len(g.t)
    got = m._target(g)
    torch.testing.assert_close(got, ant_target(m.frozen, g.x_t, g.t, g.cond, 1.0, 0.5, m.space), rtol=0, atol=0)
    frozen = preservation_target(m.frozen, g.x_t, g.t, g.cond, m.space)
    torch.testing.assert_close(got[~inside], frozen[~inside])  # ANT, arXiv 2504.12782: the frozen field early
    torch.testing.assert_close(got[inside], esd_target(m.frozen, g.x_t, g.t, g.cond, 1.0, m.space)[inside])
    toward = build(kind, t_window=0.5, targets=kind.targets, x_t_source="frozen_bank")
    got = toward.erase_target(g.x_t, g.t, g.requests)
    torch.testing.assert_close(got[~inside], frozen[~inside])
    assert fit(m)


def test_rank_one_lora_trains_only_adapters_and_switches_off_to_the_frozen_model(kind):
    m = build(kind, params="lora", lora_rank=1, lr=0.05)
    assert m.trainable_names and all(".lora_" in n for n in m.trainable_names)
    lora_a = [p for n, p in m.student.net.named_parameters() if ".lora_A." in n]
    assert lora_a and all(min(p.shape) == 1 for p in lora_a)  # SPM's one-dimensional adapters, arXiv 2312.16145
    changed = fit(m)
    assert changed and all(".lora_" in n for n in changed)
    g = group(m, "erase")
    with torch.no_grad(), adapters_disabled(m.student.net):
        torch.testing.assert_close(m.student(g.x_t, g.t, g.cond).x0, m.frozen(g.x_t, g.t, g.cond).x0, rtol=0, atol=0)


def test_salun_updates_only_the_salient_weights(kind):
    m = build(kind, params="esd-u", saliency_top_k=0.2, saliency_batches=2, lr=1e-3)
    before = {n: p.detach().clone() for n, p in m.student.net.named_parameters() if p.requires_grad}
    fit(m)
    assert m.saliency.fraction() == pytest.approx(0.2, abs=1 / m.num_trainable)  # SalUn, arXiv 2310.12508
    moved = 0
    for (n, p), mask in zip([(n, p) for n, p in m.student.net.named_parameters() if p.requires_grad], m.saliency.masks()):
        diff = p.detach() != before[n]
        assert not (diff & ~mask).any(), n
        moved += int(diff.sum())
    assert moved > 0


def test_data_batches_take_x_t_from_real_samples_by_request_key(kind):
    m = build(kind, anchors=kind.anchors, concept_sampling="all", lr=1e-3)
    samples, raw = kind.batch
    requests = m.conditioner.parse_all(raw)
    groups = {g.term: g for g in m._groups((samples, raw), torch.Generator().manual_seed(0))}
    erased, anchors = set(m.erased_requests()), set(m.spec.anchors)
    assert groups["erase"].requests == [r for r in requests if r in erased] and groups["erase"].requests
    assert groups["anchor"].requests == [r for r in requests if r in anchors] and groups["anchor"].requests
    assert len(groups["uncond"].x_t) == len(requests)
    rows = [i for i, r in enumerate(requests) if r in erased]
    full = m.encode(raw)
    cond = {k: v[rows] for k, v in full.items()} if isinstance(full, dict) else full[rows]
    torch.testing.assert_close(groups["erase"].cond, cond, rtol=0, atol=0)
    one = build(kind, anchors=kind.anchors, concept_sampling="one")
    for seed in range(4):  # "one": the samples of the step's concept only
        reqs = group(one, "erase", seed, (samples, raw)).requests
        assert any(set(reqs) <= set(c) for c in one.spec.requests), reqs
    assert fit(m, kind.data())


def test_several_concepts_one_per_step_or_one_per_sample(kind):
    one = build(kind, concept_sampling="one", batch_size=8)
    drawn = [group(one, "erase", seed).requests for seed in range(24)]
    assert all(len(set(d)) == 1 for d in drawn)
    assert {d[0] for d in drawn} == set(one.erased_requests())  # every concept's requests get steps
    every = build(kind, concept_sampling="all", batch_size=16)
    assert set(group(every, "erase").requests) == set(every.erased_requests())
    assert fit(every) and len(every.spec.names) == 2


def test_anchors_default_given_and_weighted(kind):
    m = build(kind)
    if m.conditioner.enumerate() is None:  # prompts: no anchors unless given
        assert m.spec.anchors == () and [g.term for g in m._groups(STEPS)] == ["erase", "uncond"]
    else:  # every other class
        assert list(m.spec.anchors) == [c for c in m.conditioner.enumerate() if c not in m.erased_requests()]
    m = build(kind, anchors=kind.anchors, batch_size=6, lr=1e-3)
    g = group(m, "anchor")
    assert set(g.requests) <= set(m.spec.anchors)
    want = preservation_target(m.frozen, g.x_t, g.t, encode_each(m, g.requests), m.space)
    torch.testing.assert_close(m._target(g), want, rtol=0, atol=0)  # SPM latent anchoring, arXiv 2312.16145
    assert m.losses(STEPS)["anchor"] < 1e-10
    assert [g.term for g in build(kind, anchors=kind.anchors, anchor_weight=0.0, uncond_weight=0.0)._groups(STEPS)] \
        == ["erase"]
    assert fit(m)


def test_concepts_resolve_against_the_conditioner():
    named = ClassConditioner(10, names=[f"d{i}" for i in range(10)])
    spec = resolve_concepts(["d3", {"name": "seven", "classes": [7], "alternative": "d1"}], None, ["d0", 2], named)
    assert spec.requests == ((3,), (7,)) and spec.alternatives == (None, 1) and spec.anchors == (0, 2)
    assert spec.names == ("d3", "seven") and spec.erased == [(3, 0), (7, 1)]
    assert resolve_concepts([3], [8], None, named).alternatives == (8,)
    for bad, match in [(([3], ["d3"], None), "must not include"), ((["d3", 3], None, None), "distinct classes"),
                       (([3], None, ["d3"]), "not erased"), (({"concepts": [3], "anchors": [1]}, None, [2]), "not both"),
                       ((["three"], None, None), r"classes in 0..9 \(or names: d0")]:
        with pytest.raises(ValueError, match=match):
            resolve_concepts(*bad, named)
