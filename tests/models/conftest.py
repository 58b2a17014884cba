"""Tiny Stable Diffusion folders (diffusers layout, built from config, no download), one per kind per session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """tiny_sd_folder(kind) -> Path of a saved tiny pipeline of that kind ("sd15", "sd2", "sdxl")."""
    from models.tiny_pipelines import save_tiny_pipeline

    made = {}

    def get(kind: str = "sd15"):
        if kind not in made:
            made[kind] = save_tiny_pipeline(tmp_path_factory.mktemp(f"tiny_{kind}") / "pipe", kind)
        return made[kind]

    return get
