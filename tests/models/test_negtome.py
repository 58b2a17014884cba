"""Negative Token Merging (NegToMe; arXiv 2412.01339): the merge against a hand-written per-token loop, alpha 0 and
times outside the window are diffusers' attention bit for bit, the reference sample of a batch is untouched while the
others move, in text and class UNets; networks without UNet self-attention are refused."""
from __future__ import annotations

import pytest
import torch

from models.negtome_attention import negative_token_merge, negative_token_merging, self_attention_modules


def test_the_merge_is_the_hand_computed_extrapolation_away_from_the_best_match():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    tokens[1, 2] = 2.0 * tokens[0, 4]  # cosine 1 with reference token 4: pushed from it
    alpha, threshold = 0.9, 0.8
    expected = tokens.clone()
    pushed = 0
    for b in (1, 2):
        for i in range(6):
            x = tokens[b, i]
            cos = [float(x @ r / (x.norm() * r.norm())) for r in tokens[0]]
            j = max(range(6), key=lambda k: cos[k])
            if cos[j] > threshold:
                expected[b, i] = x + alpha * (x - tokens[0, j])
                pushed += 1
    ours = negative_token_merge(tokens, alpha, threshold)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    assert 0 < pushed < 12 and torch.equal(ours[0], tokens[0])  # some tokens pushed, not all; the reference kept
    torch.testing.assert_close(ours[1, 2], tokens[1, 2] + alpha * (tokens[1, 2] - tokens[0, 4]), rtol=0, atol=1e-12)


def _text_unet(tiny_sd_folder):
    from models.text_to_image import TextToImage

    net = TextToImage.from_pretrained(str(tiny_sd_folder("sd15")), with_vae=False).net
    return net, net.conditioner.encode(["a cat", "a cat", "the dog"])


def _class_unet():
    from models.adapters import ClassConditionalUNet

    torch.manual_seed(0)
    net = ClassConditionalUNet(num_classes=10, sample_size=8, in_channels=1, block_out_channels=[16, 32],
                               attention_levels=[False, True], layers_per_block=1, norm_num_groups=8)
    return net, torch.tensor([3, 3, 5])


@pytest.mark.parametrize("kind", ["text", "class"])
def test_the_reference_sample_is_untouched_and_the_others_move(tiny_sd_folder, kind):
    net, cond = _text_unet(tiny_sd_folder) if kind == "text" else _class_unet()
    channels, size = (4, 8) if kind == "text" else (1, 8)
    x = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(1))
    x[1] = x[0]  # the same noise and condition as the reference
    early, late = torch.full((3,), 950.0), torch.full((3,), 500.0)
    before = {n: m.processor for n, m in self_attention_modules(net)}
    with torch.no_grad():
        plain_early, plain_late = net(x, early, cond), net(x, late, cond)
        with negative_token_merging(net, 0.0):
            assert torch.equal(net(x, early, cond), plain_early)  # alpha 0: the network unchanged, bit for bit
        with negative_token_merging(net, 0.9):
            merged, outside = net(x, early, cond), net(x, late, cond)
    assert {n: m.processor for n, m in self_attention_modules(net)} == before and not net._forward_pre_hooks
    assert torch.equal(outside, plain_late)  # outside the time window [900, 1000]: unchanged
    assert torch.equal(merged[0], plain_early[0])  # the reference sample
    # a copy of the reference matches each of its tokens to itself: x + alpha (x - x), nothing to push away from
    assert torch.equal(plain_early[1], plain_early[0])
    torch.testing.assert_close(merged[1], plain_early[1], rtol=0, atol=1e-5)
    assert (merged[2] - plain_early[2]).abs().max() > 1e-3  # another sample is pushed


def test_networks_without_unet_self_attention_and_bad_settings_are_refused(tiny_sd_folder):
    from models.text_transformer import SD3Transformer

    sd3 = SD3Transformer(str(tiny_sd_folder("sd3")), max_sequence_length=32)
    with pytest.raises(ValueError, match="has no UNet self-attention layers for NegToMe"):
        with negative_token_merging(sd3, 0.9):
            pass
    net, _ = _class_unet()
    for bad, needle in [({"alpha": -1.0}, "alpha must be a finite value >= 0"), ({"alpha": 1.0, "threshold": 2.0},
                        "cosine similarity in"), ({"alpha": 1.0, "window": (1000.0, 900.0)}, "earliest <= latest")]:
        with pytest.raises(ValueError, match=needle):
            with negative_token_merging(net, **bad):
                pass
