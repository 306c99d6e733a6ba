"""Converters: the official downloads of ClevrTex, COCO, VOC, MOVi-C/D/E and Open Images -> the LMDB datasets of
data.py. This file is off the reading path: engineering around the paper, not the paper, and the one file longer
than a sitting. A student skips it and trains on the built-in `shapes` dataset; a researcher runs it once per
dataset.

Paper: "Multi-Scale Fusion for Object Representation" (Zhao et al., ICLR 2025), Appendix A.4 ("converting all
datasets into the LMDB database format ... center-cropped and resized to 128x128 ... stored in the uint8 data
type"; objects whose bounding box is under 16 pixels are not objects; at most 10 objects per COCO / VOC image).

Run:  python convert.py coco --src /data/coco                  # writes data/coco/{train,val}
      python convert.py voc --src /data/voc --split val         # one split
      python convert.py clevrtex --src /data/clevrtex --variant outd
      python convert.py movi_c --src /data/tfds/movi_c/128x128/1.0.0   # TFRecords read without TensorFlow
      python convert.py openimages --src /data/openimages --limit 100  # a first look
      python data.py info data/coco                             # what was converted, filtered, and why
docs/datasets.md says, per dataset, what is an object, what is ignored, and which split is which.

Shared rules: centre-crop to the largest square, resize to --resolution (128): images bilinear with antialias,
label maps NEAREST-EXACT; uint8; segment 0 = background, 1..K = objects, 255 = ignored (data.IGNORE). Every split
found under --src is converted (--split picks one), streamed (memory does not grow with the dataset), written to a
hidden folder and renamed when complete (data.write_lmdb). A sample that cannot be read is skipped and counted,
never fatal; what was filtered and why is counted in the meta record.

Reading order: the shared crop/resize and `assemble`; `each` (the samples of a split, in order, in one process or
--workers processes); per dataset (COCO, VOC, ClevrTex, MOVi with its TFRecord and protobuf readers, Open Images) a
`<name>_samples` generator that lists the split's samples and a function that reads one; `convert`, which streams
them into data.write_lmdb; the CLI. Imports from the project: data (the record format and the writer) and nothing else.
"""
import collections
import csv
import io
import json
import multiprocessing
import re
import struct
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data

# -----------------------------------------------------------------------------
# Shared by every converter: crop and resize, reading label files, turning an id map into 0 / 1..K / 255

CONVERTER_VERSION = 1


class ConversionError(ValueError):
    """A --src that is not the expected official layout (the message shows the layout), or a broken shard."""


def nearest_exact_index(n_in, n_out):
    """Source index of every output pixel for NEAREST-EXACT resizing: floor((i + 0.5) * n_in / n_out)."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def crop_resize_labels(labels, res):
    """(H, W) label map of any integer dtype -> (res, res), same dtype: centre square, NEAREST-EXACT (no new values)."""
    top, left, side = data.centre_square(*labels.shape[:2])
    idx = nearest_exact_index(side, res)
    return labels[top:top + side, left:left + side][idx][:, idx]


def read_rgb(path):
    """An image file as (H, W, 3) uint8 (RGBA and greyscale are converted; palette images too)."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def read_indices(path):
    """A label PNG as its stored values (H, W): palette ('P') PNGs give their indices, never their colours."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16", "1"):
            raise ValueError(f"{path} is a {im.mode} image, not an index map")
        return np.array(im)


def bbox_area(mask):
    """Area in pixels of the bounding box of a boolean mask (0 if empty)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return 0
    return int((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))


def assemble(ids, objects, ignore_ids, stats, min_bbox, max_objects):
    """Shared last step of the image converters, after cropping and resizing the id map `ids` (res, res):
    objects (list of (id, extra dict)) become labels 1..K in order; ignore_ids become 255; everything else is 0.
    The paper's filters (A.4), counted after the crop and resize: an object whose bounding box covers fewer
    than `min_bbox` pixels is not an object and is IGNORED (255: neither background nor a target, so no metric
    rewards or punishes what a model does there); then a sample with more than `max_objects` objects is dropped
    (returns None), as is one with more than 254 objects (a uint8 segment holds 1..254 besides 0 and 255; only
    with --max-objects 0). An object the crop removed entirely is counted and left out."""
    segment = np.zeros(ids.shape, np.uint8)
    for i in ignore_ids:
        segment[ids == i] = data.IGNORE
    kept = []
    for oid, extra in objects:
        mask = ids == oid
        if not mask.any():
            stats["objects_cropped_away"] = stats.get("objects_cropped_away", 0) + 1
        elif min_bbox and bbox_area(mask) < min_bbox:  # ours: a tiny object is ignored (255), not background
            segment[mask] = data.IGNORE
            stats["objects_below_min_bbox_ignored"] = stats.get("objects_below_min_bbox_ignored", 0) + 1
        else:
            kept.append((mask, extra))
    if max_objects and len(kept) > max_objects:
        stats["samples_over_max_objects_dropped"] = stats.get("samples_over_max_objects_dropped", 0) + 1
        return None
    if len(kept) > 254:  # labels 1..254: 0 is the background, 255 ignored
        stats["samples_over_254_objects_dropped"] = stats.get("samples_over_254_objects_dropped", 0) + 1
        return None
    for k, (mask, _) in enumerate(kept, start=1):
        segment[mask] = k
    return segment, [extra for _, extra in kept]


