"""Datasets for MSF object-centric learning: the LMDB sample format, dataset presets, the built-in `shapes` and
`shapes_video` datasets, and the torch `Dataset` that every script reads through `load_dataset`.

Paper: "Multi-Scale Fusion for Object Representation" (Zhao et al., ICLR 2025), Appendix A.4
("converting all datasets into the LMDB database format ... center-cropped and resized to 128x128 ...
stored in the uint8 data type"; inputs normalised by "subtracting 127.5 and dividing by 127.5").

Run:  python data.py shapes                  # writes data/shapes/{train,val} (64x64) in seconds
      python data.py shapes_video            # writes data/shapes_video/{train,val}: 12-frame clips (64x64)
      python data.py shapes --resolution 128 # the paper's resolution, written to data/shapes-128/
      python data.py info data/shapes        # prints the meta record of every split
The real datasets (ClevrTex, COCO, VOC, MOVi-C/D/E, Open Images) are made from their official downloads by
convert.py (`python convert.py coco --src /data/coco`), which writes this same format.

On-disk format (one LMDB environment per split, `data/<name>/<split>/`):
  key b"00000000", b"00000001", ...  one sample each, encoded by `encode_record`:
      MAGIC | uint32 header length | JSON header [{name, dtype, shape, offset}] | raw array bytes
  key b"__meta__"                     JSON: name, split, count, resolution, max_objects, format_version, ...
  A sample holds `image` (H, W, 3) uint8 and `segment` (H, W) uint8 where 0 = background, 1..K = objects,
  255 = unannotated/ignored. Video samples add a time axis in front, `image` (T, H, W, 3), `segment` (T, H, W),
  and `bbox` (T, K, 4) float32 normalised (x0, y0, x1, y1).
  Records are raw arrays read with `np.frombuffer`: opening a dataset never unpickles (never runs code).
  A split is written to a hidden temporary folder and renamed when complete, so a half-written dataset is
  never mistaken for a complete one.

Reading order: PRESETS, encode_record/decode_record, write_lmdb, LMDBDataset, video_frames, clip_starts,
render_shapes_sample, write_shapes, render_shapes_video, write_shapes_video, load_dataset (the one entry point of the scripts), the CLI. Imports nothing of the project.
"""
import argparse
import json
import math
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import torch
from torch.utils.data import Dataset

FORMAT_VERSION = 1
MAGIC = b"MSFREC1\n"  # 8 bytes that open every sample record
META_KEY = b"__meta__"
IGNORE = 255  # segment value of unannotated / void pixels: they count in no metric
ALLOWED_DTYPES = {"uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64", "bool"}

# -----------------------------------------------------------------------------
# Dataset presets: defaults that explicit flags override (paper A.4-A.5 for the real datasets).
# vae_* feed train_vae.py, ocl_* feed train_ocl.py.
PAPER = dict(resolution=128, num_slots=11, video=False, vae_steps=30000, vae_batch=64, vae_val=600,  # A.4-A.5
             ocl_steps=50000, ocl_batch=32, ocl_val=1000, ocl_lr=2e-4, encoder="dino")  # A.3: DINO big-little
VIDEO = dict(PAPER, video=True, vae_batch=16, ocl_batch=8, ocl_val_batch=4,  # MOVi: 16 clips per VAE step, 8 / 4
            ocl_clip=0.02, ocl_iters=1, ocl_clip_frames=6)  # per OCL step (A.5); clipping 0.02, crops of 6 frames (A.4),
# 1 Slot Attention iteration per frame (the authors' STEVE config)
PRESETS = {
    # resolution, slots (objects + background), video?, VAE steps / batch / validation period, OCL steps / batch /
    # validation period / learning rate, primary encoder; `shapes` is sized for a 2-core CPU
    "shapes": dict(resolution=64, num_slots=7, video=False, vae_steps=400, vae_batch=16, vae_val=100,
                   ocl_steps=3200, ocl_batch=16, ocl_val=320, ocl_lr=2e-3, encoder="cnn"),
    # shapes_video: 8 clips x 3 frames per step, the image recipe's lr and clipping, 1 iteration per frame (the
    # authors' STEVE setting), the box prior on frame 0 and the predictor at a tenth of the lr (ours): what bound
    # and kept identity on the CPU (README, "Video"); 6,000 steps fit the 30 minutes with stage 1
    "shapes_video": dict(resolution=64, num_slots=6, video=True, vae_steps=400, vae_batch=8, vae_clip_frames=2,
                         vae_val=100, ocl_steps=6000, ocl_batch=8, ocl_val_batch=4, ocl_val=600, ocl_lr=2e-3,
                         ocl_iters=1, ocl_clip_frames=3, ocl_box_prior=True, ocl_predictor_lr=0.1, encoder="cnn"),
    "clevrtex": PAPER, "coco": PAPER, "voc": PAPER,
    "movi_c": VIDEO, "movi_d": dict(VIDEO, num_slots=21), "movi_e": dict(VIDEO, num_slots=21),
    "openimages": PAPER,
}
# What --src of each converter is (`python convert.py <name> --src ...`), for the messages of both files.
SOURCES = {
    "clevrtex": "the ClevrTex download folder holding clevrtex_full/",
    "coco": "the COCO 2017 folder holding train2017/, val2017/ and annotations/panoptic_*2017.json",
    "voc": "the folder holding VOCdevkit/VOC2012/",
    "openimages": "the folder holding {train,validation}-annotations-object-segmentation.csv, the images and masks",
    "movi_c": "the TFDS folder movi_c/128x128/1.0.0 (or 256x256) with its tfrecord shards",
    "movi_d": "the TFDS folder movi_d/128x128/1.0.0 (or 256x256) with its tfrecord shards",
    "movi_e": "the TFDS folder movi_e/128x128/1.0.0 (or 256x256) with its tfrecord shards",
}


