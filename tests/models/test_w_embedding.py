"""Tests of models/w_embedding: the w-conditioned student equals its teacher exactly at init, and learns w."""
from __future__ import annotations

import copy

import pytest
import torch

from guidance.denoiser import Denoiser
from guidance.guided import GuidedDenoiser
from guidance.guiders import build_guider
from guidance.samplers import sample
from guidance.schedules import VPCosine
from models.adapters import ClassConditionalUNet
from models.w_embedding import GuidanceScaleEmbedding, WConditionedNetwork, WInputGuided, sinusoidal_embedding
from train.methods.guidance_distillation import inject_lora


def tiny_unet(seed: int = 0) -> ClassConditionalUNet:
    torch.manual_seed(seed)
    return ClassConditionalUNet(num_classes=4, sample_size=8, in_channels=1, block_out_channels=(16, 32),
                                attention_levels=(False, True), layers_per_block=1, norm_num_groups=8).eval()


def inputs(b: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, 8, 8, generator=g)
    t = torch.rand(b, generator=g) * 999
    labels = torch.tensor([0, 1, 2, 3, -1, 2])[:b]
    return x, t, labels


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5, 7.0, "per-sample"])
def test_student_equals_teacher_bit_for_bit_at_init(w):
    teacher = tiny_unet()
    student = WConditionedNetwork(copy.deepcopy(teacher)).eval()
    x, t, labels = inputs()
    wv = torch.tensor([0.0, 1.0, 2.0, 3.5, 5.0, 12.0]) if w == "per-sample" else torch.full((6,), w)
    with torch.no_grad():
        expected = teacher(x, t, labels)
        got = student(x, t, {"cond": labels, "w": wv})
    assert torch.equal(got, expected)


