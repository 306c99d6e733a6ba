"""A run on disk: its checkpoints and what --resume restores. Engineering, not the paper (the paper's recipes are in
the training scripts); what someone who leaves a run alone for a week relies on:

  format      a checkpoint is a plain dict saved with torch.save and read with weights_only=True (never unpickling
              code), of one format (CKPT_VERSION); another format, another kind, a truncated file or non-finite
              weights are refused by name (load_checkpoint)
  durability  every write goes to a temporary file that is flushed to the disk (fsync), renamed over the old file,
              and the folder's entry flushed too: after a power cut a checkpoint is the old one or the new one, never
              half of one; a full disk stops the run with a message, the previous checkpoint intact and no
              temporary left (save_checkpoint)
  one writer  a run holds a lock on its --out for its whole life, so a second run (or --resume of a run that is
              still running) into the same folder stops with a message naming the process that holds it (hold_run)
  the folder  prepare_out_dir checks room and permissions before step 1 and never deletes what it did not write
  resume      last.pt carries the optimizer, the grad scaler and every random generator (save_last); resume refuses
              another configuration with every difference named, and another number of processes unless
              --allow-world-change says so

Reading order: as listed. Imports from the project: train_common (the process group's gathers, RunError).
"""
import errno
import hashlib
import os
import random
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import data
import train_common
from train_common import RunError

CKPT_VERSION = 5  # the one checkpoint format this code reads and writes; load_checkpoint refuses any other
RUN_FILES = ("last.pt", "best.pt", "step_*.pt", "metrics.jsonl")  # what a run writes into --out (and --overwrite deletes)
LOCK = ".run.lock"  # the file a running run holds locked in its --out (hold_run)

# -----------------------------------------------------------------------------
# Reading and writing one checkpoint


def load_checkpoint(path, expect_kind=None):
    """Load a checkpoint dict safely (weights_only=True: no code runs) and check that it is of `expect_kind`
    ("vae" or "ocl"; None accepts both), of this code's format, and that its weights are finite."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pt"))
        raise ValueError(f"{path} is a folder, not a checkpoint; give a file inside it"
                         + (f" ({', '.join(inside)})" if inside else " (it holds no .pt file)"))
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): a write that never finished; use another checkpoint of the "
                         f"run (last.pt, best.pt, step_*.pt) or train again")
    # map_location="cpu": a GPU checkpoint opens on any machine; the caller moves the model where it runs
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or something that needs unpickling code
        first = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {first}); it may be truncated or "
                         f"corrupt: use another checkpoint of the run, or train again") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by this code (no 'kind' entry)")
    if ckpt.get("format_version") != CKPT_VERSION:
        version = ckpt.get("format_version", "1")
        raise ValueError(f"{path} has checkpoint format {version}; this code reads format {CKPT_VERSION} only. "
                         f"Use the version of the code that wrote it, or train it again with this one")
    if expect_kind is not None and ckpt["kind"] != expect_kind:
        raise ValueError(f"{path} is a {ckpt['kind'].upper()} checkpoint, but a {expect_kind.upper()} checkpoint "
                         f"is needed here")
    bad = [k for k, t in ckpt.get("model", {}).items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # scored, it would print numbers that mean nothing; continued, it would fail somewhere far from here
        raise ValueError(f"{path} holds non-finite weights ({len(bad)} tensors, the first {bad[0]}): it cannot be "
                         f"scored or continued; use an earlier checkpoint of the run (step_*.pt) or train again")
    return ckpt


def save_checkpoint(path, obj):
    """torch.save, durably: to a temporary file in the same folder, flushed to the disk (fsync), renamed over `path`
    (os.replace: atomic), then the folder's entry flushed. After a crash or a power cut `path` holds the old
    checkpoint or the new one, whole. A failed write (a full disk) removes its temporary, leaves the previous file
    as it was, and is a RunError with one line that says what to do."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # prepare_out_dir removes those of killed runs
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the data on the disk before the name points at it
        os.replace(tmp, path)
        sync_folder(path.parent)  # and the new name too
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def write_error(path, e):
    """The one-line RunError of a failed checkpoint write: a full disk (or quota) says how much room there is."""
    folder = Path(path).parent
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(folder).free / 2 ** 20
        return RunError(f"no space left on the disk of {folder} while writing {Path(path).name} ({free:.0f} MiB "
                        f"free); the previous checkpoints are intact. Free space (or lower --keep), then continue with "
                        f"--resume")
    return RunError(f"could not write {path} ({e.strerror or e}); the previous checkpoints are intact. Fix the "
                    f"folder, then continue with --resume")


