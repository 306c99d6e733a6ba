"""Datasets for MSF object-centric learning: the LMDB sample format, the dataset facts, the torch `Dataset` that
every script reads through `load_dataset`, and the frames of video clips (video_frames).

Paper: "Multi-Scale Fusion for Object Representation" (Zhao et al., ICLR 2025), Appendix A.4
("converting all datasets into the LMDB database format ... center-cropped and resized to 128x128 ...
stored in the uint8 data type"; inputs normalised by "subtracting 127.5 and dividing by 127.5").

Run:  python data.py shapes                  # writes data/shapes/{train,val} (64x64) in seconds
      python data.py shapes_video            # writes data/shapes_video/{train,val}: 12-frame clips (64x64)
      python data.py shapes --resolution 128 # the paper's resolution, written to data/shapes-128/
      python data.py info data/shapes        # prints the meta record of every split
The real datasets (ClevrTex, COCO, VOC, MOVi-C/D/E, Open Images) are made from their official downloads by
convert.py (`python convert.py coco --src /data/coco`), which writes this same format; the built-in ones are drawn
by shapes.py.

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

Reading order: DATASETS, square_image (how every dataset's images are prepared), encode_record/decode_record,
write_lmdb, LMDBDataset, video_frames, write_shapes / write_shapes_video, load_dataset (the one entry point of the
scripts), the CLI. What a training step draws from a batch (temporal crops, augmentation) is train_common's.
Imports shapes (the built-in datasets' renderers) and nothing else of the project.
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
from PIL import Image, ImageOps
from torch.utils.data import Dataset

import shapes

FORMAT_VERSION = 1
MAGIC = b"MSFREC1\n"  # 8 bytes that open every sample record
META_KEY = b"__meta__"
IGNORE = 255  # segment value of unannotated / void pixels: they count in no metric
ALLOWED_DTYPES = {"uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64", "bool"}

# -----------------------------------------------------------------------------
# Dataset facts: what a dataset IS (image side, slots = objects + background, images or clips). How to train on it
# (steps, batch, learning rate, ...) is each training script's recipe table: train_vae.RECIPES, train_ocl.RECIPES.
PAPER = dict(resolution=128, num_slots=11, video=False)  # A.4: every dataset centre-cropped and resized to 128x128
DATASETS = {
    "shapes": dict(resolution=64, num_slots=7, video=False),  # the built-in datasets (shapes.py): 2-6 objects
    "shapes_video": dict(resolution=64, num_slots=6, video=True),  # 2-5 objects per clip
    "clevrtex": PAPER, "coco": PAPER, "voc": PAPER, "openimages": PAPER,
    "movi_c": dict(PAPER, video=True), "movi_d": dict(PAPER, num_slots=21, video=True),  # A.4: MOVi-D/E 21 slots
    "movi_e": dict(PAPER, num_slots=21, video=True),
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


def centre_square(h, w):
    """(top, left, side) of the largest centred square (integer offsets, as the authors' CenterCrop)."""
    return (h - min(h, w)) // 2, (w - min(h, w)) // 2, min(h, w)


def square_image(image, res):
    """(H, W, 3) uint8 -> (res, res, 3) uint8, as every dataset's images are prepared (A.4): the centred square,
    bilinear resize with antialias (convert.py for the downloads, evaluate.py --images for your own pictures)."""
    top, left, side = centre_square(*image.shape[:2])
    x = torch.from_numpy(np.ascontiguousarray(image[top:top + side, left:left + side, :3]))
    x = x.permute(2, 0, 1)[None].float()  # (1, 3, s, s)
    if side != res:
        x = torch.nn.functional.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()  # (res, res, 3)


def read_picture(path, background):
    """A picture file of any kind as (H, W, 3) uint8, upright as the camera held it (EXIF orientation), and what was
    done to it (one line each): 16-bit values scaled to 8 bits (not clipped to white); transparent pixels composited
    on `background` (an RGB triple, not shown black). Your own pictures for evaluate.py --images."""
    notes = []
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I") and np.array(im).max() > 255:  # 16-bit (PIL stores I;16 as I)
            im = Image.fromarray((np.array(im).astype(np.float64) / 257).round().clip(0, 255).astype(np.uint8))
            notes.append("16-bit: scaled to 8 bits")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = np.array(im.convert("RGBA")).astype(np.float64)  # (h, w, 4)
            alpha = rgba[..., 3:] / 255
            if (alpha < 1).any():
                notes.append(f"transparent: composited on the dataset's background colour {tuple(background)}")
            return (rgba[..., :3] * alpha + np.array(background) * (1 - alpha)).round().astype(np.uint8), notes
        return np.array(im.convert("RGB")), notes


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
        pass
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


def video_frames(image, clip=0, generator=None, rank=0, world=1):
    """The VAE is a per-frame model (Sect. 3.1: "an input image or video frame"). Images (b, 3, H, W) pass through;
    video clips (b, T, 3, H, W) become frames (b * clip, 3, H, W): `clip` consecutive frames per clip from a random
    start (the authors' MOVi VAE recipe: a 6-frame slice, any start frame), flattened into the batch. clip = 0 (or
    >= T) keeps all T frames, for validation. The starts are drawn for the global batch of `world` processes, of
    which process `rank` takes its part: N processes slice as one does."""
    if image.dim() == 4:
        return image
    b, t = image.shape[:2]
    if 0 < clip < t:
        start = torch.randint(0, t - clip + 1, (b * world,), generator=generator)[rank * b:(rank + 1) * b]  # (b,)
        frames = start[:, None] + torch.arange(clip)  # (b, clip) frame indices
        image = image[torch.arange(b)[:, None], frames]  # (b, clip, 3, H, W)
    return image.flatten(0, 1)  # (b * clip, 3, H, W)


# -----------------------------------------------------------------------------
# The built-in datasets, drawn by shapes.py, written on first use


def write_shapes_video(root="data", resolution=64, seed=0, counts=None, frames=shapes.SHAPES_VIDEO_FRAMES, overwrite=False,
                       quiet=False):
    """Write data/shapes_video[-res]/{train,val}. `counts` maps split -> number of clips."""
    meta = dict(name="shapes_video", split=None, resolution=resolution, max_objects=5, frames=frames, seed=seed,
                source="built-in synthetic generator (shapes.render_shapes_video)")
    return _write_builtin(root, meta, shapes.SHAPES_VIDEO_SPLITS, counts, overwrite, quiet, f"clips of {frames} frames",
                          lambda split_id, n: shapes.shapes_video_samples(seed, split_id, n, resolution, frames))


def shapes_dir(root="data", resolution=64, name="shapes"):
    """data/<name> (shapes, shapes_video) for the default 64x64, data/<name>-<res> for other resolutions."""
    return Path(root) / (name if resolution == 64 else f"{name}-{resolution}")


def write_shapes(root="data", resolution=64, seed=0, counts=None, overwrite=False, quiet=False, sides=None):
    """Write data/shapes[-res]/{train,val}. `counts` maps split -> number of samples; `sides`: the smallest and
    largest object side at 64 px (shapes.SHAPES_SIDES if None; other values are named in the meta record)."""
    meta = dict(name="shapes", split=None, resolution=resolution, max_objects=6, seed=seed,
                source="built-in synthetic generator (shapes.render_shapes_sample)",
                size_thresholds=[t * (resolution / 64) ** 2 for t in shapes.SHAPES_SIZES])
    if sides is not None:  # the default writes the meta record it always wrote
        meta["object_sides"] = list(sides)
    return _write_builtin(root, meta, shapes.SHAPES_SPLITS, counts, overwrite, quiet, "samples",
                          lambda split_id, n: shapes.shapes_samples(seed, split_id, n, resolution, sides))


def _write_builtin(root, meta, splits, counts, overwrite, quiet, unit, samples):
    """Write every split of a built-in dataset: `splits` maps split -> (generator split id, default count)."""
    if (resolution := meta["resolution"]) % 16 != 0 or resolution < 32:
        raise ValueError(f"--resolution must be a multiple of 16 and >= 32, got {resolution}")
    out = shapes_dir(root, resolution, meta["name"])
    for split, (split_id, default_count) in splits.items():
        start = time.time()
        n = write_lmdb(out / split, samples(split_id, (counts or {}).get(split, default_count)), dict(meta, split=split),
                       overwrite=overwrite)
        if not quiet:
            print(f"wrote {out / split}: {n} {unit} at {resolution}x{resolution} in {time.time() - start:.1f}s")
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
        return shapes_dir(root, resolution or DATASETS[name]["resolution"], name)
    return Path(root) / name


def select_rows(count):  # ours: best.pt is chosen on `select`, held out of training; val is only ever reported
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
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; known datasets: {', '.join(DATASETS)}")
    folder = dataset_dir(name, root, resolution)
    if name in BUILTIN and (not folder.exists() or not splits_in(folder)):  # nothing complete there to lose
        Path(root).mkdir(parents=True, exist_ok=True)
        with open(Path(root) / f".{name}.lock", "w") as lock:  # runs started side by side write it once
            if os.name == "posix":  # elsewhere, start one run first
                import fcntl
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not folder.exists() or not splits_in(folder):  # another run may have written it while we waited
                print(f"{folder} not found: writing the built-in {name} dataset (a few seconds)")
                BUILTIN[name](root, resolution or DATASETS[name]["resolution"])
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
    for name, splits in (("shapes", shapes.SHAPES_SPLITS), ("shapes_video", shapes.SHAPES_VIDEO_SPLITS)):
        p = sub.add_parser(name, help=f"write the built-in synthetic {'video ' if name != 'shapes' else ''}dataset")
        p.add_argument("--root", default="data", help="folder that holds all datasets")
        p.add_argument("--resolution", type=number(int, 32), default=64,
                       help="image side in pixels, a multiple of 16 (paper: 128)")
        p.add_argument("--seed", type=number(int, 0), default=0, help="generator seed; the same seed gives the same bytes")
        p.add_argument("--train", type=number(int, 2), default=splits["train"][1],
                       help="number of training samples (the last 10%% are the `select` split)")
        p.add_argument("--val", type=number(int, 1), default=splits["val"][1], help="number of validation samples")
        if name == "shapes_video":
            p.add_argument("--frames", type=number(int, 2), default=shapes.SHAPES_VIDEO_FRAMES, help="frames per clip")
        else:
            p.add_argument("--object-sides", default=None, help="smallest,largest object side in px at 64 px "
                           f"(default {','.join(map(str, shapes.SHAPES_SIDES))}; 24,24: all alike; 3,60: tiny to large)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p = sub.add_parser("info", help="print the meta record of each split of a dataset folder")
    p.add_argument("path", help="e.g. data/shapes")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DATASETS and argv[0] not in BUILTIN:  # the converters have their own script now
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
        try:
            extra = ({"frames": args.frames} if args.command == "shapes_video" else
                     {"sides": args.object_sides and shapes.parse_sides(args.object_sides)})
        except ValueError as e:
            sys.exit(f"--object-sides {e}")
        BUILTIN[args.command](args.root, args.resolution, args.seed, {"train": args.train, "val": args.val},
                              overwrite=args.overwrite, **extra)
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