class DatasetMissing(FileNotFoundError):
    """A dataset split that is not on disk; the message names the command that creates it."""


class DatasetCorrupt(ValueError):
    """A split on disk that cannot be read as written (cut short, corrupt pages, a record that contradicts the meta
    record); the message names the split folder, the record and the command that rebuilds it."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for every script, with one change: a bad flag is one line, `prog: error: ... (--help lists the
    flags)`, not the whole usage block above it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def number(kind=int, low=None, above=None):
    """An argparse type for every script's numeric flags: a finite `kind` >= low (or > above), so that a bad value
    is a one-line message at the command line, never a silent default or a traceback at step 10,000."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or (low is not None and value < low) or (above is not None and value <= above):
            bound = f">= {low}" if low is not None else f"> {above}" if above is not None else "finite"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


# -----------------------------------------------------------------------------
# Sample records: raw arrays behind a small JSON header (never a pickle).

def encode_record(arrays):
    """dict name -> np.ndarray  ->  bytes (MAGIC | len | JSON header | payload)."""
    header, chunks, offset = [], [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype.name not in ALLOWED_DTYPES:
            raise TypeError(f"array '{name}' has dtype {a.dtype}; records hold only {sorted(ALLOWED_DTYPES)}")
        header.append({"name": name, "dtype": a.dtype.name, "shape": list(a.shape), "offset": offset})
        chunks.append(a.tobytes())
        offset += a.nbytes
    head = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + b"".join(chunks)


def decode_record(buf):
    """bytes -> dict name -> np.ndarray (read-only views into `buf`; copy before writing)."""
    buf = bytes(buf)
    if buf[:8] != MAGIC:
        raise ValueError("not an MSF sample record (bad magic); was this LMDB written by another tool?")
    (n,) = struct.unpack("<I", buf[8:12])
    header = json.loads(buf[12:12 + n])
    payload = memoryview(buf)[12 + n:]
    out = {}
    for h in header:
        if h["dtype"] not in ALLOWED_DTYPES:
            raise ValueError(f"record array '{h['name']}' has disallowed dtype {h['dtype']}")
        dtype = np.dtype(h["dtype"])
        count = math.prod(h["shape"])
        start, end = h["offset"], h["offset"] + count * dtype.itemsize
        if min(h["shape"], default=0) < 0 or start < 0 or end > len(payload):  # a header that lies about the bytes
            raise ValueError(f"array '{h['name']}' claims bytes {start}..{end} of a {len(payload)}-byte payload")
        a = np.frombuffer(payload, dtype=dtype, count=count, offset=start)
        out[h["name"]] = a.reshape(h["shape"])
    return out


def write_lmdb(path, samples, meta, overwrite=False, commit_every=256):
    """Stream `samples` (an iterable of dicts of arrays) into a new LMDB at `path`.

    The data goes to a hidden sibling folder that is renamed to `path` only after the last record and the
    meta record are on disk: an interrupted write leaves no `path` behind, so it never looks complete.
    Returns the number of samples written.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, f".{path.name}.tmp-*")  # what a killed earlier write left behind
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"  # hidden, and named by this process
    if tmp.exists():
        shutil.rmtree(tmp)
    # map_size is address space, not disk: 1 TiB reserves room for any dataset, the file grows as records come
    env = lmdb.open(str(tmp), map_size=1 << 40, subdir=True, meminit=False, map_async=True)
    count = 0
    try:
        txn = env.begin(write=True)
        for sample in samples:
            txn.put(f"{count:08d}".encode(), encode_record(sample))
            count += 1
            if count % commit_every == 0:  # bounded memory: commit in chunks
                txn.commit()
                txn = env.begin(write=True)
        meta = dict(meta, count=count, format_version=FORMAT_VERSION)
        txn.put(META_KEY, json.dumps(meta).encode())  # last: a split with a meta record is a complete split
        txn.commit()
        env.sync(True)  # on disk before the rename makes it visible
    except BaseException:  # Ctrl-C included: leave nothing half-written behind
        env.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    env.close()
    if path.exists():
        close_env(path)  # a reader of the old split in this process must not keep reading the deleted files
        shutil.rmtree(path)
    os.rename(tmp, path)  # atomic on one filesystem: the split appears complete or not at all
    return count


def remove_stale_temporaries(folder, pattern):
    """Delete the temporaries `pattern` (named `...tmp-<pid>` by this code) of processes that no longer run: a killed
    write leaves its hidden folder or file behind. A live process's temporary is left alone. Returns the names."""
    removed = []
    for tmp in Path(folder).glob(pattern):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def rebuild_hint(path):
    """The command that writes a split folder again (for the messages about a damaged one)."""
    dataset = Path(path).parent
    if dataset.name.startswith("shapes"):
        name, _, res = dataset.name.partition("-")
        return f"python data.py {name} --root {dataset.parent}{f' --resolution {res}' if res else ''} --overwrite"
    return f"python convert.py {dataset.name} --src <the official download> --out {dataset} --overwrite"


_ENVS = {}  # (path, process id) -> read-only LMDB environment, shared: LMDB allows one per file per process


def open_env(path):
    """The read-only environment of a split, opened once per process (every DataLoader worker opens its own).
    A damaged one is a DatasetCorrupt naming the folder and the command that rebuilds it: in particular a data.mdb
    cut short (a full disk, an interrupted copy) would otherwise kill the process with SIGBUS at the first read of a
    page past its end, so the file's size is checked against the last page the environment says it uses."""
    key = (str(Path(path).resolve()), os.getpid())
    if key not in _ENVS:  # no lock file (read-only media work); no readahead (random access reads one record)
        # A DataLoader worker is a fork of the training process and inherits its open environments; py-lmdb (>= 3)
        # refuses to open files this process already holds open, so close the inherited copies first (closing them
        # here unmaps this process's view only; the parent keeps reading through its own)
        for inherited in [k for k in _ENVS if k[1] != os.getpid()]:
            _ENVS.pop(inherited).close()
        try:
            env = lmdb.open(key[0], readonly=True, lock=False, readahead=False, subdir=True)
            needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]  # bytes the environment's pages span
        except lmdb.Error as e:
            raise DatasetCorrupt(f"{path} is not a readable LMDB split ({type(e).__name__}: {e}); rebuild it: "
                                 f"{rebuild_hint(path)}") from None
        size = (Path(key[0]) / "data.mdb").stat().st_size
        if size < needed:
            env.close()
            raise DatasetCorrupt(f"{path}/data.mdb is cut short ({size:,} bytes, its pages need {needed:,}); rebuild "
                                 f"it: {rebuild_hint(path)}")
        _ENVS[key] = env
    return _ENVS[key]


