"""Shared test setup. HF_HUB_OFFLINE must be set before anything imports huggingface_hub."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

CONVERTED = ("gta", "synthia", "cityscapes", "mapillary")


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A small ToyCity (3 images per split and domain), converted to train ids like real data."""
    import data
    from toyworld import city

    root = tmp_path_factory.mktemp("toycity")
    city.build(root, seed=0, num_images=3, workers=1, progress=False)
    for name in CONVERTED:
        data.convert(name, root, nproc=1, progress=False)
    return root
