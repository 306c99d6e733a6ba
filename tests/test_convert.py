"""Converters from the official downloads: real sample files from ../shared/data (COCO panoptic, VOC, a ClevrTex
render, an Open Images image and CSV rows) are converted and compared with an independent decode of the same
files (PIL + torch's own nearest-exact / PIL's bilinear resize, the JSON / XML annotations). Where no real sample
exists (ClevrTex masks, MOVi, Open Images masks), the test writes a SYNTHETIC fixture in the documented official
format itself (for MOVi: TFRecord files of tf.train.Example records, with the protobuf encoder of
benchmarks/synthetic_downloads.py, written independently of convert.py's decoder).

Run: python -m pytest -q tests/test_convert.py
"""
import json
import shutil
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import convert
import data
from conftest import SHARED_DATA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synthetic_downloads import encode_example, png_bytes, write_tfrecord  # noqa: E402  (MOVi's format, written)

needs_samples = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real format samples) is absent")


def copy_tree(src, dst):
    shutil.copytree(src, dst, copy_function=shutil.copyfile)  # writable copies of read-only samples
    return dst


def oracle_labels(labels, res):
    """Independent crop + resize of an id map: slicing by hand, torch's own NEAREST-EXACT interpolation."""
    h, w = labels.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = torch.from_numpy(labels[top:top + s, left:left + s].astype(np.float64))[None, None]
    return F.interpolate(x, size=(res, res), mode="nearest-exact")[0, 0].numpy().astype(np.int64)


def oracle_image(path, res):
    """Independent image decode: PIL crop + PIL bilinear resize (antialiased when reducing)."""
    im = Image.open(path).convert("RGB")
    s = min(im.size)
    left, top = (im.width - s) // 2, (im.height - s) // 2
    return np.array(im.crop((left, top, left + s, top + s)).resize((res, res), Image.BILINEAR)).astype(int)


def records(path):
    ds = data.LMDBDataset(path)
    return ds, [ds.record(i) for i in range(len(ds))]


# ----------------------------------------------------------------------------- helpers


def test_nearest_exact_index_equals_torch():
    for n_in, n_out in [(360, 128), (375, 128), (128, 128), (240, 64), (7, 3), (3, 7)]:
        x = torch.arange(n_in, dtype=torch.float64)[None, None, :, None].expand(1, 1, n_in, 1)
        ref = F.interpolate(x, size=(n_out, 1), mode="nearest-exact")[0, 0, :, 0].long().numpy()
        assert (convert.nearest_exact_index(n_in, n_out) == ref).all()


def test_crc32c_known_vector():
    assert convert.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


# ----------------------------------------------------------------------------- COCO (real sample)


@pytest.mark.parametrize("count, kept", [(254, True), (255, False)])
def test_a_sample_with_more_objects_than_a_uint8_segment_holds_is_dropped_and_counted(count, kept):
    """Labels 1..254 fit a uint8 segment beside 0 (background) and 255 (ignored): with the object filter off
    (--max-objects 0) a 255th object drops the sample, counted in the meta record's stats, never a traceback."""
    ids = np.arange(1, 16 * 16 + 1).reshape(16, 16)  # one pixel per id
    stats = {}
    out = convert.assemble(ids, [(i, {}) for i in range(1, count + 1)], [], stats, min_bbox=0, max_objects=0)
    if kept:
        assert out[0].max() == 254 and len(out[1]) == 254 and not stats
    else:
        assert out is None and stats == {"samples_over_254_objects_dropped": 1}


def lmdb_items(path):
    """Every key and value of an LMDB split, as bytes."""
    import lmdb
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        items = list(txn.cursor())
    env.close()
    return items