def close_env(path):
    """Close this process's environment of a split (before the split is replaced on disk)."""
    env = _ENVS.pop((str(Path(path).resolve()), os.getpid()), None)
    if env is not None:
        env.close()


def read_meta(path):
    """The meta record of one split (a dict), or DatasetMissing if the split is absent or incomplete."""
    path = Path(path)
    if not (path / "data.mdb").exists():
        raise DatasetMissing(f"no dataset split at {path}")
    env = open_env(path)
    try:
        with env.begin() as txn:
            raw = txn.get(META_KEY)
        meta = None if raw is None else json.loads(raw)
        entries = env.stat()["entries"]
    except (lmdb.Error, ValueError) as e:  # corrupt pages, or a meta record that is not JSON
        raise DatasetCorrupt(f"{path}: its meta record cannot be read ({type(e).__name__}: {e}); rebuild it: "
                             f"{rebuild_hint(path)}") from None
    if meta is None:
        raise DatasetMissing(f"{path} has no meta record: it is not a complete MSF dataset split")
    if not isinstance(meta, dict) or not isinstance(meta.get("count"), int) or entries != meta["count"] + 1:
        raise DatasetCorrupt(f"{path}: the meta record says {meta.get('count') if isinstance(meta, dict) else '?'} "
                             f"samples, the environment holds {entries - 1}; rebuild it: {rebuild_hint(path)}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta['format_version']}, newer than this code "
                         f"({FORMAT_VERSION}); update the code or re-create the dataset")
    return meta


