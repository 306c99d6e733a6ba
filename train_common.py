"""Engineering that both training scripts share. None of it is in the paper: the paper's recipes and schedules are
in the training scripts themselves (train_vae.RECIPES / lr_at / anneal_at, train_ocl.RECIPES / lr_at / sigma_at).

train_vae.py (stage 1) and train_ocl.py (stage 2) are the two loops of the paper's recipe (A.5). What they need
around those loops to run for days on several GPUs and survive a kill lives here, as plain functions they call by
name, so that each loop reads forward -> loss -> step with nothing else in the way:

  the lr           cosine, warmup_cosine (the shapes of the schedules), set_lr (the lr of every param group)
  randomness       seed_everything, the data order `infinite_batches` (a pure function of seed and step), the
                   per-worker seeds of the DataLoader, and what a step draws from its batch: temporal crops of
                   clips (`clip_starts`, `crop_clips`) and the authors' augmentation (`augment`, --augment)
  devices          pick_device, default_workers; `distributed` (torchrun: one process per GPU, DDP), `rank_mean`
  run arguments    add_run_args, apply_recipe (a dataset's recipe where no flag was given)
  the step         RunGuard (stop signals, non-finite losses), check_weights (before any checkpoint is written),
                   optimizer_step (AMP, clipping), Log
Checkpoints, the lock on --out and --resume are checkpoints.py's.

Reading order: as listed. Nothing here imports a model file: the scripts hand in what they built.
Imports from the project: data (the dataset facts, the argument types).
"""
import contextlib
import datetime
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
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import data


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
# What a training step draws from its batch: temporal crops of clips (A.4), the authors' augmentation (--augment).
# Each is a function of (seed, step) for the global batch, of which a process takes its part, so a resumed run and
# N processes draw as one uninterrupted process does.


def augment(image, bbox, seed, step, rank=0, world=1, scale=(0.75, 1.0), ratio=(3 / 4, 4 / 3)):
    """--augment, the authors' training augmentation (not in the paper): per sample a random crop of 75-100% of the
    area with an aspect ratio of 3/4-4/3 (torchvision's RandomResizedCrop draw), resized back to H x W (bilinear,
    antialiased), then a horizontal flip with probability 1/2. A clip's frames share their sample's crop and flip,
    and its boxes follow: clipped to the crop, a box left empty becomes the zero box (not visible). The draws are a
    function of (seed, step) for the global batch, of which this process takes its part, as crop_clips.
    image (b, 3, H, W) or clips (b, t, 3, H, W); bbox (b, t, K, 4) normalised (x0, y0, x1, y1), or None."""
    b, (H, W) = image.shape[0], image.shape[-2:]
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 7_777_777)  # not crop_clips' stream
    crops = [crop_box(H, W, scale, ratio, g) for _ in range(b * world)][rank * b:(rank + 1) * b]  # b x (i, j, h, w)
    flips = (torch.rand(b * world, generator=g) < 0.5)[rank * b:(rank + 1) * b]  # (b,)
    out = []
    for x, (i, j, h, w), flip in zip(image, crops, flips):  # x (3, H, W) or (t, 3, H, W)
        x = F.interpolate(x[..., i:i + h, j:j + w].reshape(-1, 3, h, w), size=(H, W), mode="bilinear",
                          align_corners=False, antialias=True).reshape(x.shape)
        out.append(x.flip(-1) if flip else x)
    if bbox is not None:
        shown = (bbox[..., 2:] > bbox[..., :2]).all(-1, keepdim=True)  # (b, t, K, 1) the visible boxes
        i, j, h, w = (torch.tensor(v, dtype=bbox.dtype)[:, None, None] for v in zip(*crops))  # each (b, 1, 1)
        x0, x1 = ((bbox[..., k] * W - j) / w for k in (0, 2))  # (b, t, K) in the crop's width
        y0, y1 = ((bbox[..., k] * H - i) / h for k in (1, 3))
        x0, x1 = torch.where(flips[:, None, None], 1 - x1, x0), torch.where(flips[:, None, None], 1 - x0, x1)
        bbox = torch.stack([x0, y0, x1, y1], -1).clamp(0, 1)  # (b, t, K, 4)
        bbox = bbox * (shown & (bbox[..., 2:] > bbox[..., :2]).all(-1, keepdim=True))  # empty after the crop: 0
    return torch.stack(out), bbox


def crop_box(H, W, scale, ratio, generator):
    """(i, j, h, w) of a random crop as torchvision's RandomResizedCrop draws it: up to 10 tries of an area share
    in `scale` and a log-uniform aspect ratio in `ratio` that fit the image, else the central crop."""
    for _ in range(10):
        area = H * W * (scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=generator).item())
        aspect = math.exp(math.log(ratio[0]) + math.log(ratio[1] / ratio[0]) * torch.rand(1, generator=generator).item())
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= W and 0 < h <= H:
            i = int(torch.randint(0, H - h + 1, (1,), generator=generator))
            j = int(torch.randint(0, W - w + 1, (1,), generator=generator))
            return i, j, h, w
    w, h = (W, round(W / ratio[0])) if W / H < ratio[0] else (round(H * ratio[1]), H) if W / H > ratio[1] else (W, H)
    return (H - h) // 2, (W - w) // 2, h, w