@pytest.mark.parametrize("dataset", ["coco", "movi_c"])
def test_workers_write_the_same_bytes_and_count_the_same_skips(dataset, tmp_path, capsys):
    """--workers 2 reads and prepares the samples in two processes: the LMDB (every record and the meta record with
    its filter counts) is byte for byte that of one process, and an unreadable sample is skipped, counted and named
    once, as in one process."""
    import synthetic_downloads
    if dataset == "coco":
        src = synthetic_downloads.write_coco(tmp_path / "src", {"train": 2, "val": 9}, long_side=160)
        broken = sorted((src / "annotations" / "panoptic_val2017").glob("*.png"))[3]
    else:
        src = synthetic_downloads.write_movi(tmp_path / "src", {"validation": 9}, frames=4, res=32)
        broken = None
    if broken:
        broken.write_bytes(b"not a png")
    one = convert.convert(dataset, src, tmp_path / "one", splits=["val"], resolution=32, quiet=True)
    first = capsys.readouterr().out
    two = convert.convert(dataset, src, tmp_path / "two", splits=["val"], resolution=32, quiet=True, workers=2)
    assert one == two and lmdb_items(tmp_path / "one" / "val") == lmdb_items(tmp_path / "two" / "val")
    if broken:
        assert one["val"] == 8 and data.read_meta(tmp_path / "two" / "val")["filtered"]["samples_unreadable_skipped"] == 1
        assert capsys.readouterr().out.count("skipped ") == first.count("skipped ") == 1


@needs_samples
def test_coco_panoptic_real_sample(tmp_path):
    src = SHARED_DATA / "coco"
    convert.convert("coco", src, tmp_path / "coco", resolution=128, min_bbox=0, max_objects=0, quiet=True)
    ds, (rec,) = records(tmp_path / "coco" / "val")
    js = json.loads((src / "annotations" / "panoptic_val2017.json").read_text())
    ann = js["annotations"][0]
    isthing = {c["id"]: c["isthing"] for c in js["categories"]}
    pan = np.array(Image.open(src / "annotations" / "panoptic_val2017" / ann["file_name"])).astype(np.int64)
    ids = oracle_labels(pan[..., 0] + 256 * pan[..., 1] + 65536 * pan[..., 2], 128)
    expected, classes, areas = np.zeros((128, 128), np.int64), [], []
    expected[ids == 0] = 255
    for s in ann["segments_info"]:
        if s["iscrowd"]:
            expected[ids == s["id"]] = 255
        elif isthing[s["category_id"]] and (ids == s["id"]).any():
            classes.append(s["category_id"])
            areas.append(s["area"])
            expected[ids == s["id"]] = len(classes)
    assert (rec["segment"] == expected).all()
    assert rec["classes"].tolist() == classes and rec["areas"].tolist() == areas
    assert (expected == 255).any() and len(classes) > 10  # void/crowd present; a busy image
    assert np.abs(rec["image"].astype(int) - oracle_image(src / "val2017" / "000000439180.jpg", 128)).max() <= 2
    assert ds.meta["max_objects"] == len(classes) and ds.meta["converter_version"] == convert.CONVERTER_VERSION
    item = ds[0]
    assert item["areas"].shape == (len(classes),) and item["classes"].tolist() == classes

    # the paper's filters (defaults): tiny objects become ignored, then this image has > 10 objects: dropped
    # (a split that keeps no sample is refused with the reasons counted, and nothing is written)
    with pytest.raises(convert.ConversionError, match=r"coco/val: no sample kept, nothing written \(objects cropped "
                                                      r"away: 7; samples over max objects dropped: 1\)\. Check the "
                                                      r"download.*--max-objects"):
        convert.convert("coco", src, tmp_path / "filtered", resolution=128, quiet=True)
    assert not list((tmp_path / "filtered").iterdir())  # not even a hidden temporary
    empty = copy_tree(src, tmp_path / "empty_download")
    ann_file = empty / "annotations" / "panoptic_val2017.json"
    ann_file.write_text(json.dumps({**js, "annotations": []}))
    with pytest.raises(convert.ConversionError, match=r"coco/val: no sample kept, nothing written \(the download "
                                                      r"lists none\)"):
        convert.convert("coco", empty, tmp_path / "none", resolution=128, quiet=True)
    convert.convert("coco", src, tmp_path / "loose", resolution=128, max_objects=40, quiet=True)
    (rec,) = records(tmp_path / "loose" / "val")[1]
    small = [k for k in range(1, len(classes) + 1) if convert.bbox_area(expected == k) < 16]
    for k in small:
        assert (rec["segment"][expected == k] == 255).all()  # ignored, neither background nor an object
    assert rec["segment"].max(initial=0, where=rec["segment"] != 255) == len(classes) - len(small)


