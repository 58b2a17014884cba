"""Zero-shot CLIP concept accuracy (train/evaluation/zero_shot.py) on a tiny CLIP folder built here: the probabilities
against CLIPModel.forward's logits_per_image softmax, the accuracies against a hand count, the erased/other split."""
from __future__ import annotations

import pytest
import torch

from tests.train.tiny_judges import tiny_clip_folder
from train.evaluation import zero_shot as zs

CONCEPTS = ["cat", "red car", "Van Gogh"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return tiny_clip_folder(tmp_path_factory.mktemp("clip"))


def images(n: int, seed: int) -> torch.Tensor:
    """n 8x8 images in [-1, 1], each a random colour with noise (distinct enough for the random model to tell apart)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1 + 0.3 * torch.randn(n, 3, 8, 8, generator=g)).clamp(-1, 1)


def hand_probs(folder, x: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """softmax of CLIPModel.forward's logits_per_image (exp(logit_scale) times the cosines), pixels normalised by hand
    (8x8 images need no resize or crop)."""
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    model = CLIPModel.from_pretrained(folder).eval()
    tok = CLIPTokenizer.from_pretrained(folder)
    pixels = torch.round((x + 1) * 127.5).clamp(0, 255) / 255
    pixels = (pixels - torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]) / torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    with torch.no_grad():
        out = model(**tok(texts, padding=True, return_tensors="pt"), pixel_values=pixels)
    return out.logits_per_image.softmax(-1)


def test_probabilities_are_the_softmax_of_clips_logits(clip_folder):
    x = images(12, 0)
    probs = zs.zero_shot_probs(x, CONCEPTS, clip_folder, "{}", batch_size=5)
    expected = hand_probs(clip_folder, x, CONCEPTS)
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-6)
    assert len(set(probs.argmax(-1).tolist())) > 1  # the random model does not put every image in one class
    gray = zs.zero_shot_probs(x[:, :1], CONCEPTS, clip_folder, "art: {}")  # [N, 1, H, W] read as RGB; <= 16 tokens
    torch.testing.assert_close(gray, hand_probs(clip_folder, x[:, :1].expand(-1, 3, -1, -1),
                                                ["art: cat", "art: red car", "art: Van Gogh"]), rtol=1e-4, atol=1e-6)


def test_accuracies_count_the_argmax_against_the_prompted_concept():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8],
                          [0.6, 0.3, 0.1]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])  # predicted 0, 1, 0, 2, 2, 0
    out = zs.concept_accuracy(probs, CONCEPTS, labels, erased=["van gogh"])
    assert out["concept_histogram"] == pytest.approx({"cat": 0.5, "red car": 1 / 6, "Van Gogh": 1 / 3})
    assert out["concept_accuracy"] == pytest.approx(2 / 6)
    assert out["per_concept_accuracy"] == pytest.approx({"cat": 0.5, "red car": 0.0, "Van Gogh": 0.5})
    assert out["erased_concept_accuracy"] == pytest.approx(0.5)
    assert out["other_concept_accuracy"] == pytest.approx(0.25)
    unlabelled = zs.concept_accuracy(probs, CONCEPTS)
    assert set(unlabelled) == {"concept_histogram"}
    assert "erased_concept_accuracy" not in zs.concept_accuracy(probs, CONCEPTS, labels, erased=["dog"])
    some = zs.concept_accuracy(probs[:2], CONCEPTS, labels[:2])
    assert some["per_concept_accuracy"]["red car"] is None


def test_bad_concepts_templates_and_folders_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="needs \\{\\}"):
        zs.concept_texts(CONCEPTS, "a photo")
    with pytest.raises(ValueError, match="two distinct"):
        zs.concept_texts(["cat", "Cat"])
    assert zs.concept_texts(["cat", "dog"], "art by {concept}") == ["art by cat", "art by dog"]
    with pytest.raises(FileNotFoundError, match="--clip-model"):
        zs.zero_shot_probs(images(1, 0), CONCEPTS, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a CLIP model folder"):
        zs.zero_shot_probs(images(1, 0), CONCEPTS, tmp_path)
