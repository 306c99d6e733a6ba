"""Engineering that both training scripts share. None of it is in the paper: the paper's recipes and schedules are
in the training scripts themselves (train_vae.RECIPES / lr_at / anneal_at, train_ocl.RECIPES / lr_at / sigma_at).

train_vae.py (stage 1) and train_ocl.py (stage 2) are the two loops of the paper's recipe (A.5). What they need
around those loops to run for days on several GPUs and survive a kill lives here, as plain functions they call by
name, so that each loop reads forward -> loss -> step with nothing else in the way:

  the lr           cosine, warmup_cosine (the shapes of the schedules), set_lr (the lr of every param group)
  randomness       seed_everything, the data order `infinite_batches` (a pure function of seed and step), and
                   the per-worker seeds of the DataLoader
  devices          pick_device, default_workers; `distributed` (torchrun: one process per GPU, DDP)
  run arguments    add_run_args, apply_recipe (a dataset's recipe where no flag was given)
  checkpoints      save_checkpoint / load_checkpoint (weights_only: loading never runs code), prepare_out_dir,
                   save_last (last.pt with the whole training state + numbered copies), resume
  the step         RunGuard (stop signals, non-finite losses), check_weights (before any checkpoint is written),
                   optimizer_step (AMP, clipping), Log

Reading order: as listed. Nothing here imports a model file: the scripts hand in what they built.
Imports from the project: data (the dataset facts, the argument types).
"""
import contextlib
import functools
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import data

CKPT_VERSION = 5  # the one checkpoint format this code reads and writes; load_checkpoint refuses any other

# -----------------------------------------------------------------------------
# The lr and the schedules' shape (the schedules themselves are in the training scripts)