# ----------------------------------------------------------------------------- VOC (real sample)


@needs_samples
def test_voc_real_sample_instances_classes_void_and_missing_masks(tmp_path):
    src = copy_tree(SHARED_DATA / "voc", tmp_path / "voc")
    root = src / "VOCdevkit" / "VOC2012"
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000063\n2011_003353\n")  # 2nd: no masks
    convert.convert("voc", src, tmp_path / "out", resolution=128, quiet=True)
    ds, (rec,) = records(tmp_path / "out" / "train")
    assert ds.meta["filtered"]["images_without_masks_skipped"] == 1
    obj = oracle_labels(np.array(Image.open(root / "SegmentationObject" / "2007_000063.png")), 128)
    assert (rec["segment"] == obj).all()  # instance k = k-th XML object; 255 void kept
    assert (rec["segment"] == 255).any()
    names = [o.find("name").text for o in ET.parse(root / "Annotations" / "2007_000063.xml").findall("object")]
    voc_ids = {"dog": 12, "chair": 9}
    assert rec["classes"].tolist() == [voc_ids[n] for n in names]
    sem = data.LMDBDataset(tmp_path / "out" / "train", semantic=True)[0]["segment"].numpy()
    cls = oracle_labels(np.array(Image.open(root / "SegmentationClass" / "2007_000063.png")), 128)
    assert (sem == cls).all()  # the semantic view equals SegmentationClass


# ----------------------------------------------------------------------------- ClevrTex (real render, synthetic masks)


def write_clevrtex(root, n, render):
    """SYNTHETIC masks: n scenes in clevrtex_full/<idx // 1000>/, image = the real render, mask = a palette PNG with
    a disc of object k at a scene-dependent place (the official encoding: indices 0..10, CMAP palette)."""
    rng = np.random.default_rng(0)
    masks = []
    for idx in range(n):
        folder = root / "clevrtex_full" / str(idx // 1000)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(render, folder / f"CLEVRTEX_full_{idx:06d}.png")
        mask = np.zeros((240, 320), np.uint8)
        yy, xx = np.mgrid[:240, :320]
        for k in range(1, rng.integers(3, 11)):
            cy, cx = rng.integers(20, 220), rng.integers(20, 300)
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(50, 900)] = k
        im = Image.fromarray(mask, mode="P")
        im.putpalette([c for rgb in convert.CLEVRTEX_CMAP for c in rgb])
        im.save(folder / f"CLEVRTEX_full_{idx:06d}_flat.png")
        masks.append(mask)
    return masks


@needs_samples
def test_clevrtex_splits_masks_and_rgba(tmp_path):
    render = SHARED_DATA / "clevrtex" / "render-no-mask.png"
    masks = write_clevrtex(tmp_path / "src", 20, render)
    convert.convert("clevrtex", tmp_path / "src", tmp_path / "out", resolution=128, quiet=True)
    counts = {s: data.read_meta(tmp_path / "out" / s)["count"] for s in ("train", "val", "test")}
    assert counts == {"test": 2, "val": 2, "train": 16}  # first 10% test, next 10% val, the rest train
    _, recs = records(tmp_path / "out" / "val")
    for rec, idx in zip(recs, (2, 3)):
        assert (rec["segment"] == oracle_labels(masks[idx], 128)).all()
        assert np.abs(rec["image"].astype(int) - oracle_image(render, 128)).max() <= 2  # RGBA -> RGB, crop, resize
    # an evaluation variant (outd, camo, ...) is converted whole, into a split named after it
    outd = tmp_path / "src" / "clevrtex_outd" / "0"
    outd.mkdir(parents=True)
    for idx in range(3):
        for suffix in ("", "_flat"):
            shutil.copyfile(tmp_path / "src" / "clevrtex_full" / "0" / f"CLEVRTEX_full_{idx:06d}{suffix}.png",
                            outd / f"CLEVRTEX_outd_{idx:06d}{suffix}.png")
    convert.convert("clevrtex", tmp_path / "src", tmp_path / "out", resolution=128, variant="outd", quiet=True)
    assert data.read_meta(tmp_path / "out" / "outd")["count"] == 3
    assert (data.LMDBDataset(tmp_path / "out" / "outd")[2]["segment"].numpy() == oracle_labels(masks[2], 128)).all()
    # a mask re-saved as RGB colours maps back through the palette
    flat = tmp_path / "src" / "clevrtex_full" / "0" / "CLEVRTEX_full_000002_flat.png"
    Image.open(flat).convert("RGB").save(flat)
    convert.convert("clevrtex", tmp_path / "src", tmp_path / "out", splits=["val"], resolution=128, overwrite=True, quiet=True)
    assert (records(tmp_path / "out" / "val")[1][0]["segment"] == oracle_labels(masks[2], 128)).all()


