"""Stage 1: train the VAE whose discrete representation guides object-centric learning (MSF by default).

Paper: "Multi-Scale Fusion for Object Representation" (Zhao et al., ICLR 2025), Sect. 3.2-3.3 and A.5
("Pretraining VAE": Adam, lr 2e-3, linear warmup over the first 1/20 of the steps then cosine annealing,
automatic mixed precision, gradient clipping at norm 1.0, 30,000 steps at batch 64).

Run:  python train_vae.py                                   # shapes, MSF, c = 256; ~5 min on a 2-core CPU
      python train_vae.py --code-dim 4                      # the guidance of the diffusion decoder
      python train_vae.py --vae vqvae                       # the single-scale baseline (4096 codes)
      python train_vae.py --dataset clevrtex --device cuda  # paper recipe from the dataset preset

Writes runs/vae_<dataset>_<vae>_c<code_dim>/: best.pt and last.pt (see `checkpoint`), metrics.jsonl (one JSON
object per log line and per validation) and recon.png (inputs and reconstructions at every scale).
train_ocl.py reads best.pt. The helpers at the top (schedules, checkpoints, logging) serve train_ocl.py too.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
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


def infinite_batches(dataset, batch_size, seed, workers=0, pin_memory=False):
    """Shuffled batches forever; epoch e is shuffled with seed (seed, e), so runs are reproducible."""
    if len(dataset) < batch_size:
        sys.exit(f"the dataset has {len(dataset)} samples, fewer than --batch-size {batch_size}")
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        loader = DataLoader(dataset, batch_size, shuffle=True, drop_last=True, generator=g,
                            num_workers=workers, pin_memory=pin_memory, persistent_workers=False)
        yield from loader
        epoch += 1


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


def load_vae(path_or_ckpt, device="cpu"):
    """Rebuild a VAE from its checkpoint (a path or an already-loaded dict); returns (model in eval mode, ckpt)."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else load_checkpoint(path_or_ckpt, "vae")
    model = msf.build_vae(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


class Log:
    """Prints fixed-format lines and appends JSON objects to metrics.jsonl."""

    def __init__(self, out_dir, total_steps):
        self.file = open(Path(out_dir) / "metrics.jsonl", "a")
        self.total, self.start = total_steps, time.time()

    def __call__(self, step, **values):
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()

    def progress(self, step, start_step, **values):
        done = step + 1 - start_step
        per_step = (time.time() - self.start) / max(1, done)
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
    p.add_argument("--stabilisers", default="auto", choices=["auto", "on", "off"],
                   help="GDR's annealed residual + Gumbel matching + code replacing; auto = on for gdr/msf/multiscale")
    p.add_argument("--replace-every", type=int, default=20, help="code-replacing trick period in steps (0 = never)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (weights, data order, sampling)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--log-every", type=int, default=50, help="print and log every this many steps")
    p.add_argument("--val-every", type=int, default=None, help="validate every this many steps (default steps/4)")
    p.add_argument("--val-batches", type=int, default=8, help="validation batches (of --batch-size) per validation")
    p.add_argument("--out", default=None, help="run folder (default runs/vae_<dataset>_<vae>_c<code-dim>)")
    args = p.parse_args(argv)

    if args.dataset not in data.PRESETS:
        p.error(f"unknown dataset '{args.dataset}'; known datasets: {', '.join(data.PRESETS)}")
    preset = data.PRESETS[args.dataset]
    args.resolution = args.resolution or preset["resolution"]
    args.steps = args.steps or preset["vae_steps"]
    args.batch_size = args.batch_size or preset["vae_batch"]
    args.val_every = args.val_every or max(1, args.steps // 4)
    if args.vae in ("vqvae", "gdr"):
        args.scales = 1
    if args.scales < 1:
        p.error(f"--scales must be >= 1, got {args.scales}")
    factor = 4 * 2 ** (args.scales - 1)  # 4x VAE down-sampling at the coarsest of N halvings
    if args.resolution % factor:
        p.error(f"--resolution {args.resolution} is not divisible by 4 * 2^(N-1) = {factor} for --scales {args.scales}; "
                f"use a multiple of {factor} or fewer scales")
    if args.code_dim < 1 or args.steps < 1 or args.batch_size < 1:
        p.error("--code-dim, --steps and --batch-size must be positive")
    if args.out is None:
        args.out = default_vae_dir(args.dataset, args.vae, args.code_dim)
    return args


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
        image = batch["image"].to(device)
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
    device = pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_data = data.load_dataset(args.dataset, "train", args.data_root, args.resolution)
    val_data = data.load_dataset(args.dataset, "val", args.data_root, args.resolution)

    model_args = dict(kind=args.vae, code_dim=args.code_dim, channels=args.channels, scales=args.scales,
                      fusion=args.fusion, inter=not args.no_inter, intra=not args.no_intra,
                      sv_shared=args.sv_shared, num_codes=args.num_codes)
    model = msf.build_vae(**model_args).to(device)
    stabilise = args.stabilisers == "on" or (args.stabilisers == "auto" and args.vae != "vqvae")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    log = Log(out, args.steps)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"VAE {args.vae} c={args.code_dim} N={getattr(model, 'num_scales', 1)} | {n_params / 1e6:.2f}M parameters, "
          f"{vae.count_codebook_params(model):,} codebook-related | {args.dataset} {args.resolution}px, "
          f"{len(train_data)} train samples | {args.steps} steps x batch {args.batch_size} on {device}")

    batches = infinite_batches(train_data, args.batch_size, args.seed, args.workers, device.type == "cuda")
    best, metrics, fixed = float("inf"), {}, None
    model.train()
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # GDR's stabilisers (A.3): residual alpha and Gumbel temperature tau go 1 -> 0 over the first half
        anneal = cosine_decay(step, args.steps // 2) if stabilise else 0.0
        image = next(batches)["image"].to(device, non_blocking=True)  # (b, 3, H, W)
        if fixed is None:
            fixed = image[:8].clone()
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            out_ = model(image, tau=anneal, alpha=anneal)
        loss = out_["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {step + 1}; stopping without saving. "
                                     f"Try a lower --lr or --stabilisers on.")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        scaler.step(optimizer)
        scaler.update()
        # the code-replacing trick (A.3), stopped for the last 10% so the final codebook usage is honest
        replaced = 0
        if stabilise and args.replace_every and (step + 1) % args.replace_every == 0 and step < 0.9 * args.steps:
            replaced = sum(cb.replace_dead() for cb in model.codebooks)

        if (step + 1) % args.log_every == 0 or step == 0:
            logs = {k: round(v.item(), 5) for k, v in out_["logs"].items()}
            log(step + 1, loss=loss.item(), lr=lr, anneal=anneal, replaced=replaced, **logs)
            log.progress(step, 0, loss=loss.item(), **{k: v for k, v in logs.items() if k.startswith("recon")})
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps:
            metrics = validate(model, val_data, device, args.val_batches, args.batch_size)
            log(step + 1, **{k: round(v, 5) for k, v in metrics.items()})
            score = sum(v for k, v in metrics.items() if k.startswith("val_recon"))
            print("  val | " + " | ".join(f"{k[4:]} {v:.4g}" for k, v in metrics.items()), flush=True)
            ckpt = {"kind": "vae", "format_version": CKPT_VERSION, "args": vars(args), "model_args": model_args,
                    "model": model.state_dict(), "step": step + 1, "metrics": metrics, "vocab": model.vocab}
            save_checkpoint(out / "last.pt", ckpt)
            if score < best:
                best = score
                save_checkpoint(out / "best.pt", ckpt)
            with torch.no_grad():
                model.eval()
                rec = model(fixed)["recons"]
                model.train()
            pyramid = msf.image_pyramid(fixed, len(rec))
            save_rows_png(out / "recon.png", [r for pair in zip(pyramid, rec) for r in pair])
    print(f"done: {out / 'best.pt'} (val reconstruction {best:.4f}); reconstructions in {out / 'recon.png'}")
    return out


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (data.DatasetMissing, FloatingPointError) as e:
        sys.exit(str(e))


if __name__ == "__main__":
    main()
