"""Nudity rate by a NudeNet v3-style ONNX detector (train/evaluation/nudity.py): a tiny detector built here whose class
scores follow each grid cell's colour, so that images with an "exposed" patch are nude and others are not; NudeNet's
letterbox, box scaling and class-agnostic suppression against hand computations; the errors for a missing, corrupt or
foreign ONNX file."""
from __future__ import annotations

import pytest
import torch

from tests.train.tiny_judges import colour_logits, tiny_nudenet
from train.evaluation import nudity as nd


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """Red cells: FEMALE_BREAST_EXPOSED (score ~1); green cells: BELLY_EXPOSED (exposed, not nude); blue cells:
    FACE_FEMALE; every cell: BUTTOCKS_EXPOSED at 0.5 (sigmoid(0)), nude only under a threshold below 0.5."""
    w, b = colour_logits(FEMALE_BREAST_EXPOSED=(20, -10, -10, -5), BELLY_EXPOSED=(-10, 20, -10, -5),
                         FACE_FEMALE=(-10, -10, 20, -5), BUTTOCKS_EXPOSED=(0, 0, 0, 0))
    return tiny_nudenet(tmp_path_factory.mktemp("nudenet") / "320n.onnx", w, b)


def patched(n: int, colour: tuple[float, float, float], size: int = 64) -> torch.Tensor:
    """n gray images [n, 3, size, size] in [-1, 1] whose top-left quadrant has `colour` (r, g, b in [0, 1])."""
    x = torch.zeros(n, 3, size, size)
    x[:, :, : size // 2, : size // 2] = torch.tensor(colour).reshape(3, 1, 1) * 2 - 1
    return x


def test_images_with_an_exposed_patch_are_nude_and_others_are_not(detector):
    exposed, belly, face = patched(3, (1, 0, 0)), patched(2, (0, 1, 0)), patched(2, (0, 0, 1))
    out = nd.nudity_rate(torch.cat([exposed, belly, face]), detector)
    assert out["nudity_rate"] == pytest.approx(3 / 7) and out["nude_images"] == 3
    # the red quadrant is 2 x 2 grid cells, each its own box (adjacent boxes do not overlap): 4 detections an image
    assert out["nudity_detections"]["FEMALE_BREAST_EXPOSED"] == 12
    assert out["nudity_detections"]["BELLY_EXPOSED"] == 8  # tabulated, but not nude
    assert "FACE_FEMALE" not in out["nudity_detections"]
    assert nd.nudity_rate(exposed, detector)["nudity_rate"] == 1.0
    assert nd.nudity_rate(torch.cat([belly, face]), detector)["nudity_rate"] == 0.0
    # BUTTOCKS_EXPOSED scores 0.5 in every other cell: nude below that threshold, not above it
    assert nd.nudity_rate(face, detector, threshold=0.45)["nudity_rate"] == 1.0
    assert nd.nudity_rate(face, detector, threshold=0.45, classes=["female_breast_exposed"])["nudity_rate"] == 0.0
    gray = nd.nudity_rate(patched(2, (1, 0, 0))[:, :1], detector)  # one channel is read as RGB: gray, not red
    assert gray["nudity_rate"] == 0.0


def test_detections_follow_nudenets_postprocessing(detector):
    det = nd.NudeDetector(detector)
    assert det.size == 32 and det.batch == 1
    found = det.detect(patched(1, (1, 0, 0), size=64))[0]
    breasts = sorted(d.box for d in found if d.label == "FEMALE_BREAST_EXPOSED")
    # 8 x 8 input cells scaled by 64 / 32 to 16 x 16 image pixels, boxes [left, top, width, height]
    assert breasts == [(0, 0, 16, 16), (0, 16, 16, 16), (16, 0, 16, 16), (16, 16, 16, 16)]
    assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
    assert len(found) == 16  # every anchor's best class scores >= 0.25, none overlaps another


def test_letterbox_resizes_the_longer_side_and_pads_with_edge_pixels():
    x = torch.arange(2 * 4, dtype=torch.uint8).reshape(1, 1, 2, 4).expand(1, 3, 2, 4) * 30
    out = nd.letterbox(x, 4)  # 2 x 4 already has its longer side 4: no resize; 2 rows padded, one above, one below
    assert out.shape == (1, 3, 4, 4)
    torch.testing.assert_close(out[0, 0, 1:3], x[0, 0].float() / 255)
    torch.testing.assert_close(out[0, 0, 0], out[0, 0, 1])
    torch.testing.assert_close(out[0, 0, 3], out[0, 0, 2])
    big = nd.letterbox(x, 8)  # resized to 4 x 8 (bilinear, rounded to 8 bits), then padded 2 and 2
    assert big.shape == (1, 3, 8, 8) and torch.equal(big * 255, (big * 255).round())
    tall = nd.letterbox(torch.zeros(1, 3, 30, 10, dtype=torch.uint8), 9)  # 9 x int(9 / 3) = 9 x 3, padded 3 and 3
    assert tall.shape == (1, 3, 9, 9)


def test_suppression_is_class_agnostic_and_keeps_iou_up_to_the_threshold():
    boxes = [(0, 0, 10, 10), (1, 0, 10, 10), (5, 0, 10, 10), (30, 30, 4, 4), (0, 0, 10, 10)]
    scores = [0.9, 0.95, 0.8, 0.26, 0.25]
    # (1, 0) vs (0, 0): IoU 90 / 110 > 0.45, suppressed by the better one; (5, 0) vs (1, 0): 60 / 140 = 0.43 kept;
    # 0.25 is not above the score threshold
    assert nd.nms(boxes, scores) == [1, 2, 3]
    assert nd.nms(boxes, scores, iou_threshold=0.9) == [1, 0, 2, 3]
    output = torch.zeros(22, 3)
    output[:4] = torch.tensor([[5.0, 6.0, 10.0, 10.0]]).T  # three anchors on one box
    output[4 + nd.NUDENET_LABELS.index("FACE_MALE"), 0] = 0.7
    output[4 + nd.NUDENET_LABELS.index("ANUS_EXPOSED"), 1] = 0.6
    output[4 + nd.NUDENET_LABELS.index("FEET_EXPOSED"), 2] = 0.19  # below the candidate score 0.2
    found = nd.postprocess(output.numpy(), width=20, height=10, size=10)
    assert [(d.label, d.box) for d in found] == [("FACE_MALE", (0, 1, 20, 10))]  # x scaled by 2: left int(0 * 2)


def test_missing_corrupt_or_foreign_onnx_files_are_one_clear_error(tmp_path):
    x = patched(1, (1, 0, 0))
    with pytest.raises(FileNotFoundError, match="does not exist.*--nudenet PATH"):
        nd.nudity_rate(x, tmp_path / "nowhere.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ValueError, match="not an ONNX model onnxruntime can load.*--nudenet"):
        nd.nudity_rate(x, tmp_path / "junk.onnx")
    w, b = colour_logits()
    path = tiny_nudenet(tmp_path / "other.onnx", w[:, :10], b[:10])  # a detector of 10 classes, not NudeNet's 18
    with pytest.raises(ValueError, match="not a NudeNet v3 detector"):
        nd.nudity_rate(x, path)
    with pytest.raises(ValueError, match="NudeNet labels"):
        nd.check_classes(["EXPOSED_BREAST_F"])  # NudeNet v2's name
    with pytest.raises(ValueError, match="nudity-threshold"):
        nd.nudity_rate(x, path, threshold=1.5)
