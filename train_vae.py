"""Stage 1: train the VAE whose discrete representation guides object-centric learning (MSF by default).

Paper: "Multi-Scale Fusion for Object Representation" (Zhao et al., ICLR 2025), Sect. 3.2-3.3 and A.5
("Pretraining VAE": Adam, lr 2e-3, linear warmup over the first 1/20 of the steps then cosine annealing,
automatic mixed precision, gradient clipping at norm 1.0, 30,000 steps at batch 64).

Run:  python train_vae.py                                   # shapes, MSF, c = 256; ~4 min on a 2-core CPU
      python train_vae.py --code-dim 4                      # the guidance of the diffusion decoder
      python train_vae.py --vae vqvae                       # the single-scale baseline (4096 codes)
      python train_vae.py --dataset clevrtex --device cuda  # paper recipe from the dataset preset
      torchrun --nproc_per_node 4 train_vae.py --dataset coco   # 4 GPUs, --batch-size stays the global batch
      python train_vae.py --dataset coco --resume           # continue a killed run exactly (same flags)

Writes runs/vae_<dataset>_<vae>_c<code_dim>/: best.pt and last.pt (see `checkpoint`), metrics.jsonl (one JSON
object per log line and per validation) and recon.png (inputs and reconstructions at every scale).
train_ocl.py reads best.pt. The helpers at the top (schedules, data order, DDP, checkpoints and resume, stop
signals, logging) serve train_ocl.py too; reading order: schedules, infinite_batches, the distributed helpers,
checkpoints/resume, Log, then this script's arguments, validation and training loop.
"""
import argparse
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
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import data
import msf
import vae

CKPT_VERSION = 1

# -----------------------------------------------------------------------------
# Helpers shared by both training scripts


def lr_at(step, total, base_lr):
    """Linear warmup over the first 1/20 of the steps, then cosine annealing to 0 (A.5)."""
    warmup = max(1, total // 20)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def cosine_decay(step, total, start=1.0, end=0.0):
    """start -> end along half a cosine over `total` steps, then `end`."""
    progress = min(1.0, step / max(1, total))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
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
    np.random.seed(s % 2 ** 32)
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
    b, per_epoch = batch_size // world, len(dataset) // batch_size
    epoch, first = divmod(start_step, per_epoch)
    while True:
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        torch.empty((), dtype=torch.int64).random_(generator=g)  # one draw first: the order of earlier versions
        perm = torch.randperm(len(dataset), generator=g).tolist()
        mine = [perm[i * batch_size + rank * b: i * batch_size + (rank + 1) * b] for i in range(first, per_epoch)]
        loader = DataLoader(dataset, batch_sampler=mine, num_workers=workers, pin_memory=pin_memory,
                            worker_init_fn=functools.partial(_seed_worker, base=((seed * 1009 + rank) * 100003 + epoch) * 64),
                            generator=torch.Generator())  # a private generator: the global RNG stays untouched
        yield from loader
        epoch, first = epoch + 1, 0


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


def setup_distributed(device_name):
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them this is one process and nothing happens.
    Backend: nccl on GPUs, gloo on CPUs. Each process then runs the same script on 1/world of every batch, and
    DistributedDataParallel averages the gradients so all processes take the same optimizer step."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return Dist(0, 1, 0, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


def wrap_ddp(model, d):
    """DistributedDataParallel around the trainable model (a no-op for one process). Buffers are not broadcast
    every step: the codebooks' hit counts are per process and summed where they are used (vae.Codebook)."""
    if d.world == 1:
        return model
    return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None, broadcast_buffers=False)


def print_batch_rule(d, batch_size, lr):
    if d.world > 1 and d.main:
        print(f"distributed: {d.world} processes x batch {batch_size // d.world} = effective batch {batch_size} "
              f"(--batch-size is the global batch, so the paper's lr {lr:g} applies unchanged: no scaling rule)")