def object_sample(image, res, assembled, class_dtype):
    """The record of an image whose objects carry (class, original area): None if `assemble` dropped it."""
    if assembled is None:
        return None
    segment, extra = assembled
    return {"image": data.square_image(image, res), "segment": segment,
            "classes": np.array([c for c, _ in extra], class_dtype).reshape(-1),
            "areas": np.array([a for _, a in extra], np.float32).reshape(-1)}


def read_json(path):
    """A JSON file of the download, or a ConversionError naming it (a truncated download or unzip is common)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing; it belongs to the official download (see the layout: "
                              f"python convert.py --help)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); a truncated download or unzip? Get that file "
                              f"again") from None


def _skip(stats, path, err):
    """Count an unreadable sample (`each` names the first few, so the user can look at them); returns None, the
    converters' "no sample"."""
    stats["samples_unreadable_skipped"] = stats.get("samples_unreadable_skipped", 0) + 1
    stats["_skipped"] = f"{path}: {type(err).__name__}: {str(err)[:160]}"


def each(one, tasks, stats, workers=0, **kw):
    """The samples of a split: one(task, counts, **kw) for every task, in the tasks' order, each sample or None, its
    counts (filters, skips) added to `stats`. With workers > 0, the tasks run in that many processes: the same samples
    in the same order (the LMDB is byte-identical), at most 4 x workers in flight, so that a split of large clips is
    never held in memory."""
    def merge(counts):
        skipped = counts.pop("_skipped", None)
        for k, v in counts.items():
            stats[k] = stats.get(k, 0) + v
        if skipped and stats["samples_unreadable_skipped"] <= 5:
            print(f"  skipped {skipped}", flush=True)

    if not workers:
        for task in tasks:
            counts = {}
            sample = one(task, counts, **kw)
            merge(counts)
            yield sample
        return
    # spawn, not fork: a forked child of a process with threads (torch's, a test runner's) can wait forever on a
    # lock one of them held; one thread each, the processes share the cores
    with multiprocessing.get_context("spawn").Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(_counted, (one, task, kw)))
            if len(pending) >= 4 * workers:
                sample, counts = pending.popleft().get()
                merge(counts)
                yield sample
        while pending:
            sample, counts = pending.popleft().get()
            merge(counts)
            yield sample


def _counted(one, task, kw):  # in a worker process: the sample and its own counts
    counts = {}
    return one(task, counts, **kw), counts


def _layout_error(name, src, what):
    raise ConversionError(f"{src} does not look like the official {name} download ({what}).\n"
                          f"Expected layout:\n{LAYOUTS[name]}")


LAYOUTS = {
    "coco": "  <src>/train2017/*.jpg, <src>/val2017/*.jpg\n"
            "  <src>/annotations/panoptic_{train,val}2017.json\n"
            "  <src>/annotations/panoptic_{train,val}2017/*.png   (unzipped panoptic_{train,val}2017.zip)",
    "voc": "  <src>/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt\n"
           "  <src>/VOCdevkit/VOC2012/{JPEGImages,SegmentationObject,SegmentationClass}/",
    "clevrtex": "  <src>/clevrtex_full/<chunk>/CLEVRTEX_full_<idx:06d>.png and ..._flat.png  (chunk = idx // 1000)\n"
                "  (variants: <src>/clevrtex_outd/, clevrtex_camo/, ... with --variant)",
    "movi": "  <src>/movi_x-{train,validation,test}.tfrecord-NNNNN-of-MMMMM  (TFDS movi_x/<res>/1.0.0)\n"
            "  or Kubric scene folders <src>/{train,val}/<scene>/{rgba_00000.png, segmentation_00000.png, metadata.json}",
    "openimages": "  <src>/{train,validation,test}-annotations-object-segmentation.csv\n"
                  "  <src>/{train,validation,test}/<ImageID>.jpg\n"
                  "  <src>/{train,validation,test}-masks/**/<MaskPath>.png  (unzipped {split}-masks-{0..f}.zip)",
}


