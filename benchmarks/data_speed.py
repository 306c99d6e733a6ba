"""Data loading speed: our LMDB Dataset vs decoding the same samples from JPEG/PNG files, side by side in one run,
both single-process at 128x128; and the conversion rate of a converter.

Target (issue "Real datasets"): LMDB at least 5x faster than the files and at least 3000 samples/s.

Run: python benchmarks/data_speed.py [--samples 2000]
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import convert  # noqa: E402
import data  # noqa: E402


class FileDataset(torch.utils.data.Dataset):
    """The same samples as JPEG images + PNG masks, decoded per item into the same tensors as data.LMDBDataset."""

    def __init__(self, folder, count):
        self.folder, self.count = Path(folder), count

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        image = np.array(Image.open(self.folder / f"{i:06d}.jpg").convert("RGB"))  # (H, W, 3) uint8
        segment = np.array(Image.open(self.folder / f"{i:06d}.png"))  # (H, W) uint8
        image = torch.from_numpy(image).permute(2, 0, 1).float().sub_(127.5).div_(127.5)
        return {"image": image, "segment": torch.from_numpy(segment.astype(np.int64)), "index": i}


def rate(ds, n, rounds=3):
    """Best of `rounds` passes over the first n items, samples/s (the first pass also warms the page cache)."""
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(n):
            ds[i]
        best = max(best, n / (time.perf_counter() - start))
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--resolution", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="msf-data-speed-"))
    try:
        root = work / "data"
        data.write_shapes(root, args.resolution, seed=0, counts={"train": args.samples, "val": 16}, quiet=True)
        lmdb_ds = data.LMDBDataset(data.shapes_dir(root, args.resolution) / "train")
        files = work / "files"
        files.mkdir()
        for i in range(args.samples):
            rec = lmdb_ds.record(i)
            Image.fromarray(rec["image"]).save(files / f"{i:06d}.jpg", quality=95)
            Image.fromarray(rec["segment"]).save(files / f"{i:06d}.png")
        file_ds = FileDataset(files, args.samples)
        lmdb_rate, file_rate = rate(lmdb_ds, args.samples), rate(file_ds, args.samples)

        # conversion rate: the VOC converter on a real VOC sample beside the checkout (where there is one), replicated
        conv_rate = None
        voc = ROOT.parent / "shared" / "data" / "voc"
        if voc.is_dir():
            src = work / "voc"
            shutil.copytree(voc, src, copy_function=shutil.copyfile)
            vroot = src / "VOCdevkit" / "VOC2012"
            names = []
            for i in range(200):
                name = f"2008_{i:06d}"
                for sub, ext in (("JPEGImages", "jpg"), ("SegmentationObject", "png"), ("SegmentationClass", "png")):
                    shutil.copyfile(vroot / sub / f"2007_000063.{ext}", vroot / sub / f"{name}.{ext}")
                names.append(name)
            (vroot / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names) + "\n")
            start = time.perf_counter()
            n = convert.convert("voc", src, work / "voc_out", resolution=args.resolution, quiet=True)["train"]
            conv_rate = n / (time.perf_counter() - start)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.samples} samples at {args.resolution}x{args.resolution}, one process, best of 3 passes\n")
    print("| reader | samples/s |\n|---|---|")
    print(f"| LMDB (data.LMDBDataset) | {lmdb_rate:.0f} |")
    print(f"| JPEG + PNG files (PIL decode) | {file_rate:.0f} |")
    print(f"| ratio | {lmdb_rate / file_rate:.1f}x |")
    if conv_rate:
        print(f"\nconversion: VOC converter, 500x375 JPEG + 2 palette PNGs -> {args.resolution}px LMDB: "
              f"{conv_rate:.0f} samples/s")


if __name__ == "__main__":
    main()