def clip_starts(frames, window, count, generator=None):
    """The first frame of `count` random strided temporal crops (A.4) of `window` frames from clips of `frames`:
    drawn from {0, w, 2w, ...} (windows that do not overlap: the authors' StridedRandomSlice, {0, 6, 12, 18} on
    MOVi's 24 frames). A window as long as the clip or longer: the whole clip, start 0. Returns (count,) long."""
    if window >= frames:
        return torch.zeros(count, dtype=torch.long)
    choices = torch.arange(0, frames - window + 1, window)  # (c,) the windows' first frames
    return choices[torch.randint(len(choices), (count,), generator=generator)]  # (count,)


def crop_clips(image, bbox, index, window, seed, step, rank=0, world=1):
    """A.4's random strided temporal crop, for this process's clips (b, T, 3, H, W) and boxes (b, T, K, 4): `window`
    consecutive frames from a first frame drawn from {0, w, 2w, ...} (clip_starts: windows that do not
    overlap, as the authors' {0, 6, 12, 18} on MOVi's 24 frames). The draw is a function of (seed, step) for the
    global batch, of which this process (`rank` of `world`) takes its part: a resumed run and N processes crop as
    one process does.
    Returns the cropped clips (b, w, 3, H, W), boxes (b, w, K, 4), and the (clip, frame) key of every frame taken,
    in clip-major order (for the guidance cache)."""
    b, t = image.shape[:2]
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = clip_starts(t, window, b * world, g)[rank * b:(rank + 1) * b]  # (b,) this process's
    frames = starts[:, None] + torch.arange(min(window, t))  # (b, w) frame numbers
    rows = torch.arange(b)[:, None]  # (b, 1)
    keys = [(int(i), int(f)) for i, fs in zip(index, frames) for f in fs]
    return image[rows, frames], bbox[rows, frames], keys  # (b, w, 3, H, W), (b, w, K, 4)


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
    # the timeout outlasts the longest wait of one process for the others: process 0 filling the DINO feature
    # cache of a whole dataset (train_ocl.FeatureCache) while the others wait at a barrier
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=6))
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


def wrap_ddp(model, d):
    """DistributedDataParallel around the trainable model (a no-op for one process). Buffers are not broadcast
    every step: the codebooks' hit counts are per process and summed where they are used (vae.Codebook)."""
    if d.world > 1:
        model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None, broadcast_buffers=False)
    return model


COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests count graphs with a backend of their own


def compile_model(model):
    """--compile: torch.compile in place (nn.Module.compile: the state_dict keeps its keys, so a checkpoint is the
    same whether its run compiled or not) of the parts whose graphs are static. A stage-1 VAE (it has codebooks):
    its encoder and decoder, nearly all of its FLOPs; its quantizer stays eager, since it branches on data (the
    codebooks start on the first batch, count their use and move dead codes). A stage-2 model: all of it (one
    recompile when the query noise sigma leaves its first value). The first steps pay for the compilation."""
    parts = [model.encoder, model.decoder] if hasattr(model, "codebooks") else [model]
    import torch._inductor.config
    # Inductor draws random numbers (the query noise, Gumbel matching) with a generator of its own unless told not
    # to: a compiled run would then be another random draw than the eager run of the same seed. torch's own
    # generator keeps them the same draws, and --resume restores it.
    torch._inductor.config.fallback_random = True
    for part in parts:
        part.compile(backend=COMPILE_BACKEND)
    return model


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


def rank_mean(x, d):
    """The mean of a scalar tensor over the processes (the log's training loss: every process's share of the global
    batch, not process 0's alone); a float. Call it on all processes at the same steps."""
    x = x.detach().float().reshape(1)
    if d.world > 1:
        x = x.to(d.device)
        dist.all_reduce(x)
        x = x / d.world
    return x.item()


def gather_objects(obj, d):
    """[obj of process 0, obj of process 1, ...] on every process, for per-process state of any shape (the
    code-replacing samples); objects travel between this run's own processes only."""
    if d.world == 1:
        return [obj]
    parts = [None] * d.world
    dist.all_gather_object(parts, obj)
    return parts


def gather(t, d):
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
                   help="torch.compile the model's static parts (compile_model; off by default: it pays only where "
                        "benchmarks/paper_scale.py --compile measures it does; the first steps compile)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt, exactly")
    p.add_argument("--allow-world-change", action="store_true",
                   help="--resume with another number of processes than the run was written with (the same data "
                        "order; the new processes' random generators derived from the saved ones)")
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
# The errors a training script turns into one-line messages


class RunError(Exception):
    """A problem with the run's inputs that the user can fix; main() prints the message without a traceback."""


class TrainingStopped(Exception):
    """SIGTERM/SIGINT arrived: the step finished, last.pt was written, the run can be resumed."""


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