def cosine(step, total, start, end):
    """start -> end along half a cosine over `total` steps, then `end`."""
    progress = min(1.0, step / max(1, total))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(step, steps, lr, warmup, end):
    """The learning rate at `step`: linear warmup to `lr` over the first `warmup` steps, then `cosine` down to `end`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return cosine(step - warmup, steps - warmup, lr, end)


def set_lr(optimizer, lr):
    """Put this step's learning rate on every parameter group, times the group's "lr_scale" where it has one (the
    video predictor's --predictor-lr); returns `lr` for the log."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


# -----------------------------------------------------------------------------
# Randomness, devices and the data order


def seed_everything(seed):
    """Seed Python's, NumPy's and torch's global generators: the weights' init and every draw that follows."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
    """--device: auto (CUDA if there is a GPU), cpu, cuda, cuda:1, ... A GPU asked for on a machine without one is
    a clear exit, not a CUDA traceback at the first .to(device)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {name} asked for, but this machine has no CUDA GPU; use --device cpu")
    return torch.device(name)


def default_workers(device):
    """DataLoader worker processes per training process: 4 on GPU machines (the GPU must not wait for decoding),
    none on small CPUs (there the main process already keeps every core busy and workers would steal them)."""
    cpus = os.cpu_count() or 1
    if device.type == "cuda":
        return min(4, cpus)
    return 0 if cpus <= 4 else 2


def _seed_worker(worker_id, base):
    """Each DataLoader worker gets its own seed, different per worker, per process and per epoch, so random
    augmentations never repeat across workers (a known quirk of the authors' code: every worker had one seed)."""
    s = base + worker_id
    random.seed(s)
    np.random.seed(s % 2 ** 32)  # NumPy takes 32-bit seeds only
    torch.manual_seed(s)


def infinite_batches(dataset, batch_size, seed, start_step=0, rank=0, world=1, workers=0, pin_memory=False):
    """This process's share of shuffled global batches, forever, starting at global step `start_step`.

    The order is a pure function of (seed, step): epoch e shuffles the dataset with a generator seeded
    (seed * 100003 + e); global batch i of the epoch is the slice [i*B, (i+1)*B) of that permutation, and process
    `rank` of `world` takes its contiguous part [rank*b, (rank+1)*b), b = B / world (our distributed sampler).
    So 1 process and N processes see the same global batches, and a resumed run continues exactly where the
    killed one was, with no state to save. Incomplete last batches of an epoch are dropped."""
    if len(dataset) < batch_size:
        sys.exit(f"the dataset has {len(dataset)} samples, fewer than --batch-size {batch_size}")
    if batch_size % world:
        sys.exit(f"--batch-size {batch_size} (the global batch) does not split evenly over {world} processes")
    b, per_epoch = batch_size // world, len(dataset) // batch_size  # this process's share, whole batches per epoch
    epoch, first = divmod(start_step, per_epoch)  # resume: skip whole epochs, then the batches already taken
    while True:
        g = torch.Generator().manual_seed(seed * 100003 + epoch)  # a private generator: a function of (seed, epoch)
        perm = torch.randperm(len(dataset), generator=g).tolist()
        # a batch sampler of this process's slice of every global batch left in the epoch; the worker seeds depend on
        # (seed, rank, epoch) so no two workers, processes or epochs draw the same augmentation noise
        mine = [perm[i * batch_size + rank * b: i * batch_size + (rank + 1) * b] for i in range(first, per_epoch)]
        loader = DataLoader(dataset, batch_sampler=mine, num_workers=workers, pin_memory=pin_memory,
                            worker_init_fn=functools.partial(_seed_worker, base=((seed * 1009 + rank) * 100003 + epoch) * 64),
                            generator=torch.Generator())  # a private generator: the global RNG stays untouched
        yield from loader
        epoch, first = epoch + 1, 0


# -----------------------------------------------------------------------------
# Distributed data parallel: `torchrun --nproc_per_node N train_vae.py ...` (same for train_ocl.py)


class Dist(NamedTuple):
    rank: int  # this process, 0..world-1; rank 0 alone logs, validates, writes checkpoints and figures
    world: int  # number of processes (1 for a plain `python train_*.py`)
    local_rank: int  # this process's GPU on its machine
    device: torch.device

    @property
    def main(self):
        return self.rank == 0


@contextlib.contextmanager
def distributed(device_name):
    """`with distributed(args.device) as d:` the body runs as this process of a torchrun group, or as the only
    process. torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them nothing happens. Backend: nccl on GPUs,
    gloo on CPUs. Each process then runs the same script on 1/world of every batch, and DistributedDataParallel
    averages the gradients so all processes take the same optimizer step. The group is closed on the way out."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:  # plain `python train_*.py`: no process group, DDP wrappers and all-reduces become no-ops
        yield Dist(0, 1, 0, device)
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":  # one GPU per process: process k of a machine takes its GPU k
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Dist(rank, world, local_rank, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def exit_worker():
    """End a torchrun worker whose run finished: flush the output and leave without the interpreter's teardown,
    where gloo's threads can abort a finished process ("terminate called without an active exception"), which
    torchrun then reports as a failed run. Everything a run writes is closed or flushed by then. A plain `python`
    process (WORLD_SIZE unset) returns and exits as usual."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def wrap_ddp(model, d, compile=False):
    """DistributedDataParallel around the trainable model (a no-op for one process). Buffers are not broadcast
    every step: the codebooks' hit counts are per process and summed where they are used (vae.Codebook).
    compile (--compile): torch.compile around that, for the training step only (validation and checkpoints use the
    plain model, the same weights); the first steps pay for the compilation (benchmarks/paper_scale.py --compile)."""
    if d.world > 1:
        model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None, broadcast_buffers=False)
    return torch.compile(model) if compile else model


def print_batch_rule(d, batch_size, lr):
    """Say once how the global batch is split, so nobody scales the learning rate for the process count."""
    if d.world > 1 and d.main:
        print(f"distributed: {d.world} processes x batch {batch_size // d.world} = effective batch {batch_size} "
              f"(--batch-size is the global batch, so the paper's lr {lr:g} applies unchanged: no scaling rule)")


