"""Shared pytest setup: the project root on sys.path and a tiny shapes dataset written once per session.

Run: python -m pytest -q
"""
import contextlib
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"  # real sample files of the official formats (absent in user clones)

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """No test downloads anything (DINO's weights in particular): a test that would is a failing test."""
    def refuse(url, *args, **kwargs):
        raise AssertionError(f"a test tried to download {url}")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """data root holding shapes/{train,val} with 48/16 samples at 64x64."""
    import data
    root = tmp_path_factory.mktemp("data")
    data.write_shapes(root, 64, seed=0, counts={"train": 48, "val": 16}, quiet=True)
    return root


# a tiny OCL model for short real runs (tests/test_ocl.py, tests/test_dino.py)
TINY_OCL = ["--slot-dim", "32", "--enc-channels", "16", "--dec-dim", "32", "--dec-layers", "1", "--unet-base", "16",
            "--mlp-hidden", "32", "--batch-size", "4", "--val-batches", "1", "--log-every", "1"]


@pytest.fixture(scope="session")
def tiny_vaes(tiny_root, tmp_path_factory):
    """Two-step stage-1 runs: an MSF VAE with c = 256 and one with c = 4."""
    import train_vae
    out = tmp_path_factory.mktemp("vaes")
    paths = {}
    for c in (256, 4):
        args = train_vae.parse_args(["--data-root", str(tiny_root), "--out", str(out / f"c{c}"), "--code-dim", str(c),
                                     "--channels", "16", "--batch-size", "8", "--steps", "2", "--val-batches", "1"])
        paths[c] = train_vae.train(args) / "best.pt"
    return paths


@pytest.fixture(scope="session")
def tiny_video_root(tmp_path_factory):
    """data root holding shapes_video/{train,val} with 24/6 clips of 8 frames at 64x64."""
    import data
    root = tmp_path_factory.mktemp("video")
    data.write_shapes_video(root, 64, seed=0, counts={"train": 24, "val": 6}, frames=8, quiet=True)
    return root


@pytest.fixture(scope="session")
def tiny_video_vaes(tiny_video_root, tmp_path_factory):
    """Two-step stage-1 runs on the video frames: MSF VAEs with c = 256 and c = 4."""
    import train_vae
    out = tmp_path_factory.mktemp("video_vaes")
    paths = {}
    for c in (256, 4):
        args = train_vae.parse_args(["--dataset", "shapes_video", "--data-root", str(tiny_video_root),
                                     "--out", str(out / f"c{c}"), "--code-dim", str(c), "--channels", "16",
                                     "--batch-size", "2", "--steps", "2", "--val-batches", "1"])
        paths[c] = train_vae.train(args) / "best.pt"
    return paths


@contextlib.contextmanager
def refused(capsys, message):
    """A command line refused by argparse: exit status 2 and one line on stderr that matches `message` (regex)."""
    with pytest.raises(SystemExit, match="^2$"):
        yield
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