class LMDBDataset(Dataset):
    """One split of an LMDB dataset.

    Yields dicts: `image` float (3, H, W) in [-1, 1] ((x - 127.5) / 127.5, paper A.4) and `segment` long (H, W);
    video samples give `image` (T, 3, H, W), `segment` (T, H, W) and `bbox` (T, K, 4); `index` is the record's
    number in the split. `rows` (a range) makes the dataset a view of those records only (load_dataset's `train`
    and `select`). The LMDB environment is opened lazily in the process that reads (each worker opens its own).
    """

    def __init__(self, path, semantic=False, rows=None):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.count = self.meta["count"]
        self.rows = range(self.count) if rows is None else rows  # the records this dataset yields
        self.semantic = semantic  # segment = class ids instead of instances (needs `classes`: VOC, COCO)
        self._env, self._pid = None, None
        if self.count:  # on open, the first record against the meta record: a split that contradicts its meta
            self.record(0)  # fails here, before any training step, not after the last one

    def __len__(self):
        return len(self.rows)  # from the meta record: no scan of the keys

    def record(self, i):
        """The raw arrays of sample i, as stored, checked against the meta record: a damaged or inconsistent record
        is a DatasetCorrupt naming the split folder, the key and what is wrong, never a silent wrong sample."""
        if not 0 <= i < self.count:
            raise IndexError(f"sample {i} out of range for {self.path} ({self.count} samples)")
        if self._pid != os.getpid():  # one environment per process (fork-safe), shared by datasets of one path
            self._env, self._pid = open_env(self.path), os.getpid()
        key = f"{i:08d}".encode()
        try:
            with self._env.begin() as txn:
                buf = txn.get(key)
            if buf is None:
                raise ValueError("the record is missing")
            rec = decode_record(buf)
            problem = self._contradiction(rec)
        except (lmdb.Error, ValueError, KeyError, TypeError, struct.error) as e:
            problem = f"{type(e).__name__}: {e}"
        if problem:
            raise DatasetCorrupt(f"{self.path}, record {key.decode()}: {problem}; rebuild the split: "
                                 f"{rebuild_hint(self.path)}")
        return rec

    def _contradiction(self, rec):
        """What a record says that its split's meta record contradicts (None if nothing): image (..., res, res, 3)
        uint8, segment of the same pixels in uint8, labels 1..max_objects or 255. A few comparisons per read."""
        image, segment, res = rec.get("image"), rec.get("segment"), self.meta.get("resolution")
        if image is None or segment is None:
            return f"it holds {sorted(rec)}, not an image and a segment"
        if image.dtype != np.uint8 or image.shape[-1:] != (3,) or (res and image.shape[-3:-1] != (res, res)):
            return f"image {image.dtype} {tuple(image.shape)}, but the meta record says {res}x{res}x3 uint8"
        if segment.dtype != np.uint8 or segment.shape != image.shape[:-1]:
            return f"segment {segment.dtype} {tuple(segment.shape)} does not match image {tuple(image.shape)}"
        k = self.meta.get("max_objects")
        top = int(segment[segment != IGNORE].max(initial=0))
        if k is not None and top > max(k, rec["bbox"].shape[1] if "bbox" in rec else 0):
            return f"segment label {top}, but the meta record says at most {k} objects"
        return None

    def __getstate__(self):  # an open LMDB handle must not travel to worker processes
        state = dict(self.__dict__)
        state["_env"], state["_pid"] = None, None
        return state

    def __getitem__(self, i):
        i = self.rows[i]  # the record number (IndexError past the end, as a Dataset should)
        rec = self.record(i)
        image = rec["image"].astype(np.float32)  # (H, W, 3) or (T, H, W, 3), a writable copy
        image -= 127.5
        image /= 127.5  # in [-1, 1] (paper A.4)
        image = torch.from_numpy(image).movedim(-1, -3)  # (3, H, W) or (T, 3, H, W), a view
        out = {"image": image, "segment": torch.from_numpy(rec["segment"].astype(np.int64)),  # (H, W) / (T, H, W)
               "index": i}  # which sample: lets train_ocl.py cache per-image results
        k_max = self.meta.get("max_objects", 0)  # per-object arrays are padded to it, so that batches stack
        if "bbox" in rec:  # (T, K, 4) -> (T, k_max, 4), zero boxes = not visible
            bbox = np.zeros((rec["bbox"].shape[0], max(k_max, rec["bbox"].shape[1]), 4), np.float32)
            bbox[:, :rec["bbox"].shape[1]] = rec["bbox"]
            out["bbox"] = torch.from_numpy(bbox)
        if "areas" in rec:  # (k_max,) original area of object k+1 in pixels, NaN past K (evaluate.miou_by_size)
            out["areas"] = torch.full((k_max,), float("nan"))
            out["areas"][:len(rec["areas"])] = torch.from_numpy(rec["areas"].astype(np.float32))
        if "classes" in rec:  # (k_max,) class id of object k+1, -1 past K
            classes = torch.full((k_max,), -1, dtype=torch.long)
            classes[:len(rec["classes"])] = torch.from_numpy(rec["classes"].astype(np.int64))
            out["classes"] = classes
            if self.semantic:  # objects -> their class ids (instances of one class merge); 0 and 255 stay
                lut = torch.cat([torch.tensor([0]), classes.clamp(min=0), torch.zeros(254 - k_max, dtype=torch.long),
                                 torch.tensor([IGNORE])])  # (256,)
                out["segment"] = lut[out["segment"]]
        elif self.semantic:
            raise ValueError(f"{self.path} stores no object classes; semantic=True needs a VOC, COCO or Open Images conversion")
        return out


def video_frames(image, clip=0, generator=None):
    """The VAE is a per-frame model (Sect. 3.1: "an input image or video frame"). Images (b, 3, H, W) pass through;
    video clips (b, T, 3, H, W) become frames (b * clip, 3, H, W): `clip` consecutive frames per clip from a random
    start (the authors' MOVi VAE recipe: a 6-frame slice, any start frame), flattened into the batch. clip = 0 (or
    >= T) keeps all T frames, for validation."""
    if image.dim() == 4:
        return image
    b, t = image.shape[:2]
    if 0 < clip < t:
        start = torch.randint(0, t - clip + 1, (b,), generator=generator)  # (b,) first frame of each slice
        frames = start[:, None] + torch.arange(clip)  # (b, clip) frame indices
        image = image[torch.arange(b)[:, None], frames]  # (b, clip, 3, H, W)
    return image.flatten(0, 1)  # (b * clip, 3, H, W)


def clip_starts(frames, window, count, generator=None):
    """The first frame of `count` random strided temporal crops (A.4) of `window` frames from clips of `frames`:
    drawn from {0, w, 2w, ...} (windows that do not overlap: the authors' StridedRandomSlice, {0, 6, 12, 18} on
    MOVi's 24 frames). A window as long as the clip or longer: the whole clip, start 0. Returns (count,) long."""
    if window >= frames:
        return torch.zeros(count, dtype=torch.long)
    choices = torch.arange(0, frames - window + 1, window)  # (c,) the windows' first frames
    return choices[torch.randint(len(choices), (count,), generator=generator)]  # (count,)


# -----------------------------------------------------------------------------
# The built-in dataset `shapes`: 2-6 textured objects on a textured background, sizes spread 8x.
# MSF exists for objects of different scales, so the side length of an object spans [3/32, 3/4] of the image
# side (6 to 48 px at 64x64): the largest is 8x the smallest.
# Objects are drawn back to front, largest first, so small ones occlude large ones and stay visible.

SHAPE_KINDS = ("ellipse", "rectangle", "triangle", "diamond", "hexagon", "star")
TEXTURES = ("solid", "solid", "stripes", "checker", "dots")  # solid twice: half the objects are plain