def reseed_for_rank(seed, d):
    """After the model is built (identical on every process), give each process its own random stream for
    sampling noise (Gumbel, query init, diffusion noise); process 0 keeps the single-process stream."""
    if d.rank > 0:
        torch.manual_seed(seed * 1009 + d.rank)


def cleanup_distributed(d):
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Checkpoints, resume and stop signals


def save_checkpoint(path, obj):
    """torch.save to a temporary file, then os.replace: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, expect_kind=None):
    """Load a checkpoint dict safely (weights_only=True: no code runs) and check that it is of `expect_kind`
    ("vae" or "ocl"; None accepts both)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or something that needs unpickling code
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"it may be truncated or corrupt: re-create it") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by this code (no 'kind' entry)")
    if ckpt.get("format_version", 0) > CKPT_VERSION:
        raise ValueError(f"{path} has checkpoint format {ckpt['format_version']}, newer than this code ({CKPT_VERSION})")
    if expect_kind is not None and ckpt["kind"] != expect_kind:
        raise ValueError(f"{path} is a {ckpt['kind'].upper()} checkpoint, but a {expect_kind.upper()} checkpoint "
                         f"is needed here")
    return ckpt


class RunError(Exception):
    """A problem with the run's inputs that the user can fix; main() prints the message without a traceback."""


class TrainingStopped(Exception):
    """SIGTERM/SIGINT arrived: the step finished, last.pt was written, the run can be resumed."""


def prepare_out_dir(out, model, keep, resume=False, overwrite=False, main=True):
    """Fail before training, not after an hour: --out must be writable, have room for the checkpoints, and not
    hold another run unless --resume (continue it) or --overwrite (start over) says what to do with it."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as e:
        raise RunError(f"--out {out} is not writable ({e.strerror or e}); choose a folder you can write to") from None
    # last.pt carries the model and Adam's two moments (~3x the weights); best.pt and the numbered copies too
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    need, free = (keep + 2) * 3 * weights + 2 ** 20, shutil.disk_usage(out).free
    if free < need:
        raise RunError(f"--out {out} has {free / 2 ** 20:.0f} MiB free, but this run's checkpoints need about "
                       f"{need / 2 ** 20:.0f} MiB (last.pt, best.pt and --keep {keep} numbered copies); free space, "
                       f"lower --keep, or choose another --out")
    if (out / "last.pt").exists() and not resume:
        if not overwrite:
            raise RunError(f"{out} already holds a run (last.pt). Continue it with --resume, start over with "
                           f"--overwrite (deletes its checkpoints and log), or choose another --out")
        if main:
            for f in [*out.glob("step_*.pt"), out / "last.pt", out / "best.pt", out / "metrics.jsonl"]:
                f.unlink(missing_ok=True)
    if dist.is_initialized():
        dist.barrier()  # nobody starts before process 0 has cleared the folder
    return out


def save_train_checkpoint(out, ckpt, keep):
    """last.pt plus a numbered copy step_<k>.pt, keeping the newest `keep` copies (the paper kept the final 25
    of about 50). A copy is a hard link where the file system allows: no extra space until last.pt is replaced
    (os.replace gives last.pt a new file; the link keeps the old one)."""
    out = Path(out)
    save_checkpoint(out / "last.pt", ckpt)
    if keep <= 0:
        return
    numbered = out / f"step_{ckpt['step']:07d}.pt"
    tmp = out / f".{numbered.name}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(out / "last.pt", tmp)
    except OSError:
        shutil.copyfile(out / "last.pt", tmp)
    os.replace(tmp, numbered)
    for old in sorted(out.glob("step_*.pt"))[:-keep]:
        old.unlink()


def _gather(t, d):
    """[t of process 0, t of process 1, ...] on every process (same shapes everywhere)."""
    if d.world == 1:
        return [t]
    x = t.to(d.device)
    parts = [torch.empty_like(x) for _ in range(d.world)]
    dist.all_gather(parts, x)
    return [q.cpu() for q in parts]


def rng_state(d):
    """Every random generator the run uses, as plain tensors and numbers (weights_only loads them): Python's and
    NumPy's, and torch's CPU (and CUDA) generator of every process. Call it on all processes (it gathers)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
             "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": _gather(torch.get_rng_state(), d)}
    if d.device.type == "cuda":
        state["cuda"] = _gather(torch.cuda.get_rng_state(d.device), d)
    return state