def test_student_with_lora_equals_teacher_at_init():
    teacher = tiny_unet()
    student = WConditionedNetwork(copy.deepcopy(teacher)).eval()
    inject_lora(student.base, rank=2, alpha=None, targets=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    assert any("lora_A" in n for n, _ in student.named_parameters())
    x, t, labels = inputs()
    with torch.no_grad():
        assert torch.equal(student(x, t, {"cond": labels, "w": torch.full((6,), 4.0)}), teacher(x, t, labels))


def test_w_enters_the_network_once_the_projection_is_nonzero():
    student = WConditionedNetwork(tiny_unet()).eval()
    torch.nn.init.normal_(student.w_embedding.linear_2.weight, std=0.5)
    x, t, labels = inputs()
    with torch.no_grad():
        a = student(x, t, {"cond": labels, "w": torch.full((6,), 1.0)})
        b = student(x, t, {"cond": labels, "w": torch.full((6,), 3.0)})
        c = student(x, t, {"cond": labels, "w": torch.tensor([1.0, 1.0, 1.0, 3.0, 3.0, 3.0])})
    assert (a - b).abs().amax() > 1e-3
    # per-sample: each sample sees its own w
    torch.testing.assert_close(c[:3], a[:3], rtol=0, atol=1e-6)
    torch.testing.assert_close(c[3:], b[3:], rtol=0, atol=1e-6)


def test_w_embedding_gets_gradients():
    student = WConditionedNetwork(tiny_unet()).train()
    x, t, labels = inputs()
    out = student(x, t, {"cond": labels, "w": torch.linspace(1, 5, 6)})
    out.pow(2).mean().backward()
    emb = student.w_embedding
    assert emb.linear_2.weight.grad is not None and emb.linear_2.weight.grad.abs().sum() > 0
    assert emb.linear_2.bias.grad.abs().sum() > 0
    # linear_1 sits behind the zero projection: no gradient at init, one after the projection moves
    assert emb.linear_1.weight.grad.abs().sum() == 0
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    student.zero_grad()
    student(x, t, {"cond": labels, "w": torch.linspace(1, 5, 6)}).pow(2).mean().backward()
    assert emb.linear_1.weight.grad.abs().sum() > 0


def test_deepcopy_rebinds_the_hook_to_the_copy():
    student = WConditionedNetwork(tiny_unet()).eval()
    twin = copy.deepcopy(student)
    torch.nn.init.normal_(twin.w_embedding.linear_2.weight, std=0.5)
    x, t, labels = inputs()
    cond = {"cond": labels, "w": torch.full((6,), 3.0)}
    with torch.no_grad():
        changed = (twin(x, t, cond) - student(x, t, cond)).abs().amax()
        unchanged = (student(x, t, cond) - WConditionedNetwork(tiny_unet()).eval()(x, t, cond)).abs().amax()
    assert changed > 1e-3 and unchanged == 0


def test_bare_unet_call_is_refused():
    student = WConditionedNetwork(tiny_unet()).eval()
    x, t, labels = inputs()
    with pytest.raises(RuntimeError, match="cond=\\{'cond'"):
        student.base(x, t, labels)


def test_null_and_drop_cond_keep_w():
    student = WConditionedNetwork(tiny_unet())
    w = torch.tensor([1.0, 2.0, 3.0])
    null = student.null_cond({"cond": torch.tensor([0, 1, 2]), "w": w})
    assert torch.equal(null["cond"], torch.full((3,), -1)) and null["w"] is w
    dropped = student.drop_cond({"cond": torch.tensor([0, 1, 2]), "w": w}, p=0.999999)
    assert torch.equal(dropped["cond"], torch.full((3,), -1)) and dropped["w"] is w


def test_cfg_over_student_batches_branches_with_w():
    """Dict conditions batch through the guided denoiser: CFG's two branches in one forward equal two calls."""
    student = WConditionedNetwork(tiny_unet()).eval()
    torch.nn.init.normal_(student.w_embedding.linear_2.weight, std=0.5)
    den = Denoiser(student, VPCosine(), "v")
    x, _, labels = inputs()
    t = torch.rand(6)
    w = torch.linspace(1, 4, 6)
    with torch.no_grad():
        guided = WInputGuided(den, build_guider("cfg"))
        out = guided(x, t, labels, w)
        c = den(x, t, {"cond": labels, "w": w}).x0
        u = den(x, t, {"cond": torch.full_like(labels, -1), "w": w}).x0
    torch.testing.assert_close(out.x0, u + w.view(-1, 1, 1, 1) * (c - u), rtol=1e-5, atol=1e-5)
    assert guided.nfe == 2


def test_student_sampling_costs_one_evaluation_per_step():
    teacher_net = tiny_unet()
    den = Denoiser(WConditionedNetwork(copy.deepcopy(teacher_net)).eval(), VPCosine(), "v")
    guided = WInputGuided(den)
    x = sample(guided, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), 3.0, steps=5)
    assert x.shape == (4, 1, 8, 8) and guided.nfe == 5
    # the same trajectory as the teacher's conditional sampling (w-embedding still zero)
    teacher = GuidedDenoiser(Denoiser(teacher_net, VPCosine(), "v"), build_guider("conditional"))
    torch.manual_seed(0)
    noise = torch.randn(4, 1, 8, 8)
    assert torch.equal(sample(guided, noise, torch.tensor([0, 1, 2, 3]), 3.0, steps=3),
                       sample(teacher, noise, torch.tensor([0, 1, 2, 3]), 3.0, steps=3))


def test_describe_records_the_w_embedding():
    student = WConditionedNetwork(tiny_unet(), embed_dim=12, hidden_dim=20, w_scale=100.0)
    d = student.describe()
    assert d["kind"] == "class" and d["num_classes"] == 4
    assert d["w_embedding"]["embed_dim"] == 12 and d["w_embedding"]["hidden_dim"] == 20
    assert d["w_embedding"]["out_dim"] == 64 and d["w_embedding"]["w_scale"] == 100.0
    assert student.num_classes == 4 and student.unet is student.base.unet


def test_unsupported_network_is_refused():
    with pytest.raises(ValueError, match="time_embedding"):
        WConditionedNetwork(torch.nn.Linear(2, 2))


def test_sinusoidal_embedding_values():
    e = sinusoidal_embedding(torch.tensor([0.0, 2.0]), 6)
    f = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(3) / 3)
    torch.testing.assert_close(e[1], torch.cat([torch.cos(2 * f), torch.sin(2 * f)]))
    torch.testing.assert_close(e[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    assert sinusoidal_embedding(torch.zeros(3), 7).shape == (3, 7)
    out = GuidanceScaleEmbedding(8, 5)(torch.tensor([1.0, 2.0]))
    assert out.shape == (2, 5) and torch.equal(out, torch.zeros(2, 5))
