"""Synthetic downloads in the official layouts, for running the whole chain (convert.py -> train_vae.py ->
train_ocl.py -> evaluate.py) at the paper's settings without the real data: test and benchmark code, not a user
feature (the pictures are random shapes; what they cost to convert and train on is what real ones cost).

COCO 2017 panoptic (what convert.py coco reads): <root>/{train,val}2017/<id>.jpg, <root>/annotations/
panoptic_{train,val}2017.json (images, annotations with segments_info, categories: things and stuff) and the
panoptic PNGs <root>/annotations/panoptic_{split}2017/<id>.png, segment id = R + 256 G + 256^2 B. Like COCO's: images
of 640 px on the long side and 360-640 on the short one, about 7 things per image from tiny (< 32^2 px) to large
(> 96^2 px), 2-3 stuff regions, a crowd region in one image of 20, unlabelled (id 0) pixels along region borders.

Run: python benchmarks/synthetic_downloads.py coco --out /tmp/coco_synthetic --train 2000 --val 200
"""
import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

# a few of COCO's own category ids, names and supercategories (things: isthing 1, stuff: 0)
THINGS = [(1, "person", "person"), (3, "car", "vehicle"), (17, "cat", "animal"), (18, "dog", "animal"),
          (44, "bottle", "kitchen"), (62, "chair", "furniture"), (64, "potted plant", "furniture")]
STUFF = [(184, "tree-merged", "plant"), (187, "sky-other-merged", "sky"), (191, "pavement-merged", "ground"),
         (199, "wall-other-merged", "wall")]


def _coco_image(rng, height, width, scale=1.0):
    """One picture and its panoptic annotation: (image (h, w, 3) uint8, ids (h, w) int64, segments_info)."""
    yy, xx = np.mgrid[:height, :width]
    ids = np.zeros((height, width), np.int64)
    image = np.zeros((height, width, 3), np.float64)
    segments, next_id = [], int(rng.integers(1, 2 ** 20))  # ids anywhere in R + 256 G + 256^2 B

    def add(mask, category, iscrowd=0):
        nonlocal next_id
        colour = rng.uniform(20, 235, 3)
        image[mask] = colour + rng.normal(0, 12, (int(mask.sum()), 3))  # a flat colour with some texture
        ids[mask] = next_id
        segments.append({"id": next_id, "category_id": category, "iscrowd": iscrowd})
        next_id += int(rng.integers(1, 5000))

    # 2-3 stuff regions: horizontal bands with wavy borders
    cuts = np.sort(rng.uniform(0.2, 0.8, int(rng.integers(1, 3)))) * height
    band = np.zeros((height, width), np.int64)
    for cut in cuts:
        band += yy > cut + 12 * scale * np.sin(xx / rng.uniform(20, 80) / scale + rng.uniform(0, 6))
    for k in range(len(cuts) + 1):
        add(band == k, STUFF[int(rng.integers(len(STUFF)))][0])
    border = np.zeros_like(ids, bool)  # unlabelled pixels along the stuff borders (COCO leaves such gaps)
    border[1:] |= band[1:] != band[:-1]
    # things: ellipses of areas from ~15^2 to ~250^2 pixels (COCO's small, medium and large), later ones in front
    for _ in range(int(rng.poisson(7)) + 1):
        side = float(np.exp(rng.uniform(np.log(15 * scale), np.log(min(250 * scale, height * 0.8)))))
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = side / 2 * rng.uniform(0.6, 1.4), side / 2 * rng.uniform(0.6, 1.4)
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        if mask.sum() > 20:
            add(mask, THINGS[int(rng.integers(len(THINGS)))][0], iscrowd=int(rng.random() < 0.05))
    ids[border] = 0
    image[border] = 128
    info = []
    for s in segments:  # what survived the later segments drawn over it, with COCO's area and bbox (x, y, w, h)
        mask = ids == s["id"]
        if mask.any():
            ys, xs = np.nonzero(mask)
            box = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            info.append({**s, "area": int(mask.sum()), "bbox": box})
    return np.clip(image, 0, 255).astype(np.uint8), ids, info


def write_coco(root, counts, seed=0, long_side=640):
    """Write a COCO 2017 panoptic download of counts = {split: images} under root; returns root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    categories = [{"id": i, "name": n, "supercategory": s, "isthing": 1} for i, n, s in THINGS]
    categories += [{"id": i, "name": n, "supercategory": s, "isthing": 0} for i, n, s in STUFF]
    image_id = 1
    for split, count in counts.items():
        img_dir, png_dir = root / f"{split}2017", root / "annotations" / f"panoptic_{split}2017"
        img_dir.mkdir(parents=True, exist_ok=True)
        png_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for _ in range(count):
            short = int(rng.integers(long_side * 9 // 16, long_side + 1))  # COCO: 360-640 for 640
            height, width = (short, long_side) if rng.random() < 0.7 else (long_side, short)  # most are landscape
            image, ids, info = _coco_image(rng, height, width, long_side / 640)
            name = f"{image_id:012d}"
            Image.fromarray(image).save(img_dir / f"{name}.jpg", quality=90)
            rgb = np.stack([ids % 256, ids // 256 % 256, ids // 256 ** 2], -1).astype(np.uint8)  # id = R + 256 G + ...
            Image.fromarray(rgb).save(png_dir / f"{name}.png")
            images.append({"id": image_id, "file_name": f"{name}.jpg", "height": height, "width": width})
            annotations.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": info})
            image_id += 1
        (root / "annotations" / f"panoptic_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=["coco"])
    p.add_argument("--out", required=True, help="folder of the synthetic download (created)")
    p.add_argument("--train", type=int, default=2000, help="training images")
    p.add_argument("--val", type=int, default=200, help="validation images")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise SystemExit(f"{args.out} is not empty; give a new folder")
    write_coco(args.out, {"train": args.train, "val": args.val}, args.seed)
    print(f"wrote a synthetic COCO panoptic download to {args.out}")


if __name__ == "__main__":
    main()