def coco_samples(src, split, res, stats, min_bbox=16, max_objects=10, workers=0):
    """COCO 2017 panoptic (paper: "we use panoptic segmentation annotations"). Things (isthing = 1, iscrowd = 0)
    are the objects, numbered in segments_info order; all stuff is merged into the background (0): "10 objects
    plus stuff", 11 slots; crowd regions and unlabeled pixels (id 0) are ignored (255). Stores `classes` (K,)
    category ids and `areas` (K,) original areas in pixels (for the size split of Tab. 7)."""
    src = Path(src)
    ann_path = src / "annotations" / f"panoptic_{split}2017.json"
    png_dir, img_dir = src / "annotations" / f"panoptic_{split}2017", src / f"{split}2017"
    js = read_json(ann_path)
    categories = js.get("categories")
    if not categories:  # the cut-down JSONs some people share lack them; the official categories file has them
        categories = read_json(src / "annotations" / "panoptic_coco_categories.json")
    isthing = {c["id"]: bool(c["isthing"]) for c in categories}
    images = {im["id"]: im for im in js["images"]}
    stats["_total"] = len(js["annotations"])  # for the progress bar's ETA (not stored)
    tasks = [(img_dir / images[ann["image_id"]]["file_name"], png_dir / ann["file_name"],
              [(s["id"], (s["category_id"], s["area"])) for s in ann["segments_info"]
               if isthing[s["category_id"]] and not s.get("iscrowd", 0)],  # the objects
              [s["id"] for s in ann["segments_info"] if s.get("iscrowd", 0)])  # crowds: ours ignored (authors: objects)
             for ann in sorted(js["annotations"], key=lambda a: a["file_name"])]
    yield from each(coco_sample, tasks, stats, workers, res=res, min_bbox=min_bbox, max_objects=max_objects)


def coco_sample(task, stats, res, min_bbox, max_objects):
    """One COCO image and its panoptic PNG -> a record, or None (unreadable, or dropped by the filters)."""
    image_file, png_file, things, crowd = task
    try:
        image = read_rgb(image_file)
        pan = np.array(Image.open(png_file).convert("RGB")).astype(np.int64)  # (H, W, 3)
        if pan.shape[:2] != image.shape[:2]:
            raise ValueError(f"panoptic PNG {pan.shape[:2]} and image {image.shape[:2]} differ in size")
    except (OSError, ValueError, SyntaxError) as e:
        return _skip(stats, image_file, e)
    ids = pan[..., 0] + 256 * pan[..., 1] + 256 ** 2 * pan[..., 2]  # segment id = R + 256 G + 256^2 B
    ids = crop_resize_labels(ids, res)
    return object_sample(image, res, assemble(ids, things, [0, *crowd], stats, min_bbox, max_objects), np.uint8)


def voc_root(src):
    src = Path(src)
    for root in (src / "VOCdevkit" / "VOC2012", src / "VOC2012", src):
        if (root / "ImageSets" / "Segmentation").is_dir():
            return root
    _layout_error("voc", src, "no ImageSets/Segmentation/")


def voc_samples(src, split, res, stats, min_bbox=16, max_objects=10, workers=0):  # authors: instances (paper: semantic)
    """Pascal VOC 2012 segmentation: instances from SegmentationObject (palette indices: 0 background, k = k-th
    <object> of the XML, 255 void = ignored), and each instance's class from SegmentationClass (the majority class
    of its pixels), stored as `classes` (K,): `load_dataset(..., semantic=True)` scores classes instead of
    instances (the paper's wording for VOC). Ids without masks are skipped and counted."""
    root = voc_root(src)
    ids = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    stats["_total"] = len(ids)
    yield from each(voc_sample, [(root, name) for name in ids], stats, workers, res=res, min_bbox=min_bbox,
                    max_objects=max_objects)


