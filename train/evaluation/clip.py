"""The user's local CLIP model (a transformers CLIPModel + CLIPProcessor folder, never downloaded) and the steps CLIP
score and zero-shot classification share: loading it, images as its processor takes them, its embeddings."""
from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from train.evaluation.images import to_uint8

CLIP_HELP = ("pass --clip-model FOLDER: a folder holding a transformers CLIPModel and its "
             "CLIPProcessor (config.json, model.safetensors, preprocessor/processor config, tokenizer files), e.g. "
             "written by CLIPModel.from_pretrained('openai/clip-vit-large-patch14').save_pretrained(FOLDER) and the "
             "same for CLIPProcessor on a machine with network access; nothing is downloaded")


def load_clip(folder: str | os.PathLike):
    """(CLIPModel in eval mode, CLIPProcessor) from a local folder; offline (local_files_only), one clear error
    naming --clip-model when the folder is missing or holds no CLIP model."""
    from transformers import CLIPModel, CLIPProcessor

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"CLIP model folder {str(folder)!r} does not exist; {CLIP_HELP}")
    try:
        model = CLIPModel.from_pretrained(root, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{str(folder)!r} is not a CLIP model folder ({reason}); {CLIP_HELP}") from None
    return model.eval().requires_grad_(False), processor


def pil_images(images: Tensor) -> list:
    """float [N, 3, H, W] in [-1, 1] -> N PIL RGB images of their 8-bit pixels (to_uint8), what CLIPProcessor takes."""
    from PIL import Image

    return [Image.fromarray(p) for p in to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()]


def clip_embedding(out) -> Tensor:
    """get_image_features / get_text_features output as [B, D]: a tensor in transformers 4, the projected
    embedding in `pooler_output` in transformers 5."""
    return out if isinstance(out, Tensor) else out.pooler_output
