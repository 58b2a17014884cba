"""Image-caption pairs from a folder (metadata.jsonl or .txt beside each image) and from save_to_disk."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from data.captions import CaptionedImageDataModule, caption_folder_dataset


def _images(folder, n=5):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def test_metadata_jsonl_and_sidecar_txt_give_the_same_pairs(tmp_path):
    names = _images(tmp_path / "a")
    (tmp_path / "a" / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"caption {i}"}) + "\n"
                                                         for i, n in enumerate(names)))
    names_b = _images(tmp_path / "b")
    for i, n in enumerate(names_b):
        (tmp_path / "b" / n.replace(".png", ".txt")).write_text(f"caption {i}\n")
    a, b = caption_folder_dataset(str(tmp_path / "a")), caption_folder_dataset(str(tmp_path / "b"))
    assert a["text"] == b["text"] == [f"caption {i}" for i in range(5)]
    (tmp_path / "b" / "img0.txt").unlink()
    with pytest.raises(ValueError, match="no caption file img0.txt"):
        caption_folder_dataset(str(tmp_path / "b"))


def test_data_module_batches_images_and_captions(tmp_path):
    import datasets

    names = _images(tmp_path / "a")
    for i, n in enumerate(names):
        (tmp_path / "a" / n.replace(".png", ".txt")).write_text(f"caption {i}")
    dm = CaptionedImageDataModule(str(tmp_path / "a"), image_size=8, batch_size=2, val_size=1)
    images, captions = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    assert len(captions) == 2 and all(c.startswith("caption ") for c in captions)
    assert len(dm.sets["validation"]) == 1 and len(dm.sets["train"]) == 4

    saved = tmp_path / "saved"
    caption_folder_dataset(str(tmp_path / "a")).rename_column("text", "caption").save_to_disk(str(saved))
    dm2 = CaptionedImageDataModule(str(saved), image_size=8, batch_size=5, val_size=0)
    dm2.setup()
    imgs = torch.stack([dm2.sets["train"][i][0] for i in range(5)])
    ref = torch.stack([dm.sets["train"][i][0] for i in range(4)])
    assert dm2.sets["train"][0][1] == "caption 0" and imgs.shape == (5, 3, 8, 8)
    assert any(torch.equal(r, imgs[j]) for r in ref for j in range(5))
    with pytest.raises(ValueError, match="set caption_column"):
        CaptionedImageDataModule(str(saved), image_size=8, caption_column="alt").setup()
    assert isinstance(datasets.load_from_disk(str(saved)), datasets.Dataset)


def test_a_captioned_image_that_does_not_open_is_named(tmp_path):
    names = _images(tmp_path / "a")
    for i, n in enumerate(names):
        (tmp_path / "a" / n.replace(".png", ".txt")).write_text(f"caption {i}")
    (tmp_path / "a" / names[1]).write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ValueError, match=f"1 image\\(s\\) of .* do not open .*{names[1]}"):
        CaptionedImageDataModule(str(tmp_path / "a"), image_size=8, val_size=1).setup()
    dm = CaptionedImageDataModule(str(tmp_path / "a"), image_size=8, batch_size=2, val_size=1, skip_bad_images=True)
    with pytest.warns(UserWarning, match=names[1]):
        dm.setup()
    assert len(dm.sets["train"]) + len(dm.sets["validation"]) == 4
