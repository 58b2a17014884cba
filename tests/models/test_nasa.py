"""Negative-Away Steer Attention (NASA; SNOOPI, arXiv 2412.02687) processors: a cross-attention layer returns
to_out(Attn(Q, K+, V+) - alpha Attn(Q, K-, V-)) against a hand-written softmax attention, alpha 0 is diffusers' own
processor bit for bit, only the cross-attention layers of a UNet are swapped and restored, and networks without
cross-attention (class-label UNets, SD3's joint attention) are refused."""
from __future__ import annotations

import pytest
import torch

from models.nasa_attention import NegativeAwaySteerAttention, cross_attention_modules, negative_away_attention


def _layer(dtype=torch.float64):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, bias=True).to(dtype)
    attn.set_processor(AttnProcessor2_0())
    return attn


def _hand_attention(attn, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, heads concatenated: [B, N, H d] (before the output projection)."""
    q, k, v = attn.to_q(x), attn.to_k(c), attn.to_v(c)
    d, outs = 4, []
    for h in range(attn.heads):
        qh, kh, vh = (t[..., h * d:(h + 1) * d] for t in (q, k, v))
        w = torch.exp(qh @ kh.transpose(1, 2) / d ** 0.5)
        outs.append((w / w.sum(-1, keepdim=True)) @ vh)
    return torch.cat(outs, -1)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
def test_the_processor_is_the_hand_computed_nasa_combination(alpha):
    attn = _layer()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    pos, neg = (torch.randn(3, 7, 6, generator=g, dtype=torch.float64) for _ in range(2))
    attn.set_processor(NegativeAwaySteerAttention(neg, alpha))
    with torch.no_grad():
        ours = attn(x, encoder_hidden_states=pos)
        z = _hand_attention(attn, x, pos) - alpha * _hand_attention(attn, x, neg)
        expected = attn.to_out[0](z)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    if alpha:  # the negative matters, and a different negative gives a different output
        with torch.no_grad():
            other = NegativeAwaySteerAttention(torch.randn(3, 7, 6, generator=g, dtype=torch.float64), alpha)(
                attn, x, pos)
        assert (other - ours).abs().max() > 1e-3


def test_alpha_zero_is_diffusers_attention_bit_for_bit():
    attn = _layer(torch.float32)
    g = torch.Generator().manual_seed(2)
    x, pos, neg = torch.randn(2, 5, 8, generator=g), torch.randn(2, 7, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    with torch.no_grad():
        plain = attn(x, encoder_hidden_states=pos)
        attn.set_processor(NegativeAwaySteerAttention(neg, 0.0))
        assert torch.equal(attn(x, encoder_hidden_states=pos), plain)


def _unet_and_condition(tiny_sd_folder, kind: str = "sd15"):
    from models.text_to_image import TextToImage

    t2i = TextToImage.from_pretrained(str(tiny_sd_folder(kind)), with_vae=False)
    enc = t2i.net.conditioner.encode
    return t2i.net, enc(["a cat", "the dog"]), enc(["a red car", "a red car"])


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_only_the_cross_attention_layers_of_a_unet_are_swapped_and_restored(tiny_sd_folder, kind):
    net, cond, neg = _unet_and_condition(tiny_sd_folder, kind)
    cross = cross_attention_modules(net)
    assert cross and all(name.endswith("attn2") for name, _ in cross)
    before = {n: m.processor for n, m in net.named_modules() if hasattr(m, "processor")}
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((2,), 500.0)
    with torch.no_grad():
        plain = net(x, t, cond)
        with negative_away_attention(net, neg["encoder_hidden_states"], 0.0):
            assert all(isinstance(m.processor, NegativeAwaySteerAttention) for _, m in cross)
            assert not any(isinstance(m.processor, NegativeAwaySteerAttention) for n, m in net.named_modules()
                           if n.endswith("attn1"))
            zero = net(x, t, cond)
        with negative_away_attention(net, neg["encoder_hidden_states"], 1.5):
            steered = net(x, t, cond)
    assert {n: m.processor for n, m in net.named_modules() if hasattr(m, "processor")} == before
    assert torch.equal(zero, plain)  # alpha 0: the network unchanged, bit for bit
    assert (steered - plain).abs().max() > 1e-3


def test_a_batch_that_is_not_the_negatives_is_refused(tiny_sd_folder):
    net, cond, neg = _unet_and_condition(tiny_sd_folder)
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 500.0)
    with pytest.raises(ValueError, match="holds 1 negative conditions but the network was called on a batch of 2"):
        with torch.no_grad(), negative_away_attention(net, neg["encoder_hidden_states"][:1], 1.0):
            net(x, t, cond)
    with pytest.raises(ValueError, match="alpha must be a finite value >= 0"):
        NegativeAwaySteerAttention(neg["encoder_hidden_states"], -1.0)


def test_networks_without_cross_attention_are_refused(tiny_sd_folder):
    from models.adapters import ClassConditionalUNet
    from models.text_transformer import SD3Transformer

    digits = ClassConditionalUNet(num_classes=10, sample_size=8, in_channels=1, block_out_channels=[16, 32],
                                  attention_levels=[False, True], layers_per_block=1, norm_num_groups=8)
    sd3 = SD3Transformer(str(tiny_sd_folder("sd3")), max_sequence_length=32)
    for net in (digits, sd3):
        assert cross_attention_modules(net) == []
        with pytest.raises(ValueError, match="has no cross-attention layers for NASA"):
            with negative_away_attention(net, torch.zeros(1, 2, 3), 1.0):
                pass
