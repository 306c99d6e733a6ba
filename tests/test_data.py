"""data.py: the record format, atomic LMDB writes, the built-in shapes dataset and load_dataset.

Oracles: an independent ray-casting rasteriser for the shape masks, byte equality for reproducibility,
a poisoned pickle module for "no unpickling", hand-made records for the video layout.
Run: python -m pytest -q tests/test_data.py
"""
import pickle

import numpy as np
import pytest
import torch

import data
import shapes


# ----------------------------------------------------------------------------- records

def test_record_round_trip_all_dtypes():
    rng = np.random.default_rng(0)
    arrays = {"image": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
              "segment": rng.integers(0, 256, (5, 7), dtype=np.uint8),
              "bbox": rng.random((3, 2, 4), dtype=np.float32),
              "area": rng.integers(0, 10 ** 9, (4,), dtype=np.int64),
              "empty": np.zeros((0, 4), np.float32)}
    back = data.decode_record(data.encode_record(arrays))
    assert list(back) == list(arrays)
    for k in arrays:
        assert back[k].dtype == arrays[k].dtype and back[k].shape == arrays[k].shape
        np.testing.assert_array_equal(back[k], arrays[k])


def test_record_refuses_objects_and_foreign_bytes():
    with pytest.raises(TypeError):
        data.encode_record({"x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="magic"):
        data.decode_record(pickle.dumps({"image": np.zeros(3)}))


def test_lmdb_round_trip_never_unpickles(tmp_path, monkeypatch):
    samples = [{"image": np.full((4, 4, 3), i, np.uint8), "segment": np.full((4, 4), i, np.uint8)} for i in range(5)]
    n = data.write_lmdb(tmp_path / "toy" / "train", iter(samples), dict(name="toy", split="train", resolution=4))
    assert n == 5

    def poisoned(*a, **k):
        raise AssertionError("something unpickled data")
    monkeypatch.setattr(pickle, "loads", poisoned)
    monkeypatch.setattr(pickle, "load", poisoned)
    monkeypatch.setattr(pickle, "Unpickler", poisoned)
    ds = data.LMDBDataset(tmp_path / "toy" / "train")
    assert len(ds) == 5 and ds.meta["count"] == 5 and ds.meta["format_version"] == data.FORMAT_VERSION
    for i, s in enumerate(samples):
        rec = ds.record(i)
        np.testing.assert_array_equal(rec["image"], s["image"])
        item = ds[i]
        assert item["image"].shape == (3, 4, 4) and item["image"].dtype == torch.float32
        assert torch.allclose(item["image"], torch.full((3, 4, 4), (i - 127.5) / 127.5))
        assert item["segment"].dtype == torch.long and int(item["segment"][0, 0]) == i


def test_interrupted_write_leaves_nothing(tmp_path):
    def broken():
        yield {"image": np.zeros((4, 4, 3), np.uint8), "segment": np.zeros((4, 4), np.uint8)}
        raise RuntimeError("disk pulled out")
    with pytest.raises(RuntimeError):
        data.write_lmdb(tmp_path / "toy" / "train", broken(), {})
    assert list((tmp_path / "toy").iterdir()) == []  # neither the split nor a temporary folder
    with pytest.raises(data.DatasetMissing):
        data.LMDBDataset(tmp_path / "toy" / "train")


def test_overwrite_is_refused_without_flag(tmp_path):
    rec = [{"image": np.zeros((2, 2, 3), np.uint8), "segment": np.zeros((2, 2), np.uint8)}]
    data.write_lmdb(tmp_path / "a", iter(rec), {})
    with pytest.raises(FileExistsError, match="--overwrite"):
        data.write_lmdb(tmp_path / "a", iter(rec), {})
    assert data.write_lmdb(tmp_path / "a", iter(rec * 2), {}, overwrite=True) == 2


def test_video_records_yield_time_axis(tmp_path):
    T, K = 3, 2
    rec = {"image": np.zeros((T, 8, 8, 3), np.uint8), "segment": np.ones((T, 8, 8), np.uint8),
           "bbox": np.tile(np.array([0.1, 0.2, 0.5, 0.9], np.float32), (T, K, 1))}
    data.write_lmdb(tmp_path / "v", iter([rec]), dict(name="movi_c", split="train", resolution=8))
    item = data.LMDBDataset(tmp_path / "v")[0]
    assert item["image"].shape == (T, 3, 8, 8) and item["segment"].shape == (T, 8, 8)
    assert item["bbox"].shape == (T, K, 4) and torch.allclose(item["bbox"][2, 1], torch.tensor([0.1, 0.2, 0.5, 0.9]))


# ----------------------------------------------------------------------------- shapes

def _inside_polygon(px, py, vx, vy):
    """Ray casting (Jordan curve) point-in-polygon, vectorised over points; an oracle independent of the
    generator's half-plane test."""
    inside = np.zeros(px.shape, bool)
    n = len(vx)
    for i in range(n):
        x0, y0, x1, y1 = vx[i], vy[i], vx[(i + 1) % n], vy[(i + 1) % n]
        crosses = (y0 > py) != (y1 > py)
        x_at = x0 + (py - y0) * (x1 - x0) / np.where(y1 == y0, 1e-12, y1 - y0)
        inside ^= crosses & (px < x_at)
    return inside


def _oracle_mask(obj, res):
    """Pixel centres inside the object, from the documented geometry of each kind."""
    yy, xx = np.mgrid[0:res, 0:res] + 0.5
    c, s = np.cos(obj["angle"]), np.sin(obj["angle"])
    half = obj["size"] / 2
    u = (c * (xx - obj["cx"]) + s * (yy - obj["cy"])) / half
    v = (-s * (xx - obj["cx"]) + c * (yy - obj["cy"])) / half
    kind = obj["kind"]
    if kind == "ellipse":
        return u ** 2 + (v / 0.7) ** 2 <= 1
    if kind == "rectangle":
        return _inside_polygon(u, v, [-1, 1, 1, -1], [-0.65, -0.65, 0.65, 0.65])
    if kind == "diamond":
        return _inside_polygon(u, v, [1, 0, -1, 0], [0, 1, 0, -1])
    n = {"triangle": 3, "hexagon": 6, "star": 3}[kind]
    ang = 2 * np.pi * np.arange(n) / n  # vertices on the unit circle
    inside = _inside_polygon(u, v, np.cos(ang), np.sin(ang))
    if kind == "star":
        inside |= _inside_polygon(u, v, np.cos(ang + np.pi), np.sin(ang + np.pi))
    return inside


def test_shapes_masks_are_exact():
    res = 64
    for i in range(40):
        rng = np.random.default_rng([7, 0, i])
        image, segment, objects = shapes.render_shapes_sample(rng, res, return_objects=True)
        expected = np.zeros((res, res), np.uint8)
        for k, obj in enumerate(objects, start=1):  # drawn back to front: later objects cover earlier ones
            expected[_oracle_mask(obj, res)] = k
        np.testing.assert_array_equal(segment, expected, err_msg=f"sample {i}")
        assert 2 <= len(objects) <= 6
        assert set(np.unique(segment)) <= set(range(len(objects) + 1))
        for k in range(1, len(objects) + 1):
            assert (segment == k).sum() >= 6, "every object stays visible"
        # the image is painted with the same masks: every object pixel differs from where the background was
        assert image.dtype == np.uint8 and image.shape == (res, res, 3)


def test_shapes_sizes_spread_at_least_8x():
    sizes = []
    for i in range(400):
        _, _, objects = shapes.render_shapes_sample(np.random.default_rng([0, 0, i]), 64, return_objects=True)
        sizes += [o["size"] for o in objects]
    sizes = np.array(sizes)
    assert sizes.min() >= 64 * 3 / 32 - 1e-9 and sizes.max() <= 64 * 3 / 4 + 1e-9
    assert sizes.max() / sizes.min() >= 7.5  # 8x by construction (6 to 48 px)
    assert (sizes < 12).mean() > 0.08 and (sizes > 30).mean() > 0.2  # both small and large objects are common


def test_object_sides_set_the_spread_of_sizes_and_the_meta_record_says_so(tmp_path, capsys):
    """--object-sides lo,hi: every object's side within [lo, hi] px at 64 px (24,24: all alike; 3,60: the widest
    spread the generator renders, every object still visible), named in the meta record; the default writes the
    meta record it always wrote; bad values are one line."""
    for sides in ((24, 24), (3, 60)):
        drawn = []
        for i in range(40):
            _, segment, objects = shapes.render_shapes_sample(np.random.default_rng(i), 64, return_objects=True,
                                                              sides=sides)
            drawn += [o["size"] for o in objects]
            assert (np.bincount(segment.ravel())[1:] >= 6).all()  # even a 3 px object keeps 6 visible pixels
        assert sides[0] - 1e-9 <= min(drawn) and max(drawn) <= sides[1] + 1e-9
        if sides[0] < sides[1]:
            assert max(drawn) / min(drawn) > 10  # the spread is used, not only allowed
    data.main(["shapes", "--root", str(tmp_path / "alike"), "--train", "4", "--val", "2", "--object-sides", "24,24"])
    assert data.read_meta(tmp_path / "alike" / "shapes" / "train")["object_sides"] == [24.0, 24.0]
    data.main(["shapes", "--root", str(tmp_path / "plain"), "--train", "4", "--val", "2"])
    assert "object_sides" not in data.read_meta(tmp_path / "plain" / "shapes" / "train")
    for bad, why in (("2,40", "need 3 <= smallest <= largest <= 60"), ("a,b", "give two numbers")):
        with pytest.raises(SystemExit, match=why):
            data.main(["shapes", "--root", str(tmp_path / "bad"), "--object-sides", bad])


def test_shapes_are_reproducible_and_seeded(tmp_path):
    a = data.write_shapes(tmp_path / "a", 64, seed=3, counts={"train": 6, "val": 2}, quiet=True)
    b = data.write_shapes(tmp_path / "b", 64, seed=3, counts={"train": 9, "val": 2}, quiet=True)
    c = data.write_shapes(tmp_path / "c", 64, seed=4, counts={"train": 6, "val": 2}, quiet=True)
    da, db, dc = (data.LMDBDataset(p / "train") for p in (a, b, c))
    for i in range(6):  # sample i does not depend on the count
        assert data.encode_record(da.record(i)) == data.encode_record(db.record(i))
    assert any(not np.array_equal(da.record(i)["image"], dc.record(i)["image"]) for i in range(6))
    assert not np.array_equal(da.record(0)["image"], data.LMDBDataset(a / "val").record(0)["image"])


def test_shapes_resolution_128(tmp_path):
    out = data.write_shapes(tmp_path, 128, counts={"train": 2, "val": 1}, quiet=True)
    assert out.name == "shapes-128"
    ds = data.load_dataset("shapes", "train", tmp_path, resolution=128)
    assert ds[0]["image"].shape == (3, 128, 128) and ds.meta["resolution"] == 128


# ----------------------------------------------------------------------------- load_dataset

def test_load_dataset_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="known datasets: shapes, shapes_video, clevrtex, coco"):
        data.load_dataset("imagenet", "train", tmp_path)
    with pytest.raises(data.DatasetMissing, match=r"python convert.py coco --src"):
        data.load_dataset("coco", "train", tmp_path)


def test_load_dataset_writes_shapes_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes, "SHAPES_SPLITS", {"train": (0, 4), "val": (1, 2)})
    ds = data.load_dataset("shapes", "val", tmp_path)
    assert len(ds) == 2 and (tmp_path / "shapes" / "train" / "data.mdb").exists()
    item = ds[1]
    assert item["image"].shape == (3, 64, 64) and item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["segment"].shape == (64, 64) and item["segment"].dtype == torch.long