def sync_folder(folder):
    """Flush a folder's entries (a rename, a new link) to the disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows: no directory handles; its renames are journaled
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# The run's folder: one writer, room for the checkpoints, nothing deleted that the run did not write

_HELD = {}  # resolved --out -> (the open lock file this process holds, whether it made it); released when it ends


def hold_run(out):
    """Lock --out for the rest of this process's life (flock on <out>/.run.lock; the kernel releases it when the
    process ends, however it ends). A second process that asks for the same folder, a second run or --resume of a
    run that is still running, gets a RunError naming the process that holds it. A process may ask again for a
    folder it holds (the tests' runs, one after the other). POSIX only; elsewhere a no-op."""
    out = Path(out).resolve()
    if out in _HELD or os.name != "posix":
        return
    import fcntl
    created = not (out / LOCK).exists()
    f = open(out / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        if created:
            (out / LOCK).unlink(missing_ok=True)
        raise RunError(f"{out} is in use by {holder}: one run writes a folder at a time. Wait for it to finish, stop "
                       f"it (kill -TERM writes last.pt and stops it; then --resume), or choose another --out") from None
    f.seek(0)
    f.truncate()
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]
    f.write(f"process {os.getpid()} on {socket.gethostname()} ('{command}', since {time.strftime('%Y-%m-%d %H:%M')})")
    f.flush()
    _HELD[out] = f, created


def release_run(out):
    """Give up the lock on --out, for a run refused before it wrote anything: the lock file goes too if this process
    made it, so a refused run leaves the folder exactly as it found it."""
    f, created = _HELD.pop(Path(out).resolve(), (None, False))
    if f is not None:
        if created:
            Path(f.name).unlink(missing_ok=True)
        f.close()  # closing the file releases the flock


def checkpoint_bytes(model, params, extra=0):
    """What last.pt will take on disk: the model's state, Adam's two moments of every trained parameter, `extra`
    bytes of the script's own training state (the VAE's code-replacing pools), and 1 MiB for arguments, metrics and
    the random generators' states. (best.pt holds the model's state alone.)"""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return state + 2 * sum(p.numel() * p.element_size() for p in params) + extra + 2 ** 20


def prepare_out_dir(out, model, keep, resume=False, overwrite=False, main=True, last_bytes=None):
    """Fail before training, not after an hour: --out must be writable, free of another running run (hold_run: this
    process holds it from here on), have room for the checkpoints (`last_bytes`: checkpoint_bytes), and not hold
    another run (any of RUN_FILES) unless --resume (continue it) or --overwrite (start over) says what to do with it.
    Temporaries that killed runs left behind are removed (and named)."""
    out = Path(out)
    try:  # write 4 KiB and delete them: permissions and read-only mounts show up now, not at the first checkpoint
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as e:
        raise RunError(f"--out {out} is not writable ({e.strerror or e}); choose a folder you can write to") from None
    if main:
        hold_run(out)  # before anything in the folder is touched: a running run's files are never ours to delete
    try:
        check_out_dir(out, model, keep, resume, overwrite, main, last_bytes)
    except RunError:
        release_run(out)
        raise
    if dist.is_initialized():
        dist.barrier()  # nobody starts before process 0 has cleared the folder
    return out


def check_out_dir(out, model, keep, resume, overwrite, main, last_bytes):
    """prepare_out_dir's checks, with the lock held: stale temporaries, room on the disk, an earlier run."""
    if main:
        for name in remove_stale(out):
            print(f"removed {out / name}, a temporary a killed run left behind")
    # last.pt (+ a temporary copy while it is replaced), the numbered copies (hard links where the file system
    # has them; counted as copies) and best.pt (the model's state)
    last = last_bytes or checkpoint_bytes(model, model.parameters())
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    need, free = (keep + 2) * last + weights, shutil.disk_usage(out).free
    if free < need:
        raise RunError(f"--out {out} has {free / 2 ** 20:.0f} MiB free, but this run's checkpoints need about "
                       f"{need / 2 ** 20:.0f} MiB (last.pt, best.pt and --keep {keep} numbered copies); free space, "
                       f"lower --keep, or choose another --out")
    found = sorted(p.name for pattern in RUN_FILES for p in out.glob(pattern))
    if found and not resume:
        if not overwrite:
            raise RunError(f"{out} already holds a run ({', '.join(found)}). Continue it with --resume, start over "
                           f"with --overwrite (deletes these files), or choose another --out")
        if main:  # what this code wrote there, nothing else of the folder
            for name in found:
                (out / name).unlink(missing_ok=True)


def remove_stale(out):
    """The temporaries (`.<name>.tmp-<pid>`) of checkpoint writes whose process no longer runs: removed, named (the
    datasets' writers use the same rule, data.remove_stale_temporaries)."""
    return data.remove_stale_temporaries(out, ".*.tmp-*")


# -----------------------------------------------------------------------------
# last.pt: the weights and everything --resume needs


def rng_state(d):
    """Every random generator the run uses, as plain tensors and numbers (weights_only loads them): Python's and
    NumPy's and torch's CPU (and CUDA) generator, each of every process. Call it on all processes (it gathers)."""
    # the generators' own state objects are tuples and arrays that weights_only=True would refuse: store tensors
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": train_common.gather_objects([version, torch.tensor(internal, dtype=torch.int64), gauss], d),
             "numpy": train_common.gather_objects([torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                                   float(cached)], d),
             "torch": train_common.gather(torch.get_rng_state(), d)}
    if d.device.type == "cuda":
        state["cuda"] = train_common.gather(torch.cuda.get_rng_state(d.device), d)
    return state