def reseed_for_rank(seed, d):
    """After the model is built (identical on every process), give each process its own random stream for
    sampling noise (Gumbel, query init, diffusion noise); process 0 keeps the single-process stream."""
    if d.rank > 0:
        torch.manual_seed(seed * 1009 + d.rank)


def gather_objects(obj, d):
    """[obj of process 0, obj of process 1, ...] on every process, for per-process state of any shape (the
    code-replacing samples); objects travel between this run's own processes only."""
    if d.world == 1:
        return [obj]
    parts = [None] * d.world
    dist.all_gather_object(parts, obj)
    return parts


def _gather(t, d):
    """[t of process 0, t of process 1, ...] on every process (same shapes everywhere)."""
    if d.world == 1:
        return [t]
    x = t.to(d.device)  # nccl gathers CUDA tensors only
    parts = [torch.empty_like(x) for _ in range(d.world)]
    dist.all_gather(parts, x)
    return [q.cpu() for q in parts]


# -----------------------------------------------------------------------------
# Run arguments both scripts take, and the datasets' recipes


def add_run_args(p, val_default):
    """The flags both training scripts share: seeds, devices, data loading, logging, checkpoints, resume."""
    p.add_argument("--seed", type=data.number(int, 0), default=0, help="seed of everything (weights, data order, sampling)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (under torchrun: each process's GPU)")
    p.add_argument("--workers", type=data.number(int, 0), default=None,
                   help="DataLoader worker processes per training process (default: 4 on GPU, 0 on CPUs with <= 4 cores)")
    p.add_argument("--log-every", type=data.number(int, 1), default=50, help="print and log every this many steps")
    p.add_argument("--val-every", type=data.number(int, 1), default=None,
                   help=f"validate every this many steps (default {val_default})")
    p.add_argument("--val-batches", type=data.number(int, 1), default=8,
                   help="validation batches (of --batch-size) per validation")
    p.add_argument("--ckpt-every", type=data.number(int, 1), default=None,
                   help="write last.pt (with the training state) every this many steps (default: min(--val-every, 1000))")
    # ours: keep 3 numbered checkpoints (the paper: the final 25)
    p.add_argument("--keep", type=data.number(int, 0), default=3,
                   help="numbered checkpoints step_<k>.pt to keep (paper: 25; 0 = none)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (off by default: it pays only where benchmarks/paper_scale.py "
                        "--compile measures it does; the first steps compile)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt, exactly")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run (deletes it)")