def voc_sample(task, stats, res, min_bbox, max_objects):
    """One VOC image id -> a record, or None (no instance mask, unreadable, or dropped by the filters)."""
    root, name = task
    obj_file = root / "SegmentationObject" / f"{name}.png"
    if not obj_file.exists():
        stats["images_without_masks_skipped"] = 1
        return None
    try:
        image = read_rgb(root / "JPEGImages" / f"{name}.jpg")
        obj, cls = read_indices(obj_file), read_indices(root / "SegmentationClass" / f"{name}.png")
        if not obj.shape == cls.shape == image.shape[:2]:
            raise ValueError(f"image {image.shape[:2]}, object mask {obj.shape}, class mask {cls.shape} differ")
    except (OSError, ValueError, SyntaxError) as e:
        return _skip(stats, obj_file, e)
    obj, cls = crop_resize_labels(obj, res), crop_resize_labels(cls, res)
    objects = []
    for k in sorted(set(np.unique(obj).tolist()) - {0, data.IGNORE}):
        votes = np.bincount(cls[(obj == k) & (cls != data.IGNORE)], minlength=256)
        objects.append((k, int(votes.argmax())))
    out = assemble(obj, objects, [data.IGNORE], stats, min_bbox, max_objects)
    if out is None:
        return None
    segment, classes = out
    return {"image": data.square_image(image, res), "segment": segment, "classes": np.array(classes, np.uint8)}


CLEVRTEX_CMAP = [(0, 0, 0), (255, 0, 0), (0, 128, 0), (0, 0, 255), (255, 255, 0), (141, 211, 199), (255, 255, 179),
                 (190, 186, 218), (251, 128, 114), (128, 177, 211), (253, 180, 98), (179, 222, 105), (252, 205, 229),
                 (217, 217, 217)]  # the palette of `_flat.png` masks (clevrtex-generation img_utils)


def clevrtex_scenes(src, variant):
    """Sorted (index, image path, mask path) of one ClevrTex variant."""
    src = Path(src)
    folder = src if src.name == f"clevrtex_{variant}" else src / f"clevrtex_{variant}"
    if not folder.is_dir():
        _layout_error("clevrtex", src, f"no clevrtex_{variant}/ folder")
    pattern = re.compile(rf"CLEVRTEX_{variant}_(\d{{6}})\.png$", re.IGNORECASE)
    scenes = []
    for p in folder.glob("*/*.png"):
        m = pattern.search(p.name)
        if m:
            scenes.append((int(m.group(1)), p, p.with_name(p.name[:-4] + "_flat.png")))
    if not scenes:
        _layout_error("clevrtex", src, f"no CLEVRTEX_{variant}_<idx>.png under {folder}/<chunk>/")
    return sorted(scenes)


def clevrtex_split(scenes, split):
    """The dataset's own convention (clevrtex_eval.py): sorted by index, test = first 10%, val = next 10%,
    train = the rest, with bounds int(fraction * N). Variants (outd, camo, ...) are evaluation sets: all of it."""
    n = len(scenes)
    bounds = {"test": (0, int(0.1 * n)), "val": (int(0.1 * n), int(0.2 * n)), "train": (int(0.2 * n), n)}
    lo, hi = bounds[split]
    return scenes[lo:hi]


def clevrtex_samples(src, split, res, stats, variant="full", workers=0):
    """ClevrTex: RGBA 320x240 renders (alpha dropped) and `_flat.png` palette masks (0 background, 1..10 objects;
    a mask re-saved as RGB is mapped back through the palette). No filter: every object is visible by design."""
    scenes = clevrtex_scenes(src, variant)
    if variant == "full":
        scenes = clevrtex_split(scenes, split)
    stats["_total"] = len(scenes)
    yield from each(clevrtex_sample, [scene[1:] for scene in scenes], stats, workers, res=res)


def clevrtex_sample(task, stats, res):
    """One ClevrTex render and its mask -> a record, or None (unreadable)."""
    image_file, mask_file = task
    try:
        image = read_rgb(image_file)
        with Image.open(mask_file) as im:
            if im.mode in ("P", "L"):
                mask = np.array(im)
            else:  # colours -> palette indices
                rgb = np.array(im.convert("RGB")).astype(np.int64)
                code = rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]
                lut = {r * 65536 + g * 256 + b: i for i, (r, g, b) in enumerate(CLEVRTEX_CMAP)}
                mask = np.vectorize(lambda c: lut.get(c, data.IGNORE), otypes=[np.uint8])(code)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask {mask.shape} and image {image.shape[:2]} differ in size")
    except (OSError, ValueError, SyntaxError) as e:
        return _skip(stats, image_file, e)
    return {"image": data.square_image(image, res), "segment": crop_resize_labels(mask.astype(np.uint8), res)}