def set_rng_state(state, d):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if len(state["torch"]) != d.world:  # another process count: the data order is the same, the noise is not
        if d.main:
            print(f"note: resuming a {len(state['torch'])}-process run with {d.world} processes; the data order is "
                  f"unchanged, sampling noise is not bit-identical")
        return
    torch.set_rng_state(state["torch"][d.rank])
    if d.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"][d.rank], d.device)


def load_for_resume(out, kind, args, model_args, must_match=("dataset", "resolution", "steps", "batch_size", "seed", "lr"),
                    extra=None):
    """last.pt of the run to continue, refused with every difference named if it belongs to another configuration
    (another kind, model, dataset or schedule: the LR, sigma and data order are functions of these). `extra`:
    more model_args to compare, {"vae": current VAE model_args} for an OCL run."""
    path = Path(out) / "last.pt"
    if not path.exists():
        raise RunError(f"--resume: there is no {path} to continue; run without --resume to start, or give the --out "
                       f"of the run to continue")
    ckpt = load_checkpoint(path, kind)
    if "train_state" not in ckpt:
        raise RunError(f"--resume: {path} holds weights only, no training state; start a new run in another --out")
    diffs = [f"{k}: {ckpt['model_args'].get(k)!r} in the checkpoint, {v!r} now"
             for k, v in model_args.items() if ckpt["model_args"].get(k) != v]
    diffs += [f"{k}: {ckpt['args'].get(k)!r} in the checkpoint, {getattr(args, k, None)!r} now"
              for k in must_match if ckpt["args"].get(k) != getattr(args, k, None)]
    for name, ours in (extra or {}).items():  # e.g. the OCL run's embedded VAE: ckpt["vae"]["model_args"]
        theirs = ckpt[name]["model_args"]
        diffs += [f"{name}.{k}: {theirs.get(k)!r} in the checkpoint, {v!r} now" for k, v in ours.items() if theirs.get(k) != v]
    if diffs:
        raise RunError(f"--resume: {path} belongs to another run configuration ({'; '.join(diffs)}). Resume with the "
                       f"flags it was started with, or start a new run in another --out")
    return ckpt


def step_flags(loss, stop, d):
    """(loss is non-finite on some process, a stop signal reached some process): one all-reduce keeps all
    processes taking the same branch (a process leaving alone would leave the others waiting forever)."""
    flags = torch.tensor([float(not torch.isfinite(loss.detach()).all()), float(stop.received is not None)],
                         device=loss.device)
    if d.world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1])