def _shape_mask(kind, cx, cy, size, angle, xx, yy):
    """Boolean mask of one shape, sampled at pixel centres (xx, yy). `size` is the bounding side length."""
    # rotate the pixel grid into the shape's frame; u, v in units of half the size
    c, s = np.cos(angle), np.sin(angle)
    u = (c * (xx - cx) + s * (yy - cy)) / (size / 2)
    v = (-s * (xx - cx) + c * (yy - cy)) / (size / 2)
    if kind == "ellipse":  # aspect ratio fixed per kind so a shape's size is its visual size
        return u ** 2 + (v / 0.7) ** 2 <= 1.0
    if kind == "rectangle":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.65)
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    # regular polygons: inside = on the inner side of every edge (convex), star = union of two triangles
    n = {"triangle": 3, "hexagon": 6, "star": 3}[kind]
    inside = _regular_polygon(u, v, n, 0.0)
    if kind == "star":
        inside |= _regular_polygon(u, v, 3, np.pi)
    return inside


def _regular_polygon(u, v, n, phase):
    inside = np.ones(u.shape, dtype=bool)
    apothem = np.cos(np.pi / n)  # circumradius 1
    for k in range(n):
        a = phase + 2 * np.pi * (k + 0.5) / n  # outward normal of edge k
        inside &= u * np.cos(a) + v * np.sin(a) <= apothem
    return inside


def _random_colour(rng, avoid=None):
    """A saturated RGB colour (floats in 0..255), at least some distance from `avoid`."""
    for _ in range(100):
        hue = rng.uniform(0, 6)
        sat, val = rng.uniform(0.55, 1.0), rng.uniform(0.5, 1.0)
        x = val * sat * (1 - abs(hue % 2 - 1))
        rgb = [(val * sat, x, 0), (x, val * sat, 0), (0, val * sat, x),
               (0, x, val * sat), (x, 0, val * sat), (val * sat, 0, x)][int(hue)]
        rgb = (np.array(rgb) + val * (1 - sat)) * 255
        if avoid is None or np.abs(rgb - avoid).sum() > 120:
            return rgb
    return rgb


