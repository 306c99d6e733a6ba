"""Stage 1: train the VAE whose discrete representation guides object-centric learning (MSF by default).

Paper: "Multi-Scale Fusion for Object Representation" (Zhao et al., ICLR 2025), Sect. 3.2-3.3 and A.5
("Pretraining VAE": Adam, lr 2e-3, linear warmup over the first 1/20 of the steps then cosine annealing,
automatic mixed precision, gradient clipping at norm 1.0, 30,000 steps at batch 64).

Run:  python train_vae.py                                   # shapes, MSF, c = 256; ~2 min on a 2-core CPU
      python train_vae.py --code-dim 4                      # the guidance of the diffusion decoder
      python train_vae.py --vae vqvae                       # the single-scale baseline (4096 codes)
      python train_vae.py --dataset clevrtex --device cuda  # the paper's recipe (RECIPES)
      torchrun --nproc_per_node 4 train_vae.py --dataset coco   # 4 GPUs, --batch-size stays the global batch
      python train_vae.py --dataset coco --resume           # continue a killed run exactly (same flags)

Writes runs/vae_<dataset>_<vae>_c<code_dim>/: best.pt and last.pt (see `checkpoint`), metrics.jsonl (one JSON
object per log line and per validation), recon.png (inputs and reconstructions at every scale) and curves.png
(the loss and every validation metric against the step). train_ocl.py reads best.pt.

Reading order: RECIPES (what each dataset trains with), the schedules of A.5 (lr_at, anneal_at), `train` (the loop:
data, model, then per step lr -> forward -> loss -> update -> code replacing -> log, validate, checkpoint),
`describe`, `validate`, `checkpoint`, the arguments. The model is msf.build_vae (every --vae kind), its forward
returns the loss (vae.vae_forward: Eq. 1-5 and the VQ losses). What keeps a run alive for days (DDP, resume, stop
signals, the log) is train_common.py, called by name.
"""
import argparse
import sys

import torch
from torch.utils.data import DataLoader

import checkpoints
import data
import evaluate
import figures
import msf
import train_common
import vae

# -----------------------------------------------------------------------------
# The recipe of every dataset: defaults that explicit flags override (A.4-A.5 for the paper's datasets: 30,000 steps
# at batch 64, validation every 600 steps; `shapes` and `shapes_video` sized for a 2-core CPU). Video datasets train
# on frames: `clip_frames` consecutive frames of each of `batch` clips per step (the authors' MOVi recipe: 16 clips
# of 6 frames).
PAPER = dict(steps=30000, batch=64, val_every=600)
MOVI = dict(PAPER, batch=16, clip_frames=6)  # A.5: 16 clips per step; 6 frames each (A.4)
RECIPES = {
    "shapes": dict(steps=400, batch=16, val_every=100),  # ours: sized for a 2-core CPU
    "shapes_video": dict(steps=400, batch=8, val_every=100, clip_frames=2),  # ours: 8 clips x 2 frames per step
    "clevrtex": PAPER, "coco": PAPER, "voc": PAPER, "openimages": PAPER,
    "movi_c": MOVI, "movi_d": MOVI, "movi_e": MOVI,
}

# -----------------------------------------------------------------------------
# The schedules of A.5: functions of the step, so a resumed run needs to save none of them


