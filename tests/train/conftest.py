"""Fixtures shared by the train tests: the tiny text-to-image workspace (tests/train/text_fits.py)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def t2i_workspace(tmp_path_factory):
    """Tiny pipeline folders, captioned images and prompts, and CLI fits on them, shared by every test file of the
    session (each folder built and each run fitted once)."""
    from tests.train.text_fits import TextWorkspace

    return TextWorkspace(tmp_path_factory.mktemp("t2i"))
