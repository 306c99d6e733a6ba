"""Synthetic downloads in the official layouts, for running the whole chain (convert.py -> train_vae.py ->
train_ocl.py -> evaluate.py) at the paper's settings without the real data: test and benchmark code, not a user
feature (the pictures are random shapes; what they cost to convert and train on is what real ones cost).

COCO 2017 panoptic (what convert.py coco reads): <root>/{train,val}2017/<id>.jpg, <root>/annotations/
panoptic_{train,val}2017.json (images, annotations with segments_info, categories: things and stuff) and the
panoptic PNGs <root>/annotations/panoptic_{split}2017/<id>.png, segment id = R + 256 G + 256^2 B. Like COCO's: images
of 640 px on the long side and 360-640 on the short one, about 7 things per image from tiny (< 32^2 px) to large
(> 96^2 px), 2-3 stuff regions, one thing in 20 a crowd region, unlabelled (id 0) pixels along region borders.

MOVi-C/D/E (what convert.py movi_c reads, without TensorFlow): TFDS shards <root>/movi_c-{train,validation}.
tfrecord-00000-of-00001 of tf.train.Example records (this file's own protobuf encoder): `video` and `segmentations`
as lists of PNGs, 24 frames of 128 x 128, boxes as ragged [ymin, xmin, ymax, xmax] lists with the frames they belong
to; objects move in straight lines and leave the frame or enter it, as in Kubric's scenes.

ClevrTex (what convert.py clevrtex reads): <root>/clevrtex_full/<idx // 1000>/CLEVRTEX_full_<idx:06d>.png, RGBA
renders of 320 x 240, and CLEVRTEX_full_<idx:06d>_flat.png, palette masks (0 background, 1..10 objects, ClevrTex's
colour map); the converter splits the sorted scenes 10% test, 10% val, the rest train, as the dataset's code does.

Pascal VOC 2012 (what convert.py voc reads): <root>/VOCdevkit/VOC2012/JPEGImages/<id>.jpg (about 500 x 375),
SegmentationObject/<id>.png (palette indices: instance k, 255 void along every object's outline), SegmentationClass
/<id>.png (class 1..20 of each instance, the same void) and ImageSets/Segmentation/{train,val}.txt.

Run: python benchmarks/synthetic_downloads.py coco --out /tmp/coco_synthetic --train 2000 --val 200
     python benchmarks/synthetic_downloads.py movi_c --out /tmp/movi_synthetic --train 200 --val 20
"""
import argparse
import io
import json
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import convert  # the TFRecord framing's masked CRC-32C (a published checksum, not the reader under test)

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


def _objects_image(rng, height, width, count, void=False):
    """A picture of `count` textured ellipses over a two-tone background, later ones in front: (image (h, w, 3)
    uint8, ids (h, w) uint8 with 0 background and 1..count the objects that stayed visible, renumbered in order)."""
    yy, xx = np.mgrid[:height, :width]
    image = np.empty((height, width, 3))
    image[:] = rng.uniform(60, 200, 3)
    image[yy > rng.uniform(0.4, 0.8) * height] = rng.uniform(60, 200, 3)  # a floor
    ids = np.zeros((height, width), np.int64)
    for k in range(1, count + 1):
        side = float(np.exp(rng.uniform(np.log(0.08), np.log(0.5)))) * min(height, width)
        cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
        mask = ((yy - cy) / (side / 2 * rng.uniform(0.7, 1.3))) ** 2 + ((xx - cx) / (side / 2)) ** 2 <= 1
        image[mask] = rng.uniform(0, 255, 3) + rng.normal(0, 15, (int(mask.sum()), 3))
        ids[mask] = k
    visible = [k for k in range(1, count + 1) if (ids == k).any()]
    ids = np.searchsorted([0, *visible], ids).astype(np.uint8)  # 1..K in drawing order, no gaps
    if void:  # VOC: a void (255) band along every object's outline
        edge = np.zeros_like(ids, bool)
        edge[1:] |= ids[1:] != ids[:-1]
        edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
        ids[edge] = 255
    return np.clip(image, 0, 255).astype(np.uint8), ids