def _texture(rng, kind, base, xx, yy, res):
    """Per-pixel colour (H, W, 3) of a texture with base colour `base`."""
    other = np.clip(base * rng.uniform(0.45, 0.7), 0, 255)  # a darker shade of the same colour
    if kind == "solid":
        return np.broadcast_to(base, xx.shape + (3,))
    period = rng.uniform(res / 16, res / 8)
    angle = rng.uniform(0, np.pi)
    u = np.cos(angle) * xx + np.sin(angle) * yy
    v = -np.sin(angle) * xx + np.cos(angle) * yy
    if kind == "stripes":
        on = (u / period) % 1.0 < 0.5
    elif kind == "checker":
        on = ((u // period) + (v // period)) % 2 == 0
    else:  # dots
        on = ((u / period) % 1.0 - 0.5) ** 2 + ((v / period) % 1.0 - 0.5) ** 2 < 0.09
    return np.where(on[..., None], base, other)


def _background(rng, xx, yy, res):
    """(res, res, 3) float: one colour shaded by a smooth gradient, with faint low-frequency waves (the texture)."""
    bg_a = _random_colour(rng) * 0.5
    bg_b = bg_a * rng.uniform(0.55, 0.8)  # a darker shade of the same colour: shading, not a second region
    g_angle = rng.uniform(0, 2 * np.pi)
    t = ((np.cos(g_angle) * xx + np.sin(g_angle) * yy) / res)[..., None]  # (res, res, 1)
    t = np.clip(t - t.min(), 0, 1)
    waves = 6 * np.sin(2 * np.pi * (xx * rng.uniform(1, 3) + yy * rng.uniform(1, 3)) / res)[..., None]
    return bg_a * (1 - t) + bg_b * t + waves


def render_shapes_sample(rng, res=64, min_objects=2, max_objects=6, return_objects=False):
    """One `shapes` scene: image (res, res, 3) uint8 and exact instance masks segment (res, res) uint8.

    Object k (1-based, in drawing order) owns exactly the pixels whose centre lies inside its shape and
    inside no later shape: the image is painted with the same boolean masks, so the segment is exact.
    """
    yy, xx = np.mgrid[0:res, 0:res] + 0.5  # pixel centres, (res, res) each
    background = _background(rng, xx, yy, res)  # (res, res, 3) float
    for _ in range(100):  # resample until every object keeps enough visible pixels
        image = background.copy()  # (res, res, 3) float
        segment = np.zeros((res, res), dtype=np.uint8)
        n = int(rng.integers(min_objects, max_objects + 1))
        # side = smallest * 8^(u^0.6), u uniform: every size from 6 to 48 px occurs, skewed towards larger objects
        # (median 23 px) so that objects, not the background, hold most of the pixels a slot must explain
        sizes = np.sort(res * 3 / 32 * 8 ** (rng.uniform(size=n) ** 0.6))[::-1]
        objects, full_areas = [], []
        for k, size in enumerate(sizes, start=1):
            kind = SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
            half = size / 2
            cx, cy = rng.uniform(half, res - half), rng.uniform(half, res - half)
            angle = rng.uniform(0, 2 * np.pi)
            # work inside the shape's bounding window only (every shape lies within 1.2 * size/2 of its centre)
            r = 0.6 * size + 1
            win = (slice(max(0, int(cy - r)), min(res, int(cy + r) + 1)),
                   slice(max(0, int(cx - r)), min(res, int(cx + r) + 1)))
            mask = _shape_mask(kind, cx, cy, size, angle, xx[win], yy[win])  # (h_win, w_win) bool
            colour = _random_colour(rng, avoid=image[int(cy), int(cx)])
            texture = TEXTURES[rng.integers(len(TEXTURES))]
            image[win] = np.where(mask[..., None], _texture(rng, texture, colour, xx[win], yy[win], res), image[win])
            segment[win][mask] = k
            objects.append(dict(kind=kind, cx=cx, cy=cy, size=size, angle=angle, texture=texture))
            full_areas.append(mask.sum())
        visible = np.bincount(segment.ravel(), minlength=n + 1)[1:]
        if all(v >= max(6, 0.35 * a) for v, a in zip(visible, full_areas)):
            break
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    if return_objects:
        return image, segment, objects
    return image, segment


def _shapes_samples(seed, split_id, count, res):
    for i in range(count):
        # one generator per sample: sample i is the same whatever the count or the order of generation
        rng = np.random.default_rng([seed, split_id, i])
        image, segment = render_shapes_sample(rng, res)
        # each object's visible area in pixels (COCO's "area"), for the size split of Tab. 7 (evaluate.miou_by_size)
        areas = np.bincount(segment.ravel(), minlength=segment.max() + 1)[1:].astype(np.float32)  # (K,)
        yield {"image": image, "segment": segment, "areas": areas}


SHAPES_SPLITS = {"train": (0, 8000), "val": (1, 500)}  # split -> (id used in the seed, default count)
# Tab. 7's size split on shapes: small < 12^2 <= medium < 20^2 <= large visible pixels at 64x64 (about the
# terciles of the objects: 36% / 38% / 26%), scaled with the image area at other resolutions. COCO's thresholds
# (32^2, 96^2 of the original image) do not fit 64 px images.
SHAPES_SIZES = (12 ** 2, 20 ** 2)


# -----------------------------------------------------------------------------
# The built-in video dataset `shapes_video`: `shapes` objects that move, turn, approach or recede (their size changes
# over a clip) and occlude each other; some enter or leave the frame. Records have MOVi's layout (image (T, H, W, 3),
# segment (T, H, W), bbox (T, K, 4)): object k keeps label k in every frame, so a slot must keep its object.

def render_shapes_video(rng, res=64, frames=12, min_objects=2, max_objects=5):
    """One clip: image (T, res, res, 3) uint8, exact instance masks segment (T, res, res) uint8 (label k = object k
    in every frame), boxes bbox (T, K, 4) float32 of each object's visible pixels, normalised (x0, y0, x1, y1), zeros
    in the frames where it is not visible (MOVi's convention).

    Object k has a depth z_t (linear in t): its side is size / z_t, and objects are drawn far to near, so the drawing
    order, hence who occludes whom, can change within a clip. Positions move with a constant velocity (0.5-2 px per
    frame at 64 px); about one object in five starts outside the frame and enters, and fast ones leave. Textures are
    painted in the object's own frame, so they move and turn with it."""
    yy, xx = np.mgrid[0:res, 0:res] + 0.5  # pixel centres, (res, res) each
    background = _background(rng, xx, yy, res)  # (res, res, 3) float, static over the clip
    for _ in range(100):  # resample until every object is seen well in some frames, and one in the first
        n = int(rng.integers(min_objects, max_objects + 1))
        objects = []
        for k in range(n):
            # side at depth 1: 6 to 48 px at 64 px, skewed towards larger objects as in `shapes` (median 23 px), so
            # that objects, not the background, hold much of what a slot must explain
            size = res * 3 / 32 * 8 ** (rng.uniform() ** 0.6)
            z0 = rng.uniform(0.8, 1.25)
            z1 = z0 * rng.uniform(0.7, 1.4)  # depth at the last frame: the side changes by up to 1.4x
            speed, heading = rng.uniform(0.5, 2.0) * res / 64, rng.uniform(0, 2 * np.pi)
            vx, vy = speed * np.cos(heading), speed * np.sin(heading)
            if rng.uniform() < 0.2:  # enters: starts outside, a few frames before the border, moving inwards
                side = size / z0 / 2 + rng.uniform(0, 3) * speed
                cx, cy = rng.choice([-side, res + side]), rng.uniform(0, res)
                vx = abs(vx) * (1 if cx < 0 else -1)
            else:
                cx, cy = rng.uniform(0.15 * res, 0.85 * res), rng.uniform(0.15 * res, 0.85 * res)
            colour = _random_colour(rng, avoid=background[int(min(max(cy, 0), res - 1)), int(min(max(cx, 0), res - 1))])
            objects.append(dict(kind=SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))], size=size, z0=z0, z1=z1,
                                cx=cx, cy=cy, vx=vx, vy=vy, angle=rng.uniform(0, 2 * np.pi),
                                spin=rng.uniform(-0.08, 0.08), colour=colour,
                                texture=TEXTURES[rng.integers(len(TEXTURES))], texture_seed=int(rng.integers(2 ** 31))))
        image = np.empty((frames, res, res, 3), np.float64)
        segment = np.zeros((frames, res, res), np.uint8)
        for t in range(frames):
            image[t] = background
            u = t / max(1, frames - 1)
            depth = [o["z0"] + (o["z1"] - o["z0"]) * u for o in objects]
            for k in sorted(range(n), key=lambda j: -depth[j]):  # far to near: the nearer occludes
                o = objects[k]
                side, cx, cy = o["size"] / depth[k], o["cx"] + o["vx"] * t, o["cy"] + o["vy"] * t
                angle = o["angle"] + o["spin"] * t
                r = 0.6 * side + 1
                win = (slice(max(0, int(cy - r)), max(0, min(res, int(cy + r) + 1))),
                       slice(max(0, int(cx - r)), max(0, min(res, int(cx + r) + 1))))
                mask = _shape_mask(o["kind"], cx, cy, side, angle, xx[win], yy[win])  # (h_win, w_win) bool
                if not mask.any():
                    continue
                c, s = np.cos(angle), np.sin(angle)  # the texture in the object's frame: it moves and turns along
                scale = o["size"] / side
                u_obj = (c * (xx[win] - cx) + s * (yy[win] - cy)) * scale
                v_obj = (-s * (xx[win] - cx) + c * (yy[win] - cy)) * scale
                paint = _texture(np.random.default_rng(o["texture_seed"]), o["texture"], o["colour"], u_obj, v_obj, res)
                image[t][win] = np.where(mask[..., None], paint, image[t][win])
                segment[t][win][mask] = k + 1
        visible = np.stack([np.bincount(s.ravel(), minlength=n + 1)[1:] for s in segment])  # (T, n) pixels
        if (visible[0] >= 6).any() and ((visible >= 6).sum(0) >= 3).all():
            break
    bbox = np.zeros((frames, n, 4), np.float32)
    for t in range(frames):
        for k in range(n):
            ys, xs = np.nonzero(segment[t] == k + 1)
            if len(ys):  # (x0, y0, x1, y1) of the visible pixels, normalised by the frame size
                bbox[t, k] = (xs.min() / res, ys.min() / res, (xs.max() + 1) / res, (ys.max() + 1) / res)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), segment, bbox