# --- MOVi without TensorFlow: TFRecord framing and the tf.train.Example protobuf, parsed by hand.
# TFRecord: records of  uint64 length | uint32 masked CRC32C of the length | data | uint32 masked CRC32C of data.
# tf.train.Example = {1: Features}; Features = {1: map entry {1: key string, 2: Feature}} (repeated);
# Feature = oneof {1: BytesList, 2: FloatList, 3: Int64List}, each {1: repeated value} (numbers usually packed).
# Protobuf wire format: a key varint (field << 3 | wire type); types 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.

def _crc32c_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(buf):
    """CRC-32C (Castagnoli), the checksum of TFRecord; pure Python, used on the 8-byte length headers."""
    c = 0xFFFFFFFF
    for byte in buf:
        c = _CRC32C[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc(buf):
    c = crc32c(buf)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecords(path):
    """Yield the records of one TFRecord file. Each length header's CRC is checked (a cheap guard against reading
    garbage as a length); a file that ends inside a record raises ConversionError naming the file and offset."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        while True:
            offset = f.tell()
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                raise ConversionError(f"{path}: truncated TFRecord header at byte offset {offset} (file size {size})")
            length, crc = struct.unpack("<QI", head)
            if masked_crc(head[:8]) != crc:
                raise ConversionError(f"{path}: corrupt TFRecord length at byte offset {offset} (CRC mismatch)")
            if offset + 12 + length + 4 > size:
                raise ConversionError(f"{path}: truncated TFRecord: the record at byte offset {offset} needs "
                                      f"{length + 16} bytes, the file ends after {size - offset}")
            record = f.read(length)
            f.read(4)  # the data CRC: not checked (pure-Python CRC32C of megabytes would dominate the time)
            yield record


def count_tfrecords(path):
    """Number of records of a TFRecord file, by hopping from header to header (reads 12 bytes per record)."""
    n, size = 0, Path(path).stat().st_size
    with open(path, "rb") as f:
        while f.tell() + 12 <= size:
            (length,) = struct.unpack("<Q", f.read(8))
            f.seek(4 + length + 4, 1)
            n += 1
    return n


def _varint(buf, pos):
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf):
    """(field number, wire type, value) of a protobuf message; value: int, or bytes for length-delimited."""
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def parse_example(buf):
    """A serialized tf.train.Example -> {key: list of bytes | np.float32 array | np.int64 array}."""
    out = {}
    for f, _, features in _fields(buf):
        if f != 1:
            continue
        for f2, _, entry in _fields(features):
            if f2 != 1:
                continue
            key, feature = None, b""
            for f3, _, v in _fields(entry):
                if f3 == 1:
                    key = bytes(v).decode()
                elif f3 == 2:
                    feature = v
            out[key] = _parse_feature(feature)
    return out


def _parse_feature(buf):
    for kind, _, lst in _fields(buf):
        if kind == 1:  # BytesList
            return [bytes(v) for f, _, v in _fields(lst) if f == 1]
        if kind == 2:  # FloatList: packed (one length-delimited run) or one fixed32 per value
            parts = [np.frombuffer(v, "<f4") for f, _, v in _fields(lst) if f == 1]
            return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
        if kind == 3:  # Int64List: packed varints or one varint per value; two's complement for negatives
            vals = []
            for f, wire, v in _fields(lst):
                if f != 1:
                    continue
                if wire == 2:
                    pos = 0
                    while pos < len(v):
                        x, pos = _varint(v, pos)
                        vals.append(x)
                else:
                    vals.append(v)
            return np.array([x - (1 << 64) if x >= 1 << 63 else x for x in vals], np.int64)
    return []


def _decode_png(buf):
    with Image.open(io.BytesIO(buf)) as im:
        return np.array(im)


def dense_bboxes(bboxes, bbox_frames, row_lengths, frames):
    """Sparse per-instance boxes (TFDS BBoxFeature: normalised [ymin, xmin, ymax, xmax], only for the frames listed
    in bbox_frames) -> dense (T, K, 4) float32 in our (x0, y0, x1, y1) order, zeros where an instance is not
    visible (the authors' convention)."""
    k = len(row_lengths)
    out = np.zeros((frames, k, 4), np.float32)
    boxes = np.asarray(bboxes, np.float32).reshape(-1, 4)
    start = 0
    for i, n in enumerate(row_lengths):
        for j in range(int(n)):
            out[int(bbox_frames[start + j]), i] = boxes[start + j][[1, 0, 3, 2]]
        start += int(n)
    return out


def movi_video(frames, segments, bbox, res):
    """(T, H, W, 3) uint8, (T, H, W), (T, K, 4) -> cropped and resized, boxes moved into the crop (clipped)."""
    h, w = frames.shape[1:3]
    top, left, side = data.centre_square(h, w)
    image = np.stack([data.square_image(f, res) for f in frames])
    segment = np.stack([crop_resize_labels(s, res) for s in segments]).astype(np.uint8)
    if (h, w) != (side, side):
        scale = np.array([w, h, w, h], np.float32) / side
        shift = np.array([left, top, left, top], np.float32) / side
        visible = bbox.any(-1, keepdims=True)
        bbox = np.where(visible, np.clip(bbox * scale - shift, 0, 1), 0).astype(np.float32)
    return {"image": image, "segment": segment, "bbox": bbox.astype(np.float32)}


OFFICIAL_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # ours -> TFDS (MOVi) and Open Images


def movi_shards(src, split):
    src = Path(src)
    return sorted(p for p in src.glob(f"*-{OFFICIAL_SPLITS[split]}.tfrecord-*") if p.is_file())


def movi_samples(src, split, res, stats, workers=0):
    """MOVi-C/D/E: 24 frames, segmentation 0 = background and k = k-th instance (sorted by visibility), all instances
    kept (up to 23 in D/E; the slot count is a model choice). From the TFDS shards, or from Kubric scene folders."""
    shards = movi_shards(src, split)
    if shards:
        stats["_total"] = sum(count_tfrecords(s) for s in shards)
        records = ((shard, record) for shard in shards for record in tfrecords(shard))  # read lazily, in order
        yield from each(movi_record, records, stats, workers, res=res)
    else:  # raw Kubric worker output
        scenes = sorted(p.parent for p in (Path(src) / split).glob("*/metadata.json"))
        stats["_total"] = len(scenes)
        yield from each(movi_scene, scenes, stats, workers, res=res)


def movi_record(task, stats, res):
    """One TFRecord of a MOVi shard (a tf.train.Example of a clip) -> a record, or None (undecodable)."""
    shard, record = task
    try:
        ex = parse_example(record)
        frames = np.stack([_decode_png(b) for b in ex["video"]])  # (T, H, W, 3)
        segments = np.stack([_decode_png(b) for b in ex["segmentations"]])  # (T, H, W[, 1])
        segments = segments.reshape(segments.shape[:3])
        bbox = dense_bboxes(ex["instances/bboxes/ragged_flat_values"], ex["instances/bbox_frames/ragged_flat_values"],
                            ex["instances/bboxes/ragged_row_lengths_0"], len(frames))
    except (KeyError, ValueError, OSError, IndexError, SyntaxError) as e:
        return _skip(stats, shard, e)
    return movi_video(frames, segments, bbox, res)


def movi_scene(scene, stats, res):
    """One Kubric scene folder -> a record, or None (unreadable)."""
    try:
        meta = json.loads((scene / "metadata.json").read_text())
        n = meta["metadata"]["num_frames"]
        frames = np.stack([read_rgb(scene / f"rgba_{t:05d}.png") for t in range(n)])
        segments = np.stack([read_indices(scene / f"segmentation_{t:05d}.png") for t in range(n)])
        inst = meta["instances"]
        bbox = dense_bboxes([b for i in inst for b in i["bboxes"]], [f for i in inst for f in i["bbox_frames"]],
                            [len(i["bbox_frames"]) for i in inst], n)
    except (KeyError, ValueError, OSError, SyntaxError) as e:
        return _skip(stats, scene, e)
    return movi_video(frames, segments, bbox, res)


def openimages_samples(src, split, res, stats, min_bbox=16, max_objects=10, workers=0):
    """Open Images V5+ segmentation (the A.2 subset: the images of --src/<split>/ that have masks). One binary mask
    PNG per object, possibly at another resolution than the image: resized to the image with nearest, then > 127.
    Overlaps: objects are painted largest first, so a smaller object lying on a larger one stays visible (the rule
    of our shapes data). Pixels no mask covers are background (the annotation is not exhaustive: say so when
    reporting). Stores `classes` as indices into the meta record's `class_names` (Freebase MIDs)."""
    src, oi = Path(src), OFFICIAL_SPLITS[split]
    csv_path = src / f"{oi}-annotations-object-segmentation.csv"
    mask_files = {p.name: p for p in src.glob(f"{oi}-masks*/**/*.png")}
    rows = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            rows.setdefault(row["ImageID"], []).append(row)
    names = sorted({r["LabelName"] for rs in rows.values() for r in rs})
    class_index = {n: i for i, n in enumerate(names)}
    stats["class_names"] = names
    stats["_total"] = len(rows)
    tasks = [(src / oi / f"{image_id}.jpg", [(mask_files.get(r["MaskPath"], r["MaskPath"]),
                                               class_index[r["LabelName"]]) for r in rows[image_id]])
             for image_id in sorted(rows)]
    yield from each(openimages_sample, tasks, stats, workers, res=res, min_bbox=min_bbox, max_objects=max_objects)


def openimages_sample(task, stats, res, min_bbox, max_objects):
    """One Open Images image and its object masks -> a record, or None (not downloaded, unreadable, filtered)."""
    image_file, objects = task  # objects: (mask path, or the bare name of a mask not found; class index)
    if not image_file.exists():
        stats["images_not_downloaded_skipped"] = 1
        return None
    try:
        image = read_rgb(image_file)
        h, w = image.shape[:2]
        masks = []
        for mask_file, c in objects:
            if not isinstance(mask_file, Path):
                raise FileNotFoundError(f"mask '{mask_file}' not found")
            with Image.open(mask_file) as im:
                m = np.array(im.convert("L").resize((w, h), Image.NEAREST)) > 127
            masks.append((int(m.sum()), m, c))
    except (OSError, ValueError, SyntaxError) as e:
        return _skip(stats, image_file, e)
    ids = np.zeros((h, w), np.int64)
    masks.sort(key=lambda t: -t[0])  # largest first; later (smaller) masks paint over
    for k, (_, m, _) in enumerate(masks, start=1):
        ids[m] = k
    objects = [(k, (c, a)) for k, (a, _, c) in enumerate(masks, 1)]
    return object_sample(image, res, assemble(crop_resize_labels(ids, res), objects, [], stats, min_bbox, max_objects),
                         np.int32)


# name -> (the generator of its samples, whether the paper's object filters of A.4 apply)
CONVERTERS = {"coco": (coco_samples, True), "voc": (voc_samples, True), "clevrtex": (clevrtex_samples, False),
              "movi_c": (movi_samples, False), "movi_d": (movi_samples, False), "movi_e": (movi_samples, False),
              "openimages": (openimages_samples, True)}


def available_splits(name, src, variant="full"):
    """The splits of `name` present under `src` (a wrong --src gets the expected layout)."""
    src = Path(src)
    if not src.is_dir():
        _layout_error(name if not name.startswith("movi") else "movi", src, "no such folder")
    if name == "coco":
        found = [s for s in ("train", "val") if (src / "annotations" / f"panoptic_{s}2017.json").exists()]
    elif name == "voc":
        seg = voc_root(src) / "ImageSets" / "Segmentation"
        found = [s for s in ("train", "val") if (seg / f"{s}.txt").exists()]
    elif name == "clevrtex":
        clevrtex_scenes(src, variant)  # raises with the layout if absent
        found = ["train", "val", "test"] if variant == "full" else [variant]
    elif name.startswith("movi"):
        found = [s for s in ("train", "val", "test") if movi_shards(src, s) or list((src / s).glob("*/metadata.json"))]
    else:
        found = [s for s, oi in OFFICIAL_SPLITS.items() if (src / f"{oi}-annotations-object-segmentation.csv").exists()]
    if not found:
        _layout_error(name if not name.startswith("movi") else "movi", src, "none of its splits was found")
    return found


def source_split_name(name, split, variant="full"):
    """Where our split comes from in the official download (recorded in the meta record)."""
    if name == "coco":
        return f"{split}2017 + annotations/panoptic_{split}2017.json"
    if name == "voc":
        return f"ImageSets/Segmentation/{split}.txt"
    if name == "clevrtex":
        if variant != "full":
            return f"clevrtex_{variant}, all scenes"
        return f"clevrtex_full, the {dict(test='first 10%', val='next 10%', train='last 80%')[split]} of the sorted indices"
    return OFFICIAL_SPLITS[split]  # MOVi, Open Images


def convert(name, src, out, splits=None, resolution=128, limit=0, overwrite=False, min_bbox=16, max_objects=10,
            variant="full", quiet=False, workers=0):
    """Convert every split of an official download (or `splits`) into out/<split>; returns {split: count}. workers:
    processes that read and prepare the samples (0: this one); the bytes written are the same."""
    from tqdm import tqdm
    out, found = Path(out), available_splits(name, src, variant)
    todo = splits or found
    for split in todo:
        if split not in found:
            raise ConversionError(f"split '{split}' is not in {src} (found: {', '.join(found)})")
        if (out / split).exists() and not overwrite:
            raise FileExistsError(f"{out / split} already exists; pass --overwrite to convert again")
    samples_fn, filters = CONVERTERS[name]
    counts = {}
    for split in todo:
        stats = {}
        kwargs = dict(min_bbox=min_bbox, max_objects=max_objects) if filters else {}
        if name == "clevrtex":
            kwargs["variant"] = variant
        stream = samples_fn(src, split if name != "clevrtex" or variant == "full" else "test", resolution, stats,
                            workers=workers, **kwargs)
        meta = dict(name=name, split=split, resolution=resolution, source=str(Path(src).resolve()),
                    source_split=source_split_name(name, split, variant),
                    converter_version=CONVERTER_VERSION, filtered=stats,
                    settings=dict(kwargs, limit=limit, crop="centre square", image_resize="bilinear+antialias",
                                  mask_resize="nearest-exact"))

        def kept():  # the stream without skipped/dropped samples, with a progress bar, the max objects, --limit
            bar = tqdm(desc=f"{name}/{split}", unit="sample", disable=quiet, mininterval=1.0)
            n = 0
            for s in stream:
                bar.update(1)
                if "class_names" in stats:  # openimages: the class vocabulary goes to the meta record
                    meta["class_names"] = stats.pop("class_names")
                if "_total" in stats:  # the number of source samples, known once the stream started: ETA
                    bar.total = stats.pop("_total")
                    bar.refresh()
                if s is None:
                    continue
                labels = int(s["segment"][s["segment"] != data.IGNORE].max(initial=0))  # highest object label
                tracked = s["bbox"].shape[1] if "bbox" in s else 0  # videos: instances, visible or not
                meta["max_objects"] = max(meta["max_objects"], labels, tracked)
                yield s
                n += 1
                if limit and n >= limit:
                    break
            bar.close()
            if n == 0:  # an empty split would train on nothing and score nothing: stop, name every reason
                counts = {k: v for k, v in stats.items() if not k.startswith("_") and k != "class_names"}
                why = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items()) or "the download lists none"
                raise ConversionError(f"{name}/{split}: no sample kept, nothing written ({why}). Check the download "
                                      f"against docs/datasets.md{'; the filters are --min-object-bbox and --max-objects' if filters else ''}")
        meta["max_objects"] = 0
        counts[split] = data.write_lmdb(out / split, kept(), meta, overwrite=overwrite)
        if not quiet:
            print(f"wrote {out / split}: {counts[split]} samples; filtered: {json.dumps(stats)}", flush=True)
    return counts


# -----------------------------------------------------------------------------
# Command line: one sub-command per dataset


def main(argv=None):
    parser = data.ArgumentParser(description="Convert an official dataset download into MSF's LMDB format.")
    sub = parser.add_subparsers(dest="dataset", required=True)
    for name in CONVERTERS:
        p = sub.add_parser(name, help=f"convert the official {name} download (docs/datasets.md: what it holds)")
        p.add_argument("--src", required=True, help=data.SOURCES[name])
        p.add_argument("--out", default=None, help=f"output folder (default data/{name})")
        p.add_argument("--split", default=None, help="convert only this split (train, val, test; default: all found)")
        p.add_argument("--resolution", type=data.number(int, 8), default=128, help="side of the stored square (paper: 128)")
        p.add_argument("--limit", type=data.number(int, 0), default=0,
                       help="convert only the first N kept samples per split, for a look (0 = all)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing conversion")
        p.add_argument("--workers", type=data.number(int, 0), default=0,
                       help="processes that decode and resize the samples, e.g. the number of cores (0: one process; "
                            "the LMDB written is the same)")
        if CONVERTERS[name][1]:  # the paper's object filters (A.4) apply to the real-world image datasets
            p.add_argument("--min-object-bbox", type=data.number(int, 0), default=16,
                           help="objects whose bounding box covers fewer pixels (at --resolution) are ignored (0: off)")
            p.add_argument("--max-objects", type=data.number(int, 0), default=10,
                           help="drop samples with more objects (0: off)")
        if name == "clevrtex":
            p.add_argument("--variant", default="full", help="full (train/val/test), or an evaluation set: outd, camo, ...")
    args = parser.parse_args(argv)
    try:
        convert(args.dataset, args.src, args.out or Path("data") / args.dataset, [args.split] if args.split else None,
                args.resolution, args.limit, args.overwrite, getattr(args, "min_object_bbox", 0),
                getattr(args, "max_objects", 0), getattr(args, "variant", "full"), workers=args.workers)
    except (ConversionError, FileExistsError) as e:
        sys.exit(str(e))


if __name__ == "__main__":
    main()
