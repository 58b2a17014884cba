"""FID and CLIP score from local weights: a randomly initialised FID Inception saved as the weight file FID users
have, checked against an independent mean/covariance/sqrtm computation; a tiny CLIP model folder checked against
100 max(cos, 0) from the model's own forward; the reference-image readers; the messages for missing weights."""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from train.evaluation import reference as rm
from train.evaluation.inception import WEIGHTS_NAME, FIDInceptionV3, resize_bilinear_tf1


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random FID Inception state dict saved as torch-fidelity / pytorch-fid save theirs (torch.save of the
    state dict, same keys), with BatchNorm statistics that keep the features O(1)."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("fid") / WEIGHTS_NAME
    torch.save(net.state_dict(), path)
    return path


def images(n: int, seed: int, low: float = -1.0, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (1 - low) * torch.rand(n, 3, size, size, generator=g)


def frechet_reference(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)) with unbiased covariances, by scipy.linalg.sqrtm.
    With few samples (A1, A2 the centred features, S_i = A_i^T A_i / (n_i - 1)) the non-zero eigenvalues of S1 S2
    are those of M = A2 A1^T A1 A2^T / ((n1 - 1)(n2 - 1)) (eig(XY) = eig(YX) for X = A1^T A1 A2^T, Y = A2), so
    Tr((S1 S2)^(1/2)) = Tr(sqrtm(M)) with M small, symmetric and PSD: exact where sqrtm of the 2048x2048 product
    would be slow and ill-conditioned."""
    a1, a2 = f1 - f1.mean(0), f2 - f2.mean(0)
    n1, n2 = len(f1), len(f2)
    m = a2 @ a1.T @ a1 @ a2.T / ((n1 - 1) * (n2 - 1))
    trace_s = (a1 ** 2).sum() / (n1 - 1) + (a2 ** 2).sum() / (n2 - 1)
    return float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + trace_s - 2 * np.trace(scipy.linalg.sqrtm(m)).real)


def test_fid_equals_the_frechet_distance_of_the_inception_features(inception_weights):
    fake, real = images(4, 0), images(5, 1, low=0.0, size=12)
    net = FIDInceptionV3.from_file(inception_weights)
    with torch.no_grad():
        f_fake, f_real = (net(rm.to_uint8(x)).double().numpy() for x in (fake, real))
    expected = frechet_reference(f_real, f_fake)
    assert expected > 0
    assert rm.fid(fake, real, inception_weights, batch_size=3) == pytest.approx(expected, rel=1e-4)
    scale = np.trace(np.cov(f_fake, rowvar=False))  # FID(x, x) = 0 up to round-off of the covariance's size
    assert abs(rm.fid(fake, fake, inception_weights)) < 1e-4 * scale


def test_the_resize_is_tensorflow_1_bilinear():
    # TF1 resize_bilinear(align_corners=False) samples output pixel i at i * in / out, no half-pixel offset:
    # [0, 10] -> 4 pixels samples 0, 0.5, 1, 1.5 (the upper neighbour clamped): 0, 5, 10, 10
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]])[None, None]
    out = resize_bilinear_tf1(x, 4)[0, 0]
    row = torch.tensor([0.0, 5.0, 10.0, 10.0])
    torch.testing.assert_close(out, torch.stack([row, row + 10, row + 20, row + 20]), rtol=0, atol=0)


def test_the_network_matches_torch_fidelitys_extractor(inception_weights):
    """Where torch-fidelity is importable (it needs torchvision), its InceptionV3 '2048' features for the same file
    equal ours."""
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    theirs = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                  feature_extractor_weights_path=str(inception_weights))
    x = rm.to_uint8(images(2, 3, size=13))
    torch.testing.assert_close(FIDInceptionV3.from_file(inception_weights)(x), theirs(x)[0], rtol=1e-5, atol=1e-6)


def test_missing_or_unreadable_inception_weights_name_the_file_and_the_flag(tmp_path, inception_weights):
    x = images(2, 0)
    with pytest.raises(FileNotFoundError, match=rf"{WEIGHTS_NAME}.*--fid-weights"):
        rm.fid(x, x, tmp_path / "nowhere.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=rf"cannot be read.*{WEIGHTS_NAME}.*--fid-weights"):
        rm.fid(x, x, tmp_path / "junk.pth")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the FID Inception state dict"):
        rm.fid(x, x, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="at least 2 images"):
        rm.fid(x[:1], x, inception_weights)


# ------------------------------------------------------------------------------------------------ CLIP score

@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny CLIPModel + CLIPProcessor (8x8 images, the byte-level CLIP tokenizer of the tiny pipelines)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from models.tiny_pipelines import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                  patch_size=4)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 8},
                                                                 crop_size={"height": 8, "width": 8}), tokenizer=tok)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


PROMPTS = ["a cat", "the dog", "a red car", "a cat of the dog", "the red dog", "a car"]


def manual_clip_score(folder, x: torch.Tensor, prompts: list[str]) -> tuple[float, torch.Tensor]:
    """100 max(cos, 0) averaged, from CLIPModel.forward's normalised embeddings, pixels normalised by hand (8x8
    images need no resize or crop): (the score, the cosines)."""
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    model = CLIPModel.from_pretrained(folder).eval()
    tok = CLIPTokenizer.from_pretrained(folder)
    pixels = torch.round((x + 1) * 127.5).clamp(0, 255) / 255
    pixels = (pixels - torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]) / torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    with torch.no_grad():
        out = model(**tok(prompts, padding=True, return_tensors="pt"), pixel_values=pixels)
    cos = (out.image_embeds * out.text_embeds).sum(-1)
    return float((100 * cos.clamp(min=0)).mean()), cos


def test_clip_score_is_100_max_cos_0_averaged(clip_folder):
    x = images(6, 4)
    expected, cos = manual_clip_score(clip_folder, x, PROMPTS)
    assert (cos < 0).any() and (cos > 0).any()  # the per-pair clamp matters for this model
    assert rm.clip_score(x, PROMPTS, clip_folder, batch_size=4) == pytest.approx(expected, rel=1e-5)


def test_clip_score_never_opens_a_connection(clip_folder, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert 0 <= rm.clip_score(images(2, 5), PROMPTS[:2], clip_folder) <= 100


def test_a_missing_clip_folder_names_the_flag(tmp_path):
    x = images(1, 0)
    with pytest.raises(FileNotFoundError, match="--clip-model"):
        rm.clip_score(x, ["a cat"], tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a CLIP model folder.*--clip-model"):
        rm.clip_score(x, ["a cat"], tmp_path)
    with pytest.raises(ValueError, match="one prompt per image"):
        rm.clip_score(images(2, 0), ["a cat"], tmp_path)


# ------------------------------------------------------------------------------------------------ reference images

def write_images(folder, n: int, captions: bool = False) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(p)
        if captions:
            (folder / f"{i}.txt").write_text(PROMPTS[i % len(PROMPTS)])
        paths.append(p)
    return paths


def test_reference_images_read_every_local_layout(tmp_path):
    from data.images import image_to_tensor

    paths = write_images(tmp_path / "captioned", 5, captions=True)
    expected = torch.stack([image_to_tensor(Image.open(p), 6, 3) for p in paths])
    torch.testing.assert_close(rm.reference_images(tmp_path / "captioned", None, 6), expected, rtol=0, atol=0)
    some = rm.reference_images(tmp_path / "captioned", 3, 6, seed=1)
    assert some.shape == (3, 3, 6, 6) and all(any(torch.equal(s, e) for e in expected) for s in some)
    (tmp_path / "captioned" / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"{i}.png", "text": "x"}) for i in (4, 2)))
    torch.testing.assert_close(rm.reference_images(tmp_path / "captioned", None, 6), expected[[4, 2]], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="--fid-reference"):
        rm.reference_images(tmp_path / "nowhere", 2, 6)
    write_images(tmp_path / "flat", 5)
    assert rm.reference_images(tmp_path / "flat", None, 6).shape == (5, 3, 6, 6)
    with pytest.raises(ValueError, match="holds 5"):
        rm.reference_images(tmp_path / "flat", 9, 6)


def test_reference_metrics_computes_what_has_weights_and_says_what_is_missing(tmp_path, clip_folder,
                                                                              inception_weights):
    x = images(3, 6)
    out = rm.reference_metrics(x, PROMPTS[:3])
    assert set(out) == {"missing"} and len(out["missing"]) == 4
    assert any("--fid-weights" in s and WEIGHTS_NAME in s for s in out["missing"])
    assert any("--fid-reference" in s for s in out["missing"]) and any("--clip-model" in s for s in out["missing"])
    assert any("--nudenet PATH" in s for s in out["missing"])
    assert len(rm.reference_metrics(x)["missing"]) == 2  # class requests: no CLIP score, no nudity line

    write_images(tmp_path / "real", 5)
    out = rm.reference_metrics(x, PROMPTS[:3], fid_weights=inception_weights, fid_reference=str(tmp_path / "real"),
                               clip_model=clip_folder)
    assert len(out["missing"]) == 1  # all but the nudity rate
    assert out["clip_score"] == pytest.approx(manual_clip_score(clip_folder, x, PROMPTS[:3])[0], rel=1e-5)
    # as many reference images as generated ones (3 of the 5, seed 0), at the generated size (8)
    fids = {(n, size): rm.fid(x, rm.reference_images(tmp_path / "real", n, size), inception_weights)
            for n, size in ((3, 8), (5, 8), (3, 6))}
    assert out["fid"] == pytest.approx(fids[3, 8], rel=1e-9, abs=0)  # (a random Inception's FIDs are ~1e-14)
    assert all(out["fid"] != pytest.approx(fids[k], rel=1e-3, abs=0) for k in ((5, 8), (3, 6)))
    out = rm.reference_metrics(x, PROMPTS[:3], fid_weights="w.pth")
    assert "fid" not in out and len(out["missing"]) == 3