def _shapes_video_samples(seed, split_id, count, res, frames):
    for i in range(count):
        rng = np.random.default_rng([seed, split_id, i, 1])  # one generator per clip (the 1: not a `shapes` stream)
        image, segment, bbox = render_shapes_video(rng, res, frames)
        yield {"image": image, "segment": segment, "bbox": bbox}


SHAPES_VIDEO_SPLITS = {"train": (0, 2000), "val": (1, 200)}  # split -> (id used in the seed, default count)
SHAPES_VIDEO_FRAMES = 12  # frames per clip: training crops 6 from {0, 6} (the authors' 24 from {0, 6, 12, 18})


def write_shapes_video(root="data", resolution=64, seed=0, counts=None, frames=SHAPES_VIDEO_FRAMES, overwrite=False,
                       quiet=False):
    """Write data/shapes_video[-res]/{train,val}. `counts` maps split -> number of clips."""
    if resolution % 16 != 0 or resolution < 32:
        raise ValueError(f"--resolution must be a multiple of 16 and >= 32, got {resolution}")
    out = shapes_dir(root, resolution, "shapes_video")
    for split, (split_id, default_count) in SHAPES_VIDEO_SPLITS.items():
        count = (counts or {}).get(split, default_count)
        start = time.time()
        meta = dict(name="shapes_video", split=split, resolution=resolution, max_objects=5, frames=frames, seed=seed,
                    source="built-in synthetic generator (data.render_shapes_video)")
        n = write_lmdb(out / split, _shapes_video_samples(seed, split_id, count, resolution, frames), meta,
                       overwrite=overwrite)
        if not quiet:
            print(f"wrote {out / split}: {n} clips of {frames} frames at {resolution}x{resolution} "
                  f"in {time.time() - start:.1f}s")
    return out


def shapes_dir(root="data", resolution=64, name="shapes"):
    """data/<name> (shapes, shapes_video) for the default 64x64, data/<name>-<res> for other resolutions."""
    return Path(root) / (name if resolution == 64 else f"{name}-{resolution}")


def write_shapes(root="data", resolution=64, seed=0, counts=None, overwrite=False, quiet=False):
    """Write data/shapes[-res]/{train,val}. `counts` maps split -> number of samples."""
    if resolution % 16 != 0 or resolution < 32:
        raise ValueError(f"--resolution must be a multiple of 16 and >= 32, got {resolution}")
    out = shapes_dir(root, resolution)
    for split, (split_id, default_count) in SHAPES_SPLITS.items():
        count = (counts or {}).get(split, default_count)
        start = time.time()
        meta = dict(name="shapes", split=split, resolution=resolution, max_objects=6, seed=seed,
                    source="built-in synthetic generator (data.render_shapes_sample)",
                    size_thresholds=[t * (resolution / 64) ** 2 for t in SHAPES_SIZES])
        n = write_lmdb(out / split, _shapes_samples(seed, split_id, count, resolution), meta, overwrite=overwrite)
        if not quiet:
            print(f"wrote {out / split}: {n} samples at {resolution}x{resolution} in {time.time() - start:.1f}s")
    return out


BUILTIN = {"shapes": write_shapes, "shapes_video": write_shapes_video}  # written on first use by load_dataset

# -----------------------------------------------------------------------------
# The one entry point of the training and evaluation scripts.

def splits_in(folder):
    """The splits a dataset folder holds: its complete split folders (hidden temporaries of an interrupted write
    are not splits), plus `select` where there is a `train`."""
    found = sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith(".") and (p / "data.mdb").exists())
    return found + (["select"] if "train" in found else [])


def dataset_dir(name, root="data", resolution=None):
    """Where dataset `name` lives: data/<name>; the built-in ones keep one folder per resolution (cheap to write)."""
    if name in BUILTIN:
        return shapes_dir(root, resolution or PRESETS[name]["resolution"], name)
    return Path(root) / name