def write_clevrtex(root, counts, seed=0):
    """Write a ClevrTex download with counts["train"] + 2 x counts["val"] scenes (the converter takes 10% as test,
    10% as val); returns root."""
    root, rng = Path(root), np.random.default_rng(seed)
    palette = [c for rgb in convert.CLEVRTEX_CMAP for c in rgb]
    for idx in range(counts["train"] + 2 * counts["val"]):
        folder = root / "clevrtex_full" / str(idx // 1000)
        folder.mkdir(parents=True, exist_ok=True)
        image, ids = _objects_image(rng, 240, 320, int(rng.integers(3, 11)))
        rgba = np.concatenate([image, np.full((240, 320, 1), 255, np.uint8)], -1)  # the renders carry alpha
        Image.fromarray(rgba, mode="RGBA").save(folder / f"CLEVRTEX_full_{idx:06d}.png")
        mask = Image.fromarray(ids, mode="P")
        mask.putpalette(palette)
        mask.save(folder / f"CLEVRTEX_full_{idx:06d}_flat.png")
    return root


def write_voc(root, counts, seed=0):
    """Write a Pascal VOC 2012 segmentation download of counts = {"train": images, "val": images}; returns root."""
    voc, rng = Path(root) / "VOCdevkit" / "VOC2012", np.random.default_rng(seed)
    for folder in ("JPEGImages", "SegmentationObject", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    palette = [int(v) for v in rng.integers(0, 256, 768)]  # VOC's PNGs are palette images; only indices are read
    n = 0
    for split, count in counts.items():
        names = []
        for _ in range(count):
            name = f"2012_{n:06d}"
            height, width = (375, 500) if rng.random() < 0.7 else (500, 375)
            image, ids = _objects_image(rng, height, width, int(rng.integers(1, 6)), void=True)
            classes = np.concatenate([[0], rng.integers(1, 21, 254), [255]]).astype(np.uint8)  # instance -> class
            Image.fromarray(image).save(voc / "JPEGImages" / f"{name}.jpg", quality=90)
            for folder, labels in (("SegmentationObject", ids), ("SegmentationClass", classes[ids])):
                im = Image.fromarray(labels, mode="P")
                im.putpalette(palette)
                im.save(voc / folder / f"{name}.png")
            names.append(name)
            n += 1
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


# ----------------------------------------------------------------------------- MOVi: tf.train.Example records


def _varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number, wire, payload):
    key = _varint(number << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def encode_example(features):
    """A tf.train.Example in protobuf wire format. Values: list of bytes, float32 array (packed), or int list
    (written unpacked, one varint each, so that a reader meets both encodings)."""
    entries = b""
    for key, value in features.items():
        if isinstance(value, list) and value and isinstance(value[0], bytes):
            feature = _field(1, 2, b"".join(_field(1, 2, v) for v in value))
        elif isinstance(value, np.ndarray) and value.dtype == np.float32:
            feature = _field(2, 2, _field(1, 2, value.astype("<f4").tobytes()))
        else:
            feature = _field(3, 2, b"".join(_field(1, 0, _varint(int(v))) for v in value))
        entries += _field(1, 2, _field(1, 2, key.encode()) + _field(2, 2, feature))
    return _field(1, 2, entries)


def write_tfrecord(path, examples):
    """TFRecord framing: length, masked CRC-32C of the length, data, masked CRC-32C of the data."""
    with open(path, "wb") as f:
        for ex in examples:
            head = struct.pack("<Q", len(ex))
            f.write(head + struct.pack("<I", convert.masked_crc(head)) + ex + struct.pack("<I", convert.masked_crc(ex)))


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def movi_clip(rng, frames=24, res=128, objects=None):
    """One MOVi scene: (encoded example, video (t, res, res, 3) uint8, segmentation (t, res, res) uint8, dense
    boxes (t, k, 4) (x0, y0, x1, y1), zeros where the object is not visible)."""
    k = objects or int(rng.integers(3, 11))  # MOVi-C: 3-10 objects
    yy, xx = np.mgrid[:res, :res] / res
    video = np.empty((frames, res, res, 3), np.uint8)
    seg = np.zeros((frames, res, res), np.uint8)
    floor = rng.uniform(40, 200, 3)
    start, velocity = rng.uniform(-0.1, 1.1, (k, 2)), rng.normal(0, 0.02, (k, 2))
    radius, colour = rng.uniform(0.05, 0.15, k), rng.uniform(20, 235, (k, 3))
    for t in range(frames):
        image = np.broadcast_to(floor, (res, res, 3)) + rng.normal(0, 6, (res, res, 3))
        for i in np.argsort(-radius):  # larger objects first: smaller ones in front
            cy, cx = start[i] + t * velocity[i]
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius[i] ** 2
            image[mask] = colour[i]
            seg[t][mask] = i + 1
        video[t] = np.clip(image, 0, 255).astype(np.uint8)
    dense = np.zeros((frames, k, 4), np.float32)
    box_frames, boxes = [], []
    for i in range(k):  # the frames where object i is visible, its box there as [ymin, xmin, ymax, xmax]
        visible = [t for t in range(frames) if (seg[t] == i + 1).any()]
        box_frames.append(visible)
        for t in visible:
            ys, xs = np.nonzero(seg[t] == i + 1)
            box = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.float32) / res
            boxes.append(box)
            dense[t, i] = box[[1, 0, 3, 2]]
    flat = np.concatenate(boxes).reshape(-1) if boxes else np.zeros(0, np.float32)
    example = {"video": [png_bytes(f) for f in video], "segmentations": [png_bytes(s) for s in seg],
               "instances/bboxes/ragged_flat_values": flat,
               "instances/bboxes/ragged_row_lengths_0": [len(f) for f in box_frames],
               "instances/bbox_frames/ragged_flat_values": [t for f in box_frames for t in f],
               "instances/bbox_frames/ragged_row_lengths_0": [len(f) for f in box_frames],
               "metadata/num_instances": [k]}
    return encode_example(example), video, seg, dense


def write_movi(root, counts, seed=0, name="movi_c", frames=24, res=128):
    """Write MOVi TFDS shards of counts = {"train": scenes, "validation": scenes} under root; returns root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        write_tfrecord(root / f"{name}-{split}.tfrecord-00000-of-00001",
                       [movi_clip(rng, frames, res)[0] for _ in range(count)])
    return root


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=["coco", "clevrtex", "voc", "movi_c"])
    p.add_argument("--out", required=True, help="folder of the synthetic download (created)")
    p.add_argument("--train", type=int, default=2000, help="training images (MOVi: scenes)")
    p.add_argument("--val", type=int, default=200, help="validation images (MOVi: scenes)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise SystemExit(f"{args.out} is not empty; give a new folder")
    if args.dataset in ("coco", "clevrtex", "voc"):
        dict(coco=write_coco, clevrtex=write_clevrtex, voc=write_voc)[args.dataset](
            args.out, {"train": args.train, "val": args.val}, args.seed)
    else:
        write_movi(args.out, {"train": args.train, "validation": args.val}, args.seed)
    print(f"wrote a synthetic {args.dataset} download to {args.out}")


if __name__ == "__main__":
    main()
