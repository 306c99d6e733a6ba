"""Shared pytest setup: the project root on sys.path and a tiny shapes dataset written once per session.

Run: python -m pytest -q
"""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"  # real sample files of the official formats (absent in user clones)

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """data root holding shapes/{train,val} with 48/16 samples at 64x64."""
    import data
    root = tmp_path_factory.mktemp("data")
    data.write_shapes(root, 64, seed=0, counts={"train": 48, "val": 16}, quiet=True)
    return root