# ----------------------------------------------------------------------------- MOVi (synthetic TFRecords)


def movi_example(rng, t=24, res=32, k=3):
    """SYNTHETIC MOVi sample in the TFDS layout: video and segmentations as PNG lists, sparse boxes."""
    video = rng.integers(0, 256, (t, res, res, 3), dtype=np.uint8)
    seg = rng.integers(0, k + 1, (t, res, res, 1), dtype=np.uint8)
    frames = [sorted(rng.choice(t, size=rng.integers(1, t), replace=False).tolist()) for _ in range(k)]
    boxes = [rng.random((len(f), 4)).astype(np.float32) for f in frames]  # [ymin, xmin, ymax, xmax]
    ex = {"video": [png_bytes(f) for f in video], "segmentations": [png_bytes(s[..., 0]) for s in seg],
          "instances/bboxes/ragged_flat_values": np.concatenate(boxes).reshape(-1),
          "instances/bboxes/ragged_row_lengths_0": [len(f) for f in frames],
          "instances/bbox_frames/ragged_flat_values": [x for f in frames for x in f],
          "instances/bbox_frames/ragged_row_lengths_0": [len(f) for f in frames],
          "metadata/num_instances": [k], "metadata/negative_test": [-5]}
    dense = np.zeros((t, k, 4), np.float32)
    for i, (f, b) in enumerate(zip(frames, boxes)):
        dense[f, i] = b[:, [1, 0, 3, 2]]
    return encode_example(ex), video, seg[..., 0], dense