def test_runs_started_side_by_side_write_the_builtin_dataset_once(tmp_path, monkeypatch):
    """Cells started together (compare_guidance --jobs 2) both find no data/shapes: one writes it, the other waits
    for it and reads it (without the lock the second one fails on the first one's split folders)."""
    import threading
    import time
    monkeypatch.setattr(shapes, "SHAPES_SPLITS", {"train": (0, 4), "val": (1, 2)})
    real, writes = shapes.shapes_samples, []

    def slow_samples(*args):  # a write that takes long enough for both runs to start it
        writes.append(args[1])
        for sample in real(*args):
            time.sleep(0.05)
            yield sample
    monkeypatch.setattr(shapes, "shapes_samples", slow_samples)
    results, errors = [], []

    def load():
        try:
            results.append(len(data.load_dataset("shapes", "val", tmp_path)))
        except Exception as e:  # noqa: BLE001 -- reported by the assertion below
            errors.append(e)
    threads = [threading.Thread(target=load) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and results == [2, 2]
    assert sorted(writes) == [0, 1]  # each split written once


def test_cli_info_and_refusal(tmp_path, capsys):
    data.main(["shapes", "--root", str(tmp_path), "--train", "3", "--val", "2"])
    data.main(["info", str(tmp_path / "shapes")])
    out = capsys.readouterr().out
    assert '"count": 3' in out and '"count": 2' in out and '"resolution": 64' in out
    with pytest.raises(SystemExit, match="--overwrite"):
        data.main(["shapes", "--root", str(tmp_path), "--train", "3", "--val", "2"])


def test_data_cli_names_convert_py_for_a_real_dataset(tmp_path):
    """The converters moved to convert.py: `python data.py coco ...` stops with the command to run instead."""
    with pytest.raises(SystemExit, match=r"python convert.py coco --src /x --out " + str(tmp_path)):
        data.main(["coco", "--src", "/x", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing was written


def test_select_split_is_held_out_of_train(tmp_path):
    """`select` (model selection) = the last 10% of the stored training split, at least one and at most 1,000
    records; `train` is the rest: disjoint, together the whole split, the same records for every run."""
    data.write_shapes(tmp_path, 64, counts={"train": 30, "val": 2}, quiet=True)
    train = data.load_dataset("shapes", "train", tmp_path)
    select = data.load_dataset("shapes", "select", tmp_path)
    assert len(train) == 27 and len(select) == 3 and select.meta["count"] == 30
    assert [select[i]["index"] for i in range(3)] == [27, 28, 29]  # `index`: the record's number in the split
    stored = data.LMDBDataset(tmp_path / "shapes" / "train")
    assert torch.equal(select[0]["image"], stored[27]["image"]) and torch.equal(train[26]["image"], stored[26]["image"])
    with pytest.raises(IndexError):
        train[27]
    assert [len(data.select_rows(n)) for n in (5, 30, 8000, 50000)] == [1, 3, 800, 1000]


def test_shapes_records_carry_object_areas_and_size_thresholds(tmp_path):
    """Tab. 7's size split on shapes: each record stores its objects' visible areas (the generator knows every
    object), and the meta record the thresholds (12^2 and 20^2 pixels at 64 px, scaled with the image area)."""
    data.write_shapes(tmp_path, 64, counts={"train": 3, "val": 2}, quiet=True)
    data.write_shapes(tmp_path, 128, counts={"train": 2, "val": 2}, quiet=True)
    ds = data.LMDBDataset(tmp_path / "shapes" / "val")
    for i in range(2):
        rec = ds.record(i)
        visible = np.bincount(rec["segment"].ravel(), minlength=7)[1:]
        assert rec["areas"].tolist() == visible[:len(rec["areas"])].tolist() and (visible[len(rec["areas"]):] == 0).all()
        item = ds[i]
        assert item["areas"].shape == (6,) and torch.isnan(item["areas"][len(rec["areas"]):]).all()
    assert ds.meta["size_thresholds"] == [144, 400]
    assert data.read_meta(tmp_path / "shapes-128" / "val")["size_thresholds"] == [576, 1600]


def test_dataloader_workers_read_a_split_the_main_process_holds_open(tmp_path):
    """Workers are forks of a process that holds the split open; py-lmdb refuses a second open of the same files in
    one process, so a worker must close its inherited copy first (every GPU run has workers: default 4)."""
    root = data.write_shapes(tmp_path, 64, counts={"train": 8, "val": 4}, quiet=True)
    ds = data.LMDBDataset(root / "train")
    first = ds[0]["image"]  # the main process reads: its environment is open
    for _ in range(2):  # two epochs: new workers each time
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
        batches = list(loader)
        assert len(batches) == 2 and torch.equal(batches[0]["image"][0], first)
    assert torch.equal(ds[0]["image"], first)  # the main process still reads after its workers closed theirs