def lr_at(step, steps, lr):
    """A.5: linear warmup over the first 1/20 of the steps, then half a cosine down to lr / 1000 (where the authors'
    code ends it; the paper does not say)."""
    return train_common.warmup_cosine(step, steps, lr, warmup=max(1, steps // 20), end=1e-3 * lr)  # authors: lr/1000


def anneal_at(step, steps):
    """GDR's annealing (A.3): the residual alpha and the Gumbel temperature tau, half a cosine from 1 to 0 over the
    first half of training, 0 after it (the decoder ends on pure codes, matching ends as Eq. 1)."""
    return train_common.cosine(step, steps // 2, 1.0, 0.0)


# -----------------------------------------------------------------------------
# Training


def train(args):
    """Train a stage-1 VAE as `args` (parse_args) says; returns the run folder (best.pt, last.pt, recon.png)."""
    train_common.seed_everything(args.seed)
    with train_common.distributed(args.device) as d:  # one process, or this process of a torchrun group
        device = d.device
        # model selection on `select`, a slice held out of the training split: the val split is only ever reported
        train_data = data.load_dataset(args.dataset, "train", args.data_root, args.resolution)
        val_data = data.load_dataset(args.dataset, "select", args.data_root, args.resolution)

        # the model: every kind of VAE comes from msf.build_vae, which the checkpoint can call again
        model_args = model_args_of(args)
        model = msf.build_vae(**model_args).to(device)
        # GDR's stabilisers (A.3): annealed residual, Gumbel matching and code replacing; the paper's baseline
        # VQ-VAE has none of them (--stabilisers on gives them to it)
        # EXERCISE: stabilisers (EXERCISES.md 10): --stabilisers off, then look at the codebook usage
        stabilise = args.stabilisers == "on" or (args.stabilisers == "auto" and args.vae != "vqvae")
        replacing = stabilise and args.replace_every > 0
        if not replacing:
            for cb in model.codebooks:
                cb.pool = 0  # no code replacing: no pool of recent vectors to keep (and no random draws for it)
        # each process's sample of recent vectors and code-use counts, fp32
        pools = d.world * sum((cb.pool * cb.weight.shape[1] + cb.weight.shape[0]) * 4 for cb in model.codebooks)
        out = checkpoints.prepare_out_dir(args.out, model, args.keep, args.resume, args.overwrite, d.main,
                                           checkpoints.checkpoint_bytes(model, model.parameters(), pools))
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")  # AMP on GPUs (A.5); a no-op on CPUs
        train_common.reseed_for_rank(args.seed, d)
        start, best, metrics = 0, float("inf"), {}  # best: the lowest summed validation reconstruction error
        if args.resume:  # weights, optimizer, RNG; the code-replacing pools are the VAE's own extra state
            start, best, metrics, state = checkpoints.resume(out, "vae", args, model_args, model, optimizer, scaler, d)
            for cb, pool in zip(model.codebooks, my_pools(state["pools"], d, [cb.pool for cb in model.codebooks])):
                cb.load_pool_state(pool)
        log = train_common.Log(out, args.steps, start, enabled=d.main)
        if d.main:
            print(describe(args, model, train_data, device, start))
            train_common.print_batch_rule(d, args.batch_size, args.lr)

        workers = train_common.default_workers(device) if args.workers is None else args.workers
        batches = train_common.infinite_batches(train_data, args.batch_size, args.seed, start, d.rank, d.world,
                                                workers, pin_memory=device.type == "cuda")
        if args.compile:  # the encoder and decoder; the quantizer's bookkeeping stays eager
            train_common.compile_model(model)
        ddp = train_common.wrap_ddp(model, d)  # DDP: gradients averaged over processes
        model.train()
        with train_common.RunGuard(d, scaler.is_enabled(), "Try a lower --lr or --stabilisers on.") as guard:
            for step in range(start, args.steps):
                lr = train_common.set_lr(optimizer, lr_at(step, args.steps, args.lr))  # warmup, then cosine (A.5)
                anneal = anneal_at(step, args.steps) if stabilise else 0.0  # residual alpha, Gumbel tau: 1 -> 0
                # videos: which frames of each clip, a function of the step (so a resumed run draws the same)
                slices = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1_009)  # for the global batch
                image = data.video_frames(next(batches)["image"], args.clip_frames, slices, d.rank, d.world)  # (b, 3, H, W)
                if args.augment:  # authors: random crop and flip (--augment)
                    image, _ = train_common.augment(image, None, args.seed, step, d.rank, d.world)
                image = image.to(device, non_blocking=True)  # this process's share of the global batch

                with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                    result = ddp(image, tau=anneal, alpha=anneal)  # pyramid, Eq. 1-5, decoder, losses
                loss = result["loss"]  # reconstruction at every scale + codebook + commitment terms
                stopping = guard.check(loss, step)  # non-finite loss, stop signal
                train_common.optimizer_step(loss, optimizer, scaler, model.parameters(), args.clip)
                if model.weight is not None:  # ours: W of Eq. 3/5 back to orthonormal columns after every step,
                    vae.retract_(model.weight)  # so its raw scale cannot drift (vae.orthonormal; same model)
                # the code-replacing trick (A.3), stopped for the last 10% so the final codebook usage is honest
                replaced = 0
                if replacing and (step + 1) % args.replace_every == 0 and step < 0.9 * args.steps:
                    for cb in model.codebooks:
                        moved = cb.replace_dead()  # (k,) codes re-seeded on recent data
                        forget_adam_rows(optimizer, cb.weight, moved)  # ours: a new code, not the old one's momentum
                        replaced += len(moved)

                if (step + 1) % args.log_every == 0 or step == 0:
                    logs = {k: round(v.item(), 5) for k, v in result["logs"].items()}  # recon<n>, codebook, commit
                    shown = train_common.rank_mean(loss, d)  # over every process's share of the batch
                    log(step + 1, loss=shown, lr=lr, anneal=anneal, replaced=replaced, **logs)
                    log.progress(step, loss=shown, **{k: v for k, v in logs.items() if k.startswith("recon")})
                validating = (step + 1) % args.val_every == 0 or step + 1 == args.steps
                if validating or stopping or (step + 1) % args.ckpt_every == 0:  # about to write: weights sane?
                    train_common.check_weights(model, d, step, lambda: model(image)["loss"])
                if validating and d.main:  # process 0 alone validates and writes
                    metrics, score = validate(model, val_data, args, device, out, step, log)
                    if score < best:
                        best = score
                        best_ckpt = checkpoint(args, model_args, model, step, metrics)
                        checkpoints.save_checkpoint(out / "best.pt", best_ckpt)
                if validating or stopping or (step + 1) % args.ckpt_every == 0:  # last: after everything of this step
                    checkpoints.save_last(out, checkpoint(args, model_args, model, step, metrics), optimizer, scaler,
                                           best, d, args.keep,
                                           pools=train_common.gather_objects([cb.pool_state() for cb in model.codebooks], d))
                if stopping:
                    raise guard.stopped(step, out)
        if d.main:
            print(f"done: {out / 'best.pt'} (val reconstruction {best:.4f}); reconstructions in {out / 'recon.png'}")
    return out


def my_pools(saved, d, sizes):
    """This process's code-replacing state from last.pt's `pools` ([process][codebook]). With as many processes as
    saved: its own. With another count (--allow-world-change), process 0, which alone decides which codes are dead and
    where they move (vae.Codebook.replace_dead), takes the counts of all saved processes summed and one sample merged
    from theirs (merge_pool: a uniform sample of everything they saw); the others start empty."""
    if len(saved) == d.world:
        return saved[d.rank]
    if d.rank > 0:
        return [{"recent": p["recent"][:0], "seen": 0, "hits": torch.zeros_like(p["hits"])} for p in saved[0]]
    return [merge_pool([q[j] for q in saved], size) for j, size in enumerate(sizes)]


def merge_pool(pools, size):
    """One reservoir sample of `size` vectors from several: each process's sample stands for the `seen` vectors it
    drew from, so it gives a share of the merged sample in proportion to `seen` (largest remainders; its vectors
    chosen by a generator seeded with the total, so the same merge every time). The counts add up."""
    seen = [p["seen"] for p in pools]
    total = sum(seen)
    take = min(size, total, sum(len(p["recent"]) for p in pools))
    exact = [take * s / max(total, 1) for s in seen]
    counts = [min(int(e), len(p["recent"])) for e, p in zip(exact, pools)]
    for i in sorted(range(len(pools)), key=lambda i: int(exact[i]) - exact[i]):  # largest remainders first
        if sum(counts) < take and counts[i] < len(pools[i]["recent"]):
            counts[i] += 1
    g = torch.Generator().manual_seed(total)
    recent = torch.cat([p["recent"][torch.randperm(len(p["recent"]), generator=g)[:k]] for p, k in zip(pools, counts)])
    return {"recent": recent, "seen": total, "hits": sum(p["hits"] for p in pools)}


def model_args_of(args):
    """The flags that define the VAE, as msf.build_vae takes them (and the checkpoint stores them)."""
    return dict(kind=args.vae, code_dim=args.code_dim, channels=args.channels, scales=args.scales, fusion=args.fusion,
                inter=not args.no_inter, intra=not args.no_intra, sv_shared=args.sv_shared, num_codes=args.num_codes,
                **({"pyramid": args.pyramid} if args.vae in ("msf", "multiscale") else {}))


def forget_adam_rows(optimizer, param, rows):
    """Zero Adam's two moments of `rows` of `param` (the codes code replacing just moved), so each new code starts
    as a fresh parameter instead of carrying the momentum of the dead code it replaces."""
    state = optimizer.state.get(param, {})
    if len(rows) and "exp_avg" in state:
        state["exp_avg"][rows] = 0
        state["exp_avg_sq"][rows] = 0


def describe(args, model, train_data, device, start):
    """The run's first line: what trains on what, for how long, where."""
    video = train_data[0]["image"].dim() == 4
    return (f"VAE {args.vae} c={args.code_dim} N={getattr(model, 'num_scales', 1)} | "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
            f"{vae.count_codebook_params(model):,} codebook-related | {args.dataset} {args.resolution}px, "
            f"{len(train_data)} train samples | {args.steps} steps x batch {args.batch_size}"
            + (f" clips x {args.clip_frames} frames" if video else "") + f" on {device}"
            + (f" | resumed at step {start}" if start else ""))


def validate(model, val_data, args, device, out, step, log):
    """Validation on process 0: evaluate.validate_vae on the first --val-batches batches (reconstruction MSE per
    scale, codebook usage), logged and printed, recon.png (rows: input and reconstruction at each scale) and
    curves.png (figures.curves: the loss and every validation metric so far).
    Returns the metrics and the score best.pt follows: the reconstruction MSE summed over scales (lower is better)."""
    metrics = evaluate.validate_vae(model, val_data, device, args.batch_size, args.val_batches)
    metrics = {f"val_{k}": v for k, v in metrics.items()}  # val_recon1, val_perplexity1_0, ...
    log(step + 1, **{k: round(v, 5) for k, v in metrics.items()})
    print("  val | " + " | ".join(f"{k[4:]} {v:.4g}" for k, v in metrics.items()), flush=True)
    # recon.png: the same 8 validation images every time, so the figures of a run can be compared
    # (a private generator: drawing them leaves the training's random stream untouched)
    fixed = next(iter(DataLoader(val_data, 8, generator=torch.Generator())))["image"]  # (8, 3, H, W)
    fixed = (fixed[:, 0] if fixed.dim() == 5 else fixed).to(device)  # videos (8, T, 3, H, W): first frames
    with torch.no_grad():
        model.eval()  # no Gumbel noise, no code-use counting
        recons = model(fixed)["recons"]  # per scale (8, 3, H_n, W_n)
        model.train()
    pyramid = msf.image_pyramid(fixed, len(recons), getattr(model, "pyramid", "halve"))  # the inputs each scale saw
    labels = [f"scale {n}: {what}" for n in range(1, len(recons) + 1) for what in ("input", "reconstruction")]
    figures.save_rows_png(out / "recon.png", [r for pair in zip(pyramid, recons) for r in pair], labels=labels)
    figures.curves(out / "metrics.jsonl", out / "curves.png")
    return metrics, sum(v for k, v in metrics.items() if k.startswith("val_recon"))


def checkpoint(args, model_args, model, step, metrics):
    """What best.pt holds: a plain dict that msf.load_vae rebuilds the model from (model_args + weights), with the
    run's flags, its step and validation metrics, and the vocabulary of each index group (the transformer decoder's
    classes). last.pt adds "train_state" (optimizer, scaler, RNG, code-replacing pools: checkpoints.save_last)."""
    return {"kind": "vae", "format_version": checkpoints.CKPT_VERSION, "args": vars(args), "model_args": model_args,
            "model": model.state_dict(), "step": step + 1, "metrics": metrics, "vocab": model.vocab}


# -----------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = data.ArgumentParser(description="Stage 1: train an MSF (or baseline) VQ-VAE.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="shapes", help=f"one of {', '.join(RECIPES)}")
    p.add_argument("--data-root", default="data", help="folder holding the LMDB datasets")
    p.add_argument("--resolution", type=data.number(int, 4), default=None,
                   help="image side (default: the dataset's; shapes: 64, the paper's datasets: 128)")
    p.add_argument("--vae", default="msf", choices=["msf", "vqvae", "gdr", "multiscale"],
                   help="msf: Sect. 3.3; vqvae: single scale, 4096 codes; gdr: 2 groups x 64 codes; "
                        "multiscale: pyramid + one shared codebook (Sect. 3.2)")
    # the VAE (A.3): which kind, its width, and the pyramid
    p.add_argument("--code-dim", type=data.number(int, 1), default=256,
                   help="c: 256 guides the transformer decoder, 4 the diffusion decoder")
    p.add_argument("--scales", type=data.number(int, 1), default=None,
                   help="N, number of pyramid scales (msf, multiscale; default 3)")
    p.add_argument("--pyramid", default="halve", choices=["halve", "direct"],
                   help="msf, multiscale: how the pyramid's levels are made: halve, each from the one before (a box "
                        "average, ours); direct, the image resized by 2^-(n-1) without antialiasing (the authors' code)")
    p.add_argument("--channels", type=data.number(int, 16), default=64,
                   help="width of the VAE encoder/decoder CNN, a multiple of 16 (its group norms)")
    p.add_argument("--num-codes", type=data.number(int, 4), default=4096,
                   help="vocabulary: codes, or combinations of grouped codes")
    # ablations of Tab. 5-6 (--vae msf only; a combination that means nothing stops with a message)
    p.add_argument("--no-inter", action="store_true", help="ablation: disable inter-scale fusion (Tab. 5)")
    p.add_argument("--no-intra", action="store_true",
                   help="ablation: disable intra-scale fusion (Tab. 5): no W and no scale-variant codebooks, so the "
                        "shared codebook becomes one of --num-codes (4096) codes instead of 64")
    p.add_argument("--sv-shared", action="store_true",
                   help="ablation: one scale-variant codebook for all scales (Tab. 5; needs intra-scale fusion)")
    p.add_argument("--fusion", default="msf", choices=["msf", "concat", "sum"],
                   help="Tab. 6: our fusion, or channel-concat / element-wise-sum of continuous scales (one shared "
                        "4096-code codebook; the inter/intra/sv flags do not apply)")
    # optimisation (A.5)
    p.add_argument("--steps", type=data.number(int, 1), default=None,
                   help="training steps (default: the dataset's recipe; paper 30000)")
    p.add_argument("--batch-size", type=data.number(int, 1), default=None, help="default: the dataset's recipe (paper 64)")
    p.add_argument("--lr", type=data.number(float, above=0), default=2e-3, help="Adam learning rate (paper 2e-3)")
    p.add_argument("--clip", type=data.number(float, above=0), default=1.0, help="gradient clipping norm (paper 1.0)")
    p.add_argument("--clip-frames", type=data.number(int, 1), default=None,
                   help="video datasets: consecutive frames taken from each clip per step (default: the dataset's recipe; "
                        "authors: 6; shapes_video: 2, so that a CPU-sized batch holds 8 scenes); a batch is "
                        "--batch-size clips x this many frames")
    p.add_argument("--augment", action="store_true",
                   help="the authors' training augmentation: random crop (75-100%% of the area) resized back, and "
                        "horizontal flip (the paper names none)")
    # GDR's stabilisers (A.3), which the MSF VAE inherits from its base
    p.add_argument("--stabilisers", default="auto", choices=["auto", "on", "off"],
                   help="GDR's annealed residual + Gumbel matching + code replacing; auto = on for gdr/msf/multiscale")
    p.add_argument("--replace-every", type=data.number(int, 0), default=20,
                   help="code-replacing trick period in steps (0 = never)")
    # seeds, devices, logging, checkpoints and resume: the same flags as train_ocl.py
    train_common.add_run_args(p, val_default="the recipe's: 600 (A.5), shapes 100; steps/4 with other --steps")
    p.add_argument("--out", default=None, help="run folder (default runs/vae_<dataset>_<vae>_c<code-dim>)")
    args = p.parse_args(argv)

    # the dataset's recipe first (steps, batch), then the checks that need the final values
    recipe = train_common.apply_recipe(p, args, RECIPES, val_parts=4)
    args.clip_frames = recipe.get("clip_frames", 6) if args.clip_frames is None else args.clip_frames
    args.resolution = args.resolution or data.DATASETS[args.dataset]["resolution"]
    check_ablation_flags(p, args)
    if args.scales is None:  # single-scale baselines: no pyramid; the others: N = 3 (A.3)
        args.scales = 1 if args.vae in ("vqvae", "gdr") else 3
    factor = 4 * 2 ** (args.scales - 1)  # 4x VAE down-sampling at the coarsest of N halvings
    if args.channels % 16:
        p.error(f"--channels {args.channels}: the VAE's group norms need a multiple of 16 (e.g. 16, 32, 64)")
    if args.resolution % factor:
        p.error(f"--resolution {args.resolution} is not divisible by 4 * 2^(N-1) = {factor} for --scales {args.scales}; "
                f"use a multiple of {factor} or fewer scales")
    grouped = args.vae == "gdr" or (args.vae == "msf" and args.fusion == "msf" and not args.no_intra)
    if grouped and round(args.num_codes ** 0.5) ** 2 != args.num_codes:  # 2 groups of sqrt(m) codes each
        p.error(f"--num-codes {args.num_codes}: {args.vae} splits the vocabulary into 2 codebooks of sqrt(m) codes, "
                f"so it must be a square (4096 = 64 x 64)")
    if args.out is None:  # train_ocl.py looks for its guidance here (runs/vae_<dataset>_msf_c256 or _c4)
        args.out = f"runs/vae_{args.dataset}_{msf.vae_name(model_args_of(args))}{'-aug' * args.augment}_c{args.code_dim}"
    return args


def check_ablation_flags(p, args):
    """Tab. 5-6 ablations exist for --vae msf only, and not in every combination: say so instead of ignoring a flag."""
    flags = [f for f, on in (("--no-inter", args.no_inter), ("--no-intra", args.no_intra),
                             ("--sv-shared", args.sv_shared), (f"--fusion {args.fusion}", args.fusion != "msf")) if on]
    if args.vae != "msf" and flags:
        p.error(f"{' '.join(flags)}: the ablations of Tab. 5-6 change the MSF VAE; --vae {args.vae} has no "
                f"{'fusion' if args.vae == 'multiscale' else 'pyramid'} to change. Use --vae msf")
    if args.fusion != "msf" and len(flags) > 1:
        p.error(f"--fusion {args.fusion} replaces inter/intra-scale fusion by mixing continuous scales (Tab. 6), so "
                f"{' '.join(flags[:-1])} has nothing to switch off; give one of them")
    if args.sv_shared and args.no_intra:
        p.error("--sv-shared shares the scale-variant codebooks, which --no-intra removes; give one of them")
    if args.vae in ("vqvae", "gdr") and args.scales not in (None, 1):
        p.error(f"--vae {args.vae} is single-scale; --scales {args.scales} needs --vae msf or multiscale")


def main(argv=None):
    """The command line: parse, train, and turn the errors a user can fix into one-line messages."""
    args = parse_args(argv)
    try:
        train(args)
    except (data.DatasetMissing, FloatingPointError, train_common.RunError, train_common.TrainingStopped,
            ValueError) as e:
        sys.exit(str(e))  # a problem the user can fix: the message, without a traceback
    train_common.exit_worker()  # a torchrun worker leaves here, past the teardown where gloo can abort it


if __name__ == "__main__":
    main()