def test_movi_tfrecords_without_tensorflow(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "movi_c" / "128x128" / "1.0.0"
    src.mkdir(parents=True)
    made = {}
    for split, n in (("train", 3), ("validation", 2)):
        exs = [movi_example(rng) for _ in range(n)]
        write_tfrecord(src / f"movi_c-{split}.tfrecord-00000-of-00001", [e[0] for e in exs])
        made[split] = exs
    parsed = convert.parse_example(made["train"][0][0])
    assert parsed["metadata/negative_test"].tolist() == [-5] and parsed["metadata/num_instances"].tolist() == [3]
    convert.convert("movi_c", src, tmp_path / "out", resolution=32, quiet=True)
    ds, recs = records(tmp_path / "out" / "val")
    assert len(recs) == 2 and ds.meta["max_objects"] == 3
    for rec, (_, video, seg, dense) in zip(recs, made["validation"]):
        assert (rec["image"] == video).all() and (rec["segment"] == seg).all()  # same resolution: exact
        assert np.array_equal(rec["bbox"], dense)  # dense (T, K, 4), (x0, y0, x1, y1), zeros where not visible
    item = ds[0]
    assert item["image"].shape == (24, 3, 32, 32) and item["bbox"].shape == (24, 3, 4)

    # a truncated shard: the error names the file and the offset of the broken record
    shard = src / "movi_c-train.tfrecord-00000-of-00001"
    raw = shard.read_bytes()
    first = struct.unpack("<Q", raw[:8])[0] + 16
    shard.write_bytes(raw[:first + 100])
    with pytest.raises(convert.ConversionError, match=rf"movi_c-train.tfrecord-00000-of-00001: truncated TFRecord: "
                                                   rf"the record at byte offset {first}"):
        convert.convert("movi_c", src, tmp_path / "out2", splits=["train"], resolution=32, quiet=True)
    assert not (tmp_path / "out2" / "train").exists()  # nothing half-written is left


def test_movi_kubric_scene_folders_crop_boxes(tmp_path):
    """SYNTHETIC Kubric worker output: rgba_*.png, segmentation_*.png, metadata.json; 48x32 frames are cropped to
    the centre 32x32 square, so boxes move into the crop."""
    scene = tmp_path / "kubric" / "train" / "scene0"
    scene.mkdir(parents=True)
    rng = np.random.default_rng(1)
    t = 2
    for f in range(t):
        Image.fromarray(rng.integers(0, 256, (32, 48, 4), dtype=np.uint8), "RGBA").save(scene / f"rgba_{f:05d}.png")
        Image.fromarray(rng.integers(0, 3, (32, 48), dtype=np.uint8)).save(scene / f"segmentation_{f:05d}.png")
    meta = {"metadata": {"num_frames": t}, "instances": [
        {"bboxes": [[0.25, 0.5, 0.75, 0.75]], "bbox_frames": [1]},  # [ymin, xmin, ymax, xmax] of the 48x32 frame
        {"bboxes": [[0.0, 0.0, 0.5, 0.25], [0.1, 0.1, 0.2, 0.2]], "bbox_frames": [0, 1]}]}
    (scene / "metadata.json").write_text(json.dumps(meta))
    convert.convert("movi_d", tmp_path / "kubric", tmp_path / "out", resolution=32, quiet=True)
    (rec,) = records(tmp_path / "out" / "train")[1]
    # x in crop = (x * 48 - 8) / 32, y unchanged (the crop keeps all rows), clipped to [0, 1]
    assert np.allclose(rec["bbox"][1, 0], [(0.5 * 48 - 8) / 32, 0.25, (0.75 * 48 - 8) / 32, 0.75])
    assert np.allclose(rec["bbox"][0, 1], [0.0, 0.0, (0.25 * 48 - 8) / 32, 0.5])
    assert (rec["bbox"][0, 0] == 0).all()
    seg = np.array(Image.open(scene / "segmentation_00000.png"))
    assert (rec["segment"][0] == oracle_labels(seg, 32)).all()


# ----------------------------------------------------------------------------- Open Images (real image, synthetic masks)


@needs_samples
def test_openimages_masks_overlap_and_resolution(tmp_path):
    """The real image and the real CSV header; SYNTHETIC rows and masks (at half the image resolution), two
    overlapping objects: the smaller one is painted last and stays visible."""
    src = tmp_path / "oi"
    (src / "train").mkdir(parents=True)
    (src / "train-masks" / "train-masks-0").mkdir(parents=True)
    shutil.copyfile(SHARED_DATA / "openimages" / "train" / "0c7b2e492da6ba02.jpg", src / "train" / "0c7b2e492da6ba02.jpg")
    header = (SHARED_DATA / "openimages" / "train-annotations-object-segmentation.csv").read_text().splitlines()[0]
    w, h = Image.open(src / "train" / "0c7b2e492da6ba02.jpg").size  # 1109 x 832
    mw, mh = w // 2, h // 2
    big, small = np.zeros((mh, mw), np.uint8), np.zeros((mh, mw), np.uint8)
    big[100:300, 100:400] = 255
    small[150:200, 150:250] = 255
    rows = []
    for name, mask, mid in (("small", small, "/m/05z6w"), ("big", big, "/m/0dbvp")):  # small listed first
        path = f"0c7b2e492da6ba02_{mid[3:]}_{name}.png"
        Image.fromarray(mask).save(src / "train-masks" / "train-masks-0" / path)
        rows.append(f"{path},0c7b2e492da6ba02,{mid},{name},0,1,0,1,0.9,")
    rows.append("missing_m01.png,ffffffffffffffff,/m/01,x,0,1,0,1,0.9,")  # an image that was not downloaded
    (src / "train-annotations-object-segmentation.csv").write_text("\n".join([header, *rows]) + "\n")
    convert.convert("openimages", src, tmp_path / "out", resolution=128, quiet=True)
    ds, (rec,) = records(tmp_path / "out" / "train")
    assert ds.meta["filtered"]["images_not_downloaded_skipped"] == 1
    full = np.zeros((h, w), np.int64)
    for k, m in ((1, big), (2, small)):  # largest first
        full[np.array(Image.fromarray(m).resize((w, h), Image.NEAREST)) > 127] = k
    assert (rec["segment"] == oracle_labels(full, 128)).all()
    names = ds.meta["class_names"]
    assert [names[c] for c in rec["classes"]] == ["/m/0dbvp", "/m/05z6w"]


# ----------------------------------------------------------------------------- bad input


@needs_samples
def test_bad_inputs_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"(?s)does not look like the official coco download.*panoptic_\{train,val\}2017"):
        convert.main(["coco", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    src = copy_tree(SHARED_DATA / "voc", tmp_path / "voc")
    root = src / "VOCdevkit" / "VOC2012"
    shutil.copyfile(root / "JPEGImages" / "2007_000063.jpg", root / "JPEGImages" / "2007_999999.jpg")
    for kind in ("SegmentationObject", "SegmentationClass"):
        (root / kind / "2007_999999.png").write_bytes(b"\x89PNG broken")  # a corrupt mask
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000063\n2007_999999\n")
    out = tmp_path / "voc_out"
    convert.main(["voc", "--src", str(src), "--out", str(out)])
    meta = data.read_meta(out / "train")
    assert meta["count"] == 1 and meta["filtered"]["samples_unreadable_skipped"] == 1
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already exists; pass --overwrite"):
        convert.main(["voc", "--src", str(src), "--out", str(out)])
    # a download whose only masks are unreadable: refused with the reason, and the split already there is kept
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_999999\n")
    with pytest.raises(SystemExit, match=r"voc/train: no sample kept, nothing written \(samples unreadable skipped: "
                                         r"1\)\. Check the download"):
        convert.main(["voc", "--src", str(src), "--out", str(out), "--overwrite"])
    assert data.read_meta(out / "train")["count"] == 1
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000063\n2007_999999\n")
    convert.main(["voc", "--src", str(src), "--out", str(out), "--overwrite", "--limit", "1", "--resolution", "64"])
    assert data.read_meta(out / "train")["resolution"] == 64
    data.main(["info", str(out)])
    assert '"converter_version": 1' in capsys.readouterr().out


# ----------------------------------------------------------------------------- end to end on a converted dataset


@needs_samples
def test_converted_coco_trains_and_evaluates_with_size_split(tmp_path):
    """The real COCO sample replicated under 12 names (8 train, 4 val) -> convert.py -> train_vae.py and
    train_ocl.py at 128 px for 2 steps each -> evaluate.py prints ARI..mBO, the Tab. 7 size split, and --semantic."""
    import evaluate
    import train_ocl
    import train_vae
    src = tmp_path / "coco"
    js = json.loads((SHARED_DATA / "coco" / "annotations" / "panoptic_val2017.json").read_text())
    ann0, img0 = js["annotations"][0], js["images"][0]
    for split, ids in (("train", range(8)), ("val", range(8, 12))):
        (src / f"{split}2017").mkdir(parents=True)
        (src / "annotations" / f"panoptic_{split}2017").mkdir(parents=True)
        images, anns = [], []
        for i in ids:
            name = f"{i:012d}"
            shutil.copyfile(SHARED_DATA / "coco" / "val2017" / img0["file_name"], src / f"{split}2017" / f"{name}.jpg")
            shutil.copyfile(SHARED_DATA / "coco" / "annotations" / "panoptic_val2017" / ann0["file_name"],
                            src / "annotations" / f"panoptic_{split}2017" / f"{name}.png")
            images.append(dict(img0, id=i, file_name=f"{name}.jpg"))
            anns.append(dict(ann0, image_id=i, file_name=f"{name}.png"))
        (src / "annotations" / f"panoptic_{split}2017.json").write_text(
            json.dumps(dict(js, images=images, annotations=anns)))
    root = tmp_path / "data"
    convert.main(["coco", "--src", str(src), "--out", str(root / "coco"), "--max-objects", "40"])
    vae_out, ocl_out = tmp_path / "vae", tmp_path / "ocl"
    train_vae.main(["--dataset", "coco", "--data-root", str(root), "--out", str(vae_out), "--channels", "16",
                    "--steps", "2", "--batch-size", "4", "--val-batches", "1"])
    train_ocl.main(["--dataset", "coco", "--data-root", str(root), "--vae-ckpt", str(vae_out / "best.pt"),
                    "--out", str(ocl_out), "--size", "cpu", "--slot-dim", "32", "--dec-dim", "32", "--dec-layers", "1",
                    "--steps", "2", "--batch-size", "4", "--val-batches", "1", "--encoder", "cnn"])  # the data is tested
    evaluate.main(["--ckpt", str(ocl_out / "best.pt"), "--json", str(tmp_path / "m.json")])
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert metrics["ari"]["count"] == 4 and -1 <= metrics["ari"]["mean"] <= 1
    assert {"miou_small", "miou_medium", "miou_large"} <= metrics.keys()  # Tab. 7 from the stored areas
    assert metrics["miou_small"]["count"] == 4  # this image has small, medium and large things
    evaluate.main(["--ckpt", str(ocl_out / "best.pt"), "--semantic", "--json", str(tmp_path / "s.json")])
    semantic = json.loads((tmp_path / "s.json").read_text())["metrics"]
    assert "miou_small" not in semantic and semantic["miou"]["mean"] != metrics["miou"]["mean"]
    # the authors' protocol on real COCO annotations (unannotated and crowd pixels = 255 here): a slot covering them
    # only grows the union, so mIoU and mBO can only fall; ARI and ARIfg drop those pixels in both protocols
    authors = evaluate.main(["--ckpt", str(ocl_out / "best.pt"), "--protocol", "authors"])["metrics"]
    assert authors["ari"] == metrics["ari"] and authors["ari_fg"] == metrics["ari_fg"]
    assert authors["miou"]["mean"] <= metrics["miou"]["mean"] and authors["mbo"]["mean"] <= metrics["mbo"]["mean"]
    assert authors["mbo"]["mean"] < metrics["mbo"]["mean"]  # (this image has unannotated pixels the slots cover)


@pytest.mark.parametrize("dataset", ["coco", "movi_c"])
def test_the_paper_chain_runs_end_to_end_on_a_synthetic_download(dataset, tmp_path):
    """benchmarks/paper_chain.py --tiny: a synthetic download in the official layout (COCO panoptic: things, stuff,
    crowd regions, unlabelled borders; MOVi: TFDS shards of moving objects) -> convert.py -> train_vae.py and
    train_ocl.py (COCO: the README's --code-dim 4 / --decoder diffusion; MOVi: STEVE with A.5's MOVi-C recipe; DINO
    random), each stopped by SIGTERM after its first checkpoint and continued with --resume for the steps left ->
    evaluate.py scores the val samples that were kept; COCO's feature cache holds DINO's fp16 map per training image.
    The ClevrTex and VOC converters are tested on real samples (test_clevrtex_splits_masks_and_rgba,
    test_voc_real_sample_instances_classes_void_and_missing_masks), their training is any image dataset's, and
    `python benchmarks/paper_chain.py --dataset voc --tiny --quick` runs their chain."""
    import paper_chain
    result = paper_chain.main(["--work", str(tmp_path / "chain"), "--dataset", dataset, "--tiny", "--train", "8",
                               "--val", "3", "--steps", "4"])
    runs = tmp_path / "chain" / "runs"
    for run in ("vae", "ocl"):
        # SIGTERM goes out when the first checkpoint (step 1) appears; a loaded machine delivers it a step or two later
        assert 1 <= result["stopped"][run] < 4
        assert torch.load(runs / run / "last.pt", weights_only=True)["step"] == 4
        steps = [json.loads(line)["step"] for line in open(runs / run / "metrics.jsonl") if '"loss"' in line]
        assert steps == [1, 2, 3, 4]  # the resumed run took the steps after the stop, none twice
    if dataset == "movi_c":  # A.5's MOVi-C recipe reached train_ocl.py with no flag
        args = torch.load(runs / "ocl" / "best.pt", weights_only=True)["args"]
        assert args["queries"] == "box" and args["clip"] == 0.02 and args["iters"] == 1 and args["clip_frames"] == 6
        assert args["val_batch_size"] == 4 and args["slots"] == 11
    kept = data.read_meta(tmp_path / "chain" / "data" / dataset / "val")["count"]
    assert result["metrics"]["ari"]["count"] == kept > 0
    if dataset in ("coco",):
        assert result["cache_bytes_per_sample"] >= 384 * 16 * 16 * 2  # DINO's (384, 16, 16) map in fp16 per image