def optimizer_step(loss, optimizer, scaler, params, clip):
    """One AMP-aware update (A.5): backward (DDP averages the gradients of all processes here), unscale, clip the
    gradient norm, step, and let the grad scaler adapt (a no-op scaler on the CPU)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(optimizer)
    scaler.update()


class StopSignal:
    """SIGTERM (cluster schedulers, `kill`, torchrun passing it on) or SIGINT (Ctrl-C) asks the run to stop: the
    current step finishes, last.pt is written, and the run can be resumed. A second signal acts at once."""

    def __init__(self):
        self.received, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        print(f"\n{self.received}: stopping after this step (send it again to stop at once)", flush=True)
        self.close()

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def load_vae(path_or_ckpt, device="cpu"):
    """Rebuild a VAE from its checkpoint (a path or an already-loaded dict); returns (model in eval mode, ckpt)."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else load_checkpoint(path_or_ckpt, "vae")
    model = msf.build_vae(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


class Log:
    """Prints fixed-format lines and appends JSON objects to metrics.jsonl (process 0 only: `enabled`).
    A resumed run first drops the lines the killed run wrote after its last checkpoint (step > start_step), so
    the log reads as one uninterrupted run."""

    def __init__(self, out_dir, total_steps, start_step=0, enabled=True):
        self.enabled, self.total, self.start, self.first = enabled, total_steps, time.time(), start_step
        if not enabled:
            return
        path = Path(out_dir) / "metrics.jsonl"
        if start_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")

    def __call__(self, step, **values):
        if self.enabled:  # "time": seconds since this process started training (benchmarks/ddp_scaling.py reads it)
            self.file.write(json.dumps({"step": step, "time": round(time.time() - self.start, 3), **values}) + "\n")
            self.file.flush()

    def progress(self, step, **values):
        if not self.enabled:
            return
        per_step = (time.time() - self.start) / max(1, step + 1 - self.first)
        eta = per_step * (self.total - step - 1)
        text = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        print(f"step {step + 1}/{self.total} | {text} | {per_step:.2f} s/step | ETA {eta / 60:.1f} min", flush=True)


def to_uint8(images):
    """(b, 3, H, W) in [-1, 1] -> (b, H, W, 3) uint8 numpy."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def save_rows_png(path, rows, scale=2):
    """rows: list of (b, 3, H_r, W_r) batches in [-1, 1]; each is resized (nearest) to the first row's size."""
    size = rows[0].shape[-1]
    grid = [np.concatenate(list(to_uint8(torch.nn.functional.interpolate(r.float(), size=size))), axis=1)
            for r in rows]
    img = Image.fromarray(np.concatenate(grid, axis=0))
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


# -----------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stage 1: train an MSF (or baseline) VQ-VAE.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="shapes", help=f"one of {', '.join(data.PRESETS)}")
    p.add_argument("--data-root", default="data", help="folder holding the LMDB datasets")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the dataset preset; shapes: 64)")
    p.add_argument("--vae", default="msf", choices=["msf", "vqvae", "gdr", "multiscale"],
                   help="msf: Sect. 3.3; vqvae: single scale, 4096 codes; gdr: 2 groups x 64 codes; "
                        "multiscale: pyramid + one shared codebook (Sect. 3.2)")
    p.add_argument("--code-dim", type=int, default=256, help="c: 256 guides the transformer decoder, 4 the diffusion decoder")
    p.add_argument("--scales", type=int, default=3, help="N, number of pyramid scales (msf, multiscale)")
    p.add_argument("--channels", type=int, default=64, help="width of the VAE encoder/decoder CNN")
    p.add_argument("--num-codes", type=int, default=4096, help="vocabulary: codes, or combinations of grouped codes")
    # ablations of Tab. 5-6 (msf only)
    p.add_argument("--no-inter", action="store_true", help="ablation: disable inter-scale fusion (Tab. 5)")
    p.add_argument("--no-intra", action="store_true", help="ablation: disable intra-scale fusion (Tab. 5)")
    p.add_argument("--sv-shared", action="store_true", help="ablation: one scale-variant codebook for all scales (Tab. 5)")
    p.add_argument("--fusion", default="msf", choices=["msf", "concat", "sum"], help="Tab. 6: our fusion or channel-concat / element-wise-sum")
    # optimisation (A.5)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: dataset preset; paper 30000)")
    p.add_argument("--batch-size", type=int, default=None, help="default: dataset preset (paper 64)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (paper 2e-3)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm (paper 1.0)")
    p.add_argument("--clip-frames", type=int, default=6,
                   help="video datasets: consecutive frames taken from each clip per step (authors: 6); a batch is "
                        "--batch-size clips x this many frames")
    p.add_argument("--stabilisers", default="auto", choices=["auto", "on", "off"],
                   help="GDR's annealed residual + Gumbel matching + code replacing; auto = on for gdr/msf/multiscale")
    p.add_argument("--replace-every", type=int, default=20, help="code-replacing trick period in steps (0 = never)")
    add_run_args(p, val_default="steps/4")
    p.add_argument("--out", default=None, help="run folder (default runs/vae_<dataset>_<vae>_c<code-dim>)")
    args = p.parse_args(argv)

    preset = apply_preset(p, args, "vae", val_parts=4)
    args.resolution = args.resolution or preset["resolution"]
    if args.vae in ("vqvae", "gdr"):
        args.scales = 1
    if args.scales < 1:
        p.error(f"--scales must be >= 1, got {args.scales}")
    factor = 4 * 2 ** (args.scales - 1)  # 4x VAE down-sampling at the coarsest of N halvings
    if args.resolution % factor:
        p.error(f"--resolution {args.resolution} is not divisible by 4 * 2^(N-1) = {factor} for --scales {args.scales}; "
                f"use a multiple of {factor} or fewer scales")
    if args.code_dim < 1 or args.steps < 1 or args.batch_size < 1 or args.clip_frames < 1:
        p.error("--code-dim, --steps, --batch-size and --clip-frames must be positive")
    if args.out is None:
        args.out = default_vae_dir(args.dataset, args.vae, args.code_dim)
    return args