def apply_recipe(p, args, recipes, val_parts):
    """A dataset's recipe (the training script's RECIPES[dataset]): its steps and batch size where no flag gave them,
    its validation period, then the checks of the shared flags. Returns the recipe."""
    if args.dataset not in recipes:
        p.error(f"unknown dataset '{args.dataset}'; known datasets: {', '.join(recipes)}")
    recipe = recipes[args.dataset]
    # a flag the user gave wins (None = not given); what they left out comes from the recipe
    args.steps = recipe["steps"] if args.steps is None else args.steps
    args.batch_size = recipe["batch"] if args.batch_size is None else args.batch_size
    # validation: the recipe's period (A.5: every 600 VAE / 1,000 OCL steps) when the steps are the recipe's,
    # else steps / val_parts, so that a shortened run still validates a few times
    every = recipe["val_every"] if args.steps == recipe["steps"] else max(1, args.steps // val_parts)
    args.val_every = every if args.val_every is None else args.val_every
    if args.ckpt_every is None:
        args.ckpt_every = min(args.val_every, 1000)  # a kill loses at most 1,000 steps
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out and --overwrite deletes it: give one of them")
    return recipe


# -----------------------------------------------------------------------------
# Checkpoints: plain dicts, written atomically, read without unpickling code


class RunError(Exception):
    """A problem with the run's inputs that the user can fix; main() prints the message without a traceback."""


class TrainingStopped(Exception):
    """SIGTERM/SIGINT arrived: the step finished, last.pt was written, the run can be resumed."""


def save_checkpoint(path, obj):
    """torch.save to a temporary file, then os.replace: a crash never leaves a half-written checkpoint, and a failed
    write (a full disk) removes its temporary and leaves the previous file as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def load_checkpoint(path, expect_kind=None):
    """Load a checkpoint dict safely (weights_only=True: no code runs) and check that it is of `expect_kind`
    ("vae" or "ocl"; None accepts both)."""
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
    return ckpt


RUN_FILES = ("last.pt", "best.pt", "step_*.pt", "metrics.jsonl")  # what a run writes into --out (and --overwrite deletes)


def checkpoint_bytes(model, params, extra=0):
    """What last.pt will take on disk: the model's state, Adam's two moments of every trained parameter, `extra`
    bytes of the script's own training state (the VAE's code-replacing pools), and 1 MiB for arguments, metrics and
    the random generators' states. (best.pt holds the model's state alone.)"""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return state + 2 * sum(p.numel() * p.element_size() for p in params) + extra + 2 ** 20


def prepare_out_dir(out, model, keep, resume=False, overwrite=False, main=True, last_bytes=None):
    """Fail before training, not after an hour: --out must be writable, have room for the checkpoints (`last_bytes`:
    checkpoint_bytes), and not hold another run (any of RUN_FILES) unless --resume (continue it) or --overwrite
    (start over) says what to do with it. Temporaries that killed runs left behind are removed (and named)."""
    out = Path(out)
    try:  # write 4 KiB and delete them: permissions and read-only mounts show up now, not at the first checkpoint
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as e:
        raise RunError(f"--out {out} is not writable ({e.strerror or e}); choose a folder you can write to") from None
    if main:
        for name in data.remove_stale_temporaries(out, ".*.tmp-*"):
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
    if dist.is_initialized():
        dist.barrier()  # nobody starts before process 0 has cleared the folder
    return out


def rng_state(d):
    """Every random generator the run uses, as plain tensors and numbers (weights_only loads them): Python's and
    NumPy's (augmentations drawn in the main process) and torch's CPU (and CUDA) generator, each of every process.
    Call it on all processes (it gathers)."""
    # the generators' own state objects are tuples and arrays that weights_only=True would refuse: store tensors
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": gather_objects([version, torch.tensor(internal, dtype=torch.int64), gauss], d),
             "numpy": gather_objects([torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)], d),
             "torch": _gather(torch.get_rng_state(), d)}
    if d.device.type == "cuda":
        state["cuda"] = _gather(torch.cuda.get_rng_state(d.device), d)
    return state


def set_rng_state(state, d):
    """Put back what rng_state saved; this process takes its own generators (rank k: the k-th saved ones)."""
    same = len(state["torch"]) == d.world
    if isinstance(state["python"][0], int):  # a last.pt written before Python's and NumPy's were kept per process
        state = {**state, "python": [state["python"]], "numpy": [state["numpy"]]}
    version, internal, gauss = state["python"][d.rank if len(state["python"]) == d.world else 0]
    random.setstate((version, tuple(internal.tolist()), gauss))
    keys, pos, has_gauss, cached = state["numpy"][d.rank if len(state["numpy"]) == d.world else 0]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if not same:  # another process count: the data order is the same, the noise is not
        if d.main:
            print(f"note: resuming a {len(state['torch'])}-process run with {d.world} processes; the data order is "
                  f"unchanged, sampling noise is not bit-identical")
        return
    torch.set_rng_state(state["torch"][d.rank])
    if d.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"][d.rank], d.device)


def save_last(out, ckpt, optimizer, scaler, best, d, keep, **extra):
    """last.pt = `ckpt` (the weights, as best.pt holds them) plus the training state: optimizer, AMP grad scaler,
    best score so far, every random generator, and `extra` (the VAE's code-replacing pools of every process). Call it
    on all processes (the generators are gathered); process 0 writes it, with a numbered copy step_<k>.pt, keeping the
    newest `keep` copies (the paper kept the final 25 of about 50). A copy is a hard link where the file system
    allows: no extra space until last.pt is replaced (os.replace gives last.pt a new file; the link keeps the old)."""
    ckpt["train_state"] = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "best": best,
                           "rng": rng_state(d), **extra}
    if not d.main:  # the other processes took part in the gather above; process 0 writes
        return
    out = Path(out)
    save_checkpoint(out / "last.pt", ckpt)
    if keep <= 0:
        return
    numbered = out / f"step_{ckpt['step']:07d}.pt"  # zero-padded: sorted by name = sorted by step
    tmp = out / f".{numbered.name}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(out / "last.pt", tmp)
    except OSError:
        shutil.copyfile(out / "last.pt", tmp)
    os.replace(tmp, numbered)
    for old in sorted(out.glob("step_*.pt"))[:-keep]:  # the oldest beyond --keep
        old.unlink()


def resume(out, kind, args, model_args, model, optimizer, scaler, d, extra=None,
           must_match=("dataset", "resolution", "steps", "batch_size", "seed", "lr", "predictor_lr", "augment")):
    """--resume: load last.pt of `out` into the model, optimizer, grad scaler and random generators, and return
    (step to start at, best score, last validation metrics, train_state). The data order and every schedule are
    functions of the step, so nothing else needs restoring.

    A checkpoint of another configuration is refused with every difference named: another kind, model, dataset
    or schedule (the LR, sigma, data order and augmentation are functions of `must_match`). `extra`: more model_args
    to compare, {"vae": current VAE model_args} for an OCL run."""
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


# -----------------------------------------------------------------------------
# The step: stop signals, non-finite losses and weights, the update, the log


class RunGuard:
    """Decides after every forward whether the run goes on: stop signals and non-finite losses.

    Signals: SIGTERM (cluster schedulers, `kill`, torchrun passing it on) or SIGINT (Ctrl-C) asks the run to stop:
    the current step finishes, last.pt is written, and the run can be resumed. A second signal acts at once.
    Non-finite losses: without AMP the first one stops the run before its update (nothing is written over the last
    good checkpoint). Under AMP (GradScaler on, GPUs) an fp16 overflow now and then is normal and the scaler's job:
    the update of that step is skipped and the scale lowered; only `patience` of them in a row stop the run.
    Use as `with RunGuard(d, amp, hint) as guard:`; the previous signal handlers come back on the way out."""

    def __init__(self, d, amp=False, hint="", patience=20):
        self.d, self.amp, self.hint, self.patience = d, amp, hint, patience
        self.received, self.previous, self.bad_in_a_row = None, {}, 0
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # only a flag here: the loop looks at it after the step (check), where stopping is safe
        self.received = signal.Signals(signum).name
        print(f"\n{self.received}: stopping after this step (send it again to stop at once)", flush=True)
        self.close()  # the previous handlers again: a second signal kills at once, as the user expects

    def check(self, loss, step):
        """Before the update of `step` (0-based): stop on a non-finite loss (FloatingPointError naming the step
        and the hint), or under AMP let the scaler skip it; returns whether a stop signal asks to end after this
        step. One all-reduce keeps all processes taking the same branch (a process leaving alone would leave the
        others waiting forever)."""
        flags = torch.tensor([float(not torch.isfinite(loss.detach()).all()), float(self.received is not None)],
                             device=loss.device)
        if self.d.world > 1:  # MAX: one process with a NaN, or one that got the signal, is enough for all
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.bad_in_a_row = self.bad_in_a_row + 1 if flags[0] else 0
        if flags[0] and (not self.amp or self.bad_in_a_row >= self.patience):
            run = f" ({self.bad_in_a_row} in a row under AMP)" if self.amp else ""
            raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {step + 1}{run}; stopping without "
                                     f"saving. {self.hint}")
        return bool(flags[1])

    def stopped(self, step, out):
        """The exception that ends a run stopped by a signal, after last.pt was written."""
        return TrainingStopped(f"stopped by {self.received} after step {step + 1}; {Path(out) / 'last.pt'} holds "
                               f"it. Continue with the same command plus --resume")

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@torch.no_grad()
def check_weights(model, d, step, loss_fn):
    """Before a checkpoint is written: are the weights finite, and is the loss they give (loss_fn(), on this step's
    batch, in eval mode, in fp32) finite too? An update that broke the model (e.g. --lr 1e30: finite weights of
    1e30 whose next loss is inf) is named here, and nothing is written over the last good checkpoint. The check
    draws nothing from the run's random generators (fork_rng) and changes no state, so resumes stay exact."""
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []), \
            torch.autocast(d.device.type, enabled=False):
        ok = all(bool(torch.isfinite(p).all()) for p in model.parameters()) and bool(torch.isfinite(loss_fn()).all())
    model.train(was_training)
    flag = torch.tensor(float(not ok), device=d.device)
    if d.world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag:
        raise FloatingPointError(f"the update of step {step + 1} left the model non-finite (its weights, or the loss "
                                 f"they give); nothing was saved, so the last checkpoint written still holds the "
                                 f"last good step. Try a lower --lr")