def select_rows(count):
    """The `select` split: the last 10% of a training split's records, at most 1,000 (shapes: 800 of 8,000; COCO,
    ClevrTex: 1,000; VOC: 146 of 1,464; at least one). Training never sees them; both training scripts pick best.pt
    on them, so that the val split, which the tables report, plays no part in choosing the model."""
    n = max(1, min(1000, count // 10))
    return range(count - n, count)


def load_dataset(name, split, root="data", resolution=None, semantic=False):
    """The `Dataset` of split `split` of dataset `name` under `root`.

    Splits: what the conversion wrote (train, val, test, ClevrTex variants), where `train` is the stored training
    split minus its last 10% (at most 1,000 records), and `select` is that held-out slice (select_rows): the data
    model selection uses. The built-in `shapes` is written on first use, when its folder does not exist (never over
    an existing one); a real dataset that is not converted yet raises DatasetMissing naming the `python convert.py
    ...` command that converts it, and a split that is not there names the splits that are.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown dataset '{name}'; known datasets: {', '.join(PRESETS)}")
    folder = dataset_dir(name, root, resolution)
    if name in BUILTIN and (not folder.exists() or not splits_in(folder)):  # nothing complete there to lose
        print(f"{folder} not found: writing the built-in {name} dataset (a few seconds)")
        BUILTIN[name](root, resolution or PRESETS[name]["resolution"])
    if not folder.exists():
        raise DatasetMissing(
            f"dataset '{name}' is not converted yet ({folder} not found).\n"
            f"Convert the official download first:\n"
            f"    python convert.py {name} --src /path/to/{name} --out {folder}\n"
            f"where --src is {SOURCES[name]}.")
    stored = "train" if split == "select" else split  # `select` is a view of the stored training split
    path = folder / stored
    if not (path / "data.mdb").exists():
        found = splits_in(folder)
        fix = (f"python data.py {name} --root {root} --overwrite writes it again" if name in BUILTIN else
               f"python convert.py {name} --src /path/to/{name} --out {folder} --split {stored} converts it")
        usual = split in ("train", "val", "select", "test")
        raise DatasetMissing(f"{folder} has no split '{split}' (its splits: {', '.join(found) or 'none'}). Give one "
                             f"of those" + (f"; if '{split}' should be there, {fix}" if usual else ""))
    ds = LMDBDataset(path, semantic)
    if stored == "train":  # train without the held-out slice, or the slice itself
        held_out = select_rows(ds.count)
        ds.rows = held_out if split == "select" else range(held_out.start)
    if resolution is not None and ds.meta["resolution"] != resolution:
        raise ValueError(f"{path} holds {ds.meta['resolution']}px samples, not the requested {resolution}px")
    return ds


# -----------------------------------------------------------------------------
# Command line

def main(argv=None):
    """`python data.py shapes` (or shapes_video) writes a built-in dataset; `python data.py info FOLDER` prints what a dataset
    folder holds (the meta record of each split: counts, resolution, source, filters, versions)."""
    parser = ArgumentParser(description="Write or inspect MSF datasets (LMDB).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, splits in (("shapes", SHAPES_SPLITS), ("shapes_video", SHAPES_VIDEO_SPLITS)):
        p = sub.add_parser(name, help=f"write the built-in synthetic {'video ' if name != 'shapes' else ''}dataset")
        p.add_argument("--root", default="data", help="folder that holds all datasets")
        p.add_argument("--resolution", type=number(int, 32), default=64,
                       help="image side in pixels, a multiple of 16 (paper: 128)")
        p.add_argument("--seed", type=number(int, 0), default=0, help="generator seed; the same seed gives the same bytes")
        p.add_argument("--train", type=number(int, 2), default=splits["train"][1],
                       help="number of training samples (the last 10%% are the `select` split)")
        p.add_argument("--val", type=number(int, 1), default=splits["val"][1], help="number of validation samples")
        if name == "shapes_video":
            p.add_argument("--frames", type=number(int, 2), default=SHAPES_VIDEO_FRAMES, help="frames per clip")
        p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p = sub.add_parser("info", help="print the meta record of each split of a dataset folder")
    p.add_argument("path", help="e.g. data/shapes")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PRESETS and argv[0] not in BUILTIN:  # the converters have their own script now
        sys.exit(f"data.py writes the built-in datasets only; convert {argv[0]} with: "
                 f"python convert.py {' '.join(argv)}")
    args = parser.parse_args(argv)

    if args.command in BUILTIN:
        out = shapes_dir(args.root, args.resolution, args.command)
        there = [s for s in ("train", "val") if (out / s / "data.mdb").exists()]
        if there and not args.overwrite:
            sys.exit(f"{out} already holds {' and '.join(there)}; pass --overwrite to write it again")
        if args.resolution % 16:
            sys.exit(f"--resolution {args.resolution}: the built-in datasets need a multiple of 16 (64, 128, ...)")
        counts = {"train": args.train, "val": args.val}
        if args.command == "shapes":
            write_shapes(args.root, args.resolution, args.seed, counts, args.overwrite)
        else:
            write_shapes_video(args.root, args.resolution, args.seed, counts, args.frames, args.overwrite)
    elif args.command == "info":
        folder = Path(args.path)
        if not folder.is_dir():
            sys.exit(f"{folder} is not a dataset folder (e.g. data/shapes)")
        for leftover in sorted(folder.glob(".*.tmp-*")):
            print(f"{leftover}: ignored, the leftover of an interrupted write (the next write of that split removes "
                  f"it; safe to delete)")
        splits = [folder / s for s in splits_in(folder) if s != "select"]
        if not splits:
            sys.exit(f"no dataset splits under {folder}")
        for split in splits:
            try:
                print(f"{split}: {json.dumps(read_meta(split), indent=1)}")
            except (DatasetMissing, DatasetCorrupt, ValueError) as e:
                print(f"{split}: {e}")


if __name__ == "__main__":
    main()