def set_rng_state(state, d):
    """Put back what rng_state saved: process k takes the k-th saved generators. Resumed on more processes than
    saved (--allow-world-change), a new process k starts from generators seeded by a hash of process 0's saved
    torch state and k: the same every time the run is resumed that way, and none repeats another's draws."""
    saved = len(state["torch"])
    if d.rank < saved:
        version, internal, gauss = state["python"][d.rank]
        random.setstate((version, tuple(internal.tolist()), gauss))
        keys, pos, has_gauss, cached = state["numpy"][d.rank]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"][d.rank])
        if d.device.type == "cuda" and "cuda" in state and d.rank < len(state["cuda"]):
            torch.cuda.set_rng_state(state["cuda"][d.rank], d.device)
        return
    digest = hashlib.sha256(state["torch"][0].numpy().tobytes() + str(d.rank).encode()).digest()
    seed = int.from_bytes(digest[:8], "little")
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)  # the CPU and every CUDA generator


def save_last(out, ckpt, optimizer, scaler, best, d, keep, **extra):
    """last.pt = `ckpt` (the weights, as best.pt holds them) plus the training state: optimizer, AMP grad scaler,
    best score so far, every random generator, and `extra` (the VAE's code-replacing pools of every process). Call it
    on all processes (the generators are gathered); process 0 writes it (save_checkpoint: durably), then a numbered
    copy step_<k>.pt, keeping the newest `keep` (the paper kept the final 25 of about 50). The copy is made from the
    flushed last.pt: a hard link where the file system allows (no extra space until last.pt is replaced, which gives
    last.pt a new file while the link keeps the old), renamed into place and its folder entry flushed."""
    ckpt["train_state"] = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "best": best,
                           "rng": rng_state(d), **extra}
    if not d.main:  # the other processes took part in the gather above; process 0 writes
        return
    out = Path(out)
    save_checkpoint(out / "last.pt", ckpt)
    if keep <= 0:
        return
    numbered = out / f"step_{ckpt['step']:07d}.pt"  # zero-padded: sorted by name = sorted by step
    tmp = out / f".{numbered.name}.tmp-{os.getpid()}"  # a killed copy is removed by the next prepare_out_dir
    try:
        try:
            os.link(out / "last.pt", tmp)  # last.pt is already on the disk (save_checkpoint flushed it)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            shutil.copyfile(out / "last.pt", tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, numbered)
        sync_folder(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(numbered, e) from None
    for old in sorted(out.glob("step_*.pt"))[:-keep]:  # the oldest beyond --keep
        old.unlink()


def resume(out, kind, args, model_args, model, optimizer, scaler, d, extra=None,
           must_match=("dataset", "resolution", "steps", "batch_size", "seed", "lr", "predictor_lr", "augment")):
    """--resume: load last.pt of `out` into the model, optimizer, grad scaler and random generators, and return
    (step to start at, best score, last validation metrics, train_state). The data order and every schedule are
    functions of the step, so nothing else needs restoring.

    A checkpoint of another configuration is refused with every difference named: another kind, model, dataset
    or schedule (the LR, sigma, data order and augmentation are functions of `must_match`). `extra`: more model_args
    to compare, {"vae": current VAE model_args} for an OCL run. Another number of processes than the run was
    written with is refused unless --allow-world-change (args.allow_world_change): the data order stays the same
    (a function of the step and the global batch), the generators and the code-replacing samples go over as
    set_rng_state and the training script's pools say.
    What a resume restores is exact on a CPU. On a GPU the digits also depend on kernels that are not deterministic
    (atomics in some backward passes, cuDNN's choice of algorithm): the same data, schedule and generators, not
    always the same last digit."""
    path = Path(out) / "last.pt"
    if not path.exists():
        raise RunError(f"--resume: there is no {path} to continue; run without --resume to start, or give the --out "
                       f"of the run to continue")
    ckpt = load_checkpoint(path, kind)
    if "train_state" not in ckpt:
        raise RunError(f"--resume: {path} holds weights only, no training state; start a new run in another --out")
    saved = ckpt["model_args"]
    diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} now" for k, v in model_args.items() if saved.get(k) != v]
    diffs += [f"{k}: {ckpt['args'].get(k)!r} in the checkpoint, {getattr(args, k, None)!r} now"
              for k in must_match if ckpt["args"].get(k) != getattr(args, k, None)]
    for name, ours in (extra or {}).items():  # e.g. the OCL run's embedded VAE: ckpt["vae"]["model_args"]
        theirs = ckpt[name]["model_args"]
        diffs += [f"{name}.{k}: {theirs.get(k)!r} in the checkpoint, {v!r} now" for k, v in ours.items() if theirs.get(k) != v]
    if diffs:
        raise RunError(f"--resume: {path} belongs to another run configuration ({'; '.join(diffs)}). Resume with the "
                       f"flags it was started with, or start a new run in another --out")
    state = ckpt["train_state"]
    world = len(state["rng"]["torch"])
    if world != d.world:
        if not getattr(args, "allow_world_change", False):
            raise RunError(f"--resume: {path} was written by {world} process(es), this run has {d.world}. Resume with "
                           f"{world} (torchrun --nproc_per_node {world}), or add --allow-world-change: the data order "
                           f"stays the same, the new processes' random generators are derived from the saved ones")
        if d.main:
            print(f"note: resuming a {world}-process run with {d.world} process(es) (--allow-world-change): the same "
                  f"data order; processes 0-{min(world, d.world) - 1} continue their generators, any others start "
                  f"from ones derived from process 0's")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # weights of another layout of the model
        raise RunError(f"--resume: the weights in {path} do not fit this model ({str(e).splitlines()[0]}). Resume "
                       f"with the flags it was started with, or start a new run in another --out") from None
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"] or not scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    elif d.main:  # a CPU run (AMP off: an empty scaler state) continued on a GPU: the scaler starts afresh
        print("note: the run was started without AMP (CPU); its GPU continuation starts a fresh grad scaler")
    set_rng_state(state["rng"], d)
    return ckpt["step"], state["best"], ckpt["metrics"], state