def add_run_args(p, val_default):
    """The flags both training scripts share: seeds, devices, data loading, logging, checkpoints, resume."""
    p.add_argument("--seed", type=int, default=0, help="seed of everything (weights, data order, sampling)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (under torchrun: each process's GPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes per training process (default: 4 on GPU, 0 on CPUs with <= 4 cores)")
    p.add_argument("--log-every", type=int, default=50, help="print and log every this many steps")
    p.add_argument("--val-every", type=int, default=None, help=f"validate every this many steps (default {val_default})")
    p.add_argument("--val-batches", type=int, default=8, help="validation batches (of --batch-size) per validation")
    p.add_argument("--ckpt-every", type=int, default=None,
                   help="write last.pt (with the training state) every this many steps (default: min(--val-every, 1000))")
    p.add_argument("--keep", type=int, default=3, help="numbered checkpoints step_<k>.pt to keep (paper: 25; 0 = none)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt, exactly")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run (deletes it)")


def apply_preset(p, args, stage, val_parts):
    """The dataset's preset (data.PRESETS) for stage "vae" or "ocl": its steps and batch size where no flag gave
    them, validation every steps/val_parts, then the checks of the shared flags. Returns the preset."""
    if args.dataset not in data.PRESETS:
        p.error(f"unknown dataset '{args.dataset}'; known datasets: {', '.join(data.PRESETS)}")
    preset = data.PRESETS[args.dataset]
    args.steps = args.steps or preset[f"{stage}_steps"]
    args.batch_size = args.batch_size or preset[f"{stage}_batch"]
    args.val_every = args.val_every or max(1, args.steps // val_parts)
    check_run_args(p, args)
    return preset


def check_run_args(p, args):
    args.ckpt_every = args.ckpt_every or min(args.val_every, 1000)
    for name in ("log_every", "val_every", "val_batches", "ckpt_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.keep < 0 or (args.workers is not None and args.workers < 0):
        p.error("--keep and --workers must be >= 0")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out and --overwrite deletes it: give one of them")


def default_vae_dir(dataset, kind="msf", code_dim=256):
    return f"runs/vae_{dataset}_{kind}_c{code_dim}"


# -----------------------------------------------------------------------------
# Validation


@torch.no_grad()
def validate(model, val_data, device, batches, batch_size):
    """Reconstruction MSE per scale and codebook usage (perplexity, share of codes used) on the first batches."""
    model.eval()
    loader = DataLoader(val_data, batch_size, shuffle=False)
    sums, count, all_idx = {}, 0, []
    for i, batch in enumerate(loader):
        if i == batches:
            break
        image = video_frames(batch["image"]).to(device)  # (b, 3, H, W); videos: every frame of b clips
        out = model(image)
        for k, v in out["logs"].items():
            if k.startswith("recon"):
                sums[k] = sums.get(k, 0.0) + v.item() * len(image)
        count += len(image)
        all_idx.append([idx.cpu() for idx in out["indices"]])
    metrics = {f"val_{k}": v / count for k, v in sums.items()}
    for n in range(len(all_idx[0])):  # per scale, per index group
        idx = torch.cat([a[n] for a in all_idx])  # (B, g, h, w)
        for k in range(idx.shape[1]):
            m = model.vocab[k]
            metrics[f"val_perplexity{n + 1}_{k}"] = vae.perplexity(idx[:, k], m)
            metrics[f"val_used{n + 1}_{k}"] = len(idx[:, k].unique()) / m
    model.train()
    return metrics


# -----------------------------------------------------------------------------
# Training


def train(args):
    seed_everything(args.seed)
    d = setup_distributed(args.device)  # one process, or this process of a torchrun group
    try:
        return _train(args, d)
    finally:
        cleanup_distributed(d)


def _train(args, d):
    device = d.device
    train_data = data.load_dataset(args.dataset, "train", args.data_root, args.resolution)
    val_data = data.load_dataset(args.dataset, "val", args.data_root, args.resolution)

    model_args = dict(kind=args.vae, code_dim=args.code_dim, channels=args.channels, scales=args.scales,
                      fusion=args.fusion, inter=not args.no_inter, intra=not args.no_intra,
                      sv_shared=args.sv_shared, num_codes=args.num_codes)
    model = msf.build_vae(**model_args).to(device)
    out = prepare_out_dir(args.out, model, args.keep, args.resume, args.overwrite, d.main)
    stabilise = args.stabilisers == "on" or (args.stabilisers == "auto" and args.vae != "vqvae")
    if not (stabilise and args.replace_every):
        for cb in model.codebooks:
            cb.pool = 0  # no code replacing: no pool of recent vectors to keep (and no random draws for it)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    reseed_for_rank(args.seed, d)
    start, best, metrics = 0, float("inf"), {}
    if args.resume:  # everything the next step depends on; the data order and schedules are functions of the step
        ckpt = load_for_resume(out, "vae", args, model_args)
        ts = ckpt["train_state"]
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ts["optimizer"])
        scaler.load_state_dict(ts["scaler"])
        for cb, recent in zip(model.codebooks, ts["recent"]):
            cb.recent = recent.to(device)
        set_rng_state(ts["rng"], d)
        start, best, metrics = ckpt["step"], ts["best"], ckpt["metrics"]
    log = Log(out, args.steps, start, enabled=d.main)
    n_params = sum(p.numel() for p in model.parameters())
    workers = default_workers(device) if args.workers is None else args.workers
    if d.main:
        print(f"VAE {args.vae} c={args.code_dim} N={getattr(model, 'num_scales', 1)} | {n_params / 1e6:.2f}M parameters, "
              f"{vae.count_codebook_params(model):,} codebook-related | {args.dataset} {args.resolution}px, "
              f"{len(train_data)} train samples | {args.steps} steps x batch {args.batch_size}"
              + (f" clips x {args.clip_frames} frames" if train_data[0]["image"].dim() == 4 else "") + f" on {device}"
              + (f" | resumed at step {start}" if start else ""))
    print_batch_rule(d, args.batch_size, args.lr)

    batches = infinite_batches(train_data, args.batch_size, args.seed, start, d.rank, d.world, workers, device.type == "cuda")
    ddp = wrap_ddp(model, d)
    fixed = next(iter(DataLoader(val_data, 8, generator=torch.Generator())))["image"]  # recon.png, (8, 3, H, W)
    fixed = (fixed[:, 0] if fixed.dim() == 5 else fixed).to(device)  # videos: the first frame of 8 clips
    stop = StopSignal()
    model.train()
    try:
        for step in range(start, args.steps):
            lr = lr_at(step, args.steps, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # GDR's stabilisers (A.3): residual alpha and Gumbel temperature tau go 1 -> 0 over the first half
            anneal = cosine_decay(step, args.steps // 2) if stabilise else 0.0
            slices = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1_009 + d.rank)  # a function of the step
            image = video_frames(next(batches)["image"], args.clip_frames, slices)  # (b, 3, H, W), this process's share
            image = image.to(device, non_blocking=True)  # (videos: b clips x --clip-frames frames)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                out_ = ddp(image, tau=anneal, alpha=anneal)
            loss = out_["loss"]
            bad, stopping = step_flags(loss, stop, d)
            if bad:
                raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {step + 1}; stopping without saving. "
                                         f"Try a lower --lr or --stabilisers on.")
            optimizer_step(loss, optimizer, scaler, model.parameters(), args.clip)
            # the code-replacing trick (A.3), stopped for the last 10% so the final codebook usage is honest
            replaced = 0
            if stabilise and args.replace_every and (step + 1) % args.replace_every == 0 and step < 0.9 * args.steps:
                replaced = sum(cb.replace_dead() for cb in model.codebooks)

            if (step + 1) % args.log_every == 0 or step == 0:
                logs = {k: round(v.item(), 5) for k, v in out_["logs"].items()}
                log(step + 1, loss=loss.item(), lr=lr, anneal=anneal, replaced=replaced, **logs)
                log.progress(step, loss=loss.item(), **{k: v for k, v in logs.items() if k.startswith("recon")})
            validating = (step + 1) % args.val_every == 0 or step + 1 == args.steps
            if validating and d.main:
                metrics = validate(model, val_data, device, args.val_batches, args.batch_size)
                log(step + 1, **{k: round(v, 5) for k, v in metrics.items()})
                print("  val | " + " | ".join(f"{k[4:]} {v:.4g}" for k, v in metrics.items()), flush=True)
                score = sum(v for k, v in metrics.items() if k.startswith("val_recon"))
                if score < best:
                    best = score
                    save_checkpoint(out / "best.pt", checkpoint(args, model_args, model, step, metrics))
                with torch.no_grad():
                    model.eval()
                    rec = model(fixed)["recons"]
                    model.train()
                pyramid = msf.image_pyramid(fixed, len(rec))
                save_rows_png(out / "recon.png", [r for pair in zip(pyramid, rec) for r in pair])
            if validating or stopping or (step + 1) % args.ckpt_every == 0:  # last: after everything of this step
                ckpt = checkpoint(args, model_args, model, step, metrics)
                ckpt["train_state"] = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "best": best,
                                       "recent": [cb.recent.cpu() for cb in model.codebooks], "rng": rng_state(d)}
                if d.main:
                    save_train_checkpoint(out, ckpt, args.keep)
            if stopping:
                raise TrainingStopped(f"stopped by {stop.received} after step {step + 1}; {out / 'last.pt'} holds it. "
                                      f"Continue with the same command plus --resume")
    finally:
        stop.close()
    if d.main:
        print(f"done: {out / 'best.pt'} (val reconstruction {best:.4f}); reconstructions in {out / 'recon.png'}")
    return out


def checkpoint(args, model_args, model, step, metrics):
    """What best.pt holds; last.pt adds "train_state" (optimizer, scaler, RNG, code-replacing pools)."""
    return {"kind": "vae", "format_version": CKPT_VERSION, "args": vars(args), "model_args": model_args,
            "model": model.state_dict(), "step": step + 1, "metrics": metrics, "vocab": model.vocab}


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (data.DatasetMissing, FloatingPointError, RunError, TrainingStopped, ValueError) as e:
        sys.exit(str(e))


if __name__ == "__main__":
    main()