def optimizer_step(loss, optimizer, scaler, params, clip):
    """One AMP-aware update (A.5): backward (DDP averages the gradients of all processes here), unscale, clip the
    gradient norm, step, and let the grad scaler adapt (a no-op scaler on the CPU)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the true gradient, not the loss-scaled one
    torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(optimizer)  # skipped by the scaler if the fp16 gradients overflowed
    scaler.update()


class Log:
    """Prints fixed-format lines and appends JSON objects to metrics.jsonl (process 0 only: `enabled`).
    A resumed run first drops the lines the killed run wrote after its last checkpoint (step > start_step), so
    the log reads as one uninterrupted run."""

    def __init__(self, out_dir, total_steps, start_step=0, enabled=True):
        self.enabled, self.total, self.start, self.first = enabled, total_steps, time.time(), start_step
        if not enabled:  # processes 1..N-1 of a torchrun group write nothing
            return
        path = Path(out_dir) / "metrics.jsonl"
        if start_step and path.exists():
            lines, kept = path.read_text().splitlines(), []
            for n, line in enumerate(lines):
                try:
                    record = json.loads(line) if line else None
                except ValueError:  # a kill in the middle of a write leaves a partial last line: drop it, say so
                    if n < len(lines) - 1:
                        raise RunError(f"{path}, line {n + 1}, is not JSON; delete that line (or the file) and run "
                                       f"again with --resume") from None
                    print(f"note: dropped the partial last line of {path} (the run was killed while writing it)")
                    continue
                if record is not None and record.get("step", 0) <= start_step:
                    kept.append(line)
            path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")

    def __call__(self, step, **values):
        if self.enabled:  # "time": seconds since this process started training (benchmarks/ddp_scaling.py reads it)
            self.file.write(json.dumps({"step": step, "time": round(time.time() - self.start, 3), **values}) + "\n")
            self.file.flush()

    def progress(self, step, **values):
        """The console line: `step 100/400 | loss 0.25 | ... | 0.53 s/step | ETA 2.6 min`."""
        if not self.enabled:
            return
        per_step = (time.time() - self.start) / max(1, step + 1 - self.first)  # over the steps of this process
        eta = per_step * (self.total - step - 1)
        text = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        print(f"step {step + 1}/{self.total} | {text} | {per_step:.2f} s/step | ETA {eta / 60:.1f} min", flush=True)
