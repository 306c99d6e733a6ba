"""Stage 2: object-centric learning guided by the frozen (MSF) VAE: Slot Attention + a transformer (SLATE),
diffusion (SlotDiffusion) or MLP (DINOSAUR) decoder.

Paper: "Multi-Scale Fusion for Object Representation" (Zhao et al., ICLR 2025), Sect. 3.1 (OCL with VAE guidance),
Sect. 3.2 ("During OCL training, only scale n = 1 is used as guidance"), Tab. 5 lower right (guide scales),
A.3-A.5 ("Training the OCL Model": Adam, lr 2e-4, warmup over the first 1/20 then cosine annealing, AMP, gradient
clipping at 1.0, 50,000 steps at batch 32; the VAE is frozen; sigma of the query init anneals 1 -> 0).

Run:  python train_ocl.py                                    # shapes, SLATE + MSF, CPU-sized (see the README)
      python train_ocl.py --decoder diffusion                # SlotDiffusion + MSF (needs a c = 4 VAE)
      python train_ocl.py --decoder mlp                      # DINOSAUR-style reference
      python train_ocl.py --dataset coco --decoder diffusion --device cuda   # paper recipe (preset)
      torchrun --nproc_per_node 4 train_ocl.py --dataset coco --decoder diffusion   # 4 GPUs, same global batch
      python train_ocl.py --dataset coco --decoder diffusion --resume        # continue a killed run exactly

Reads the VAE written by train_vae.py (runs/vae_<dataset>_msf_c256/best.pt for the transformer and mlp decoders,
..._c4 for diffusion, or --vae-ckpt). Writes runs/ocl_<dataset>_<decoder>_<vae kind>/: best.pt (by validation
ARI + ARIfg), last.pt, metrics.jsonl, masks.png. A checkpoint embeds its VAE, so `python evaluate.py --ckpt
runs/.../best.pt` needs nothing else.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import decoders
import evaluate
import msf
import train_vae
from slot_attention import CNNEncoder, GaussianQueries, SlotAttention

# Model sizes: "paper" follows the authors' settings (official-spec sect. 4-5), "cpu" shrinks every width so that
# the built-in dataset trains on a 2-core CPU. Explicit flags override either. The CPU size attends over a 32x32 grid
# (enc_stride 2: +5.5 ARIfg over 16x16 on shapes) and pays for it with a 1-layer decoder (README, "How the CPU quick
# start was tuned"); the paper size attends at full resolution like the authors' naive CNN branch.
SIZES = {
    "cpu": dict(slot_dim=64, enc_channels=64, enc_stride=2, dec_dim=64, dec_layers=1, dec_heads=4,
                unet_base=32, unet_layers=1, mlp_hidden=256),
    "paper": dict(slot_dim=256, enc_channels=64, enc_stride=1, dec_dim=256, dec_layers=4, dec_heads=4,
                  unet_base=128, unet_layers=2, mlp_hidden=2048),
}
CODE_DIM = {"transformer": 256, "diffusion": 4}  # the guidance each decoder is designed for (A.3); mlp takes any

# -----------------------------------------------------------------------------
# The model


class OCL(nn.Module):
    """Frozen VAE guidance + primary encoder + Gaussian queries + Slot Attention + one primary decoder."""

    def __init__(self, vae, decoder, num_slots, resolution, guide_scales=(1,), slot_dim=128, enc_channels=64,
                 enc_stride=4, iters=3, bilevel=False, dec_dim=128, dec_layers=2, dec_heads=4, unet_base=32, unet_layers=1,
                 mlp_hidden=256):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)  # frozen: never trained, never in train mode
        self.decoder_kind, self.guide_scales = decoder, list(guide_scales)
        code_dim = vae.code_dim
        self.encoder = CNNEncoder(slot_dim, enc_channels, enc_stride)  # EXERCISE: the DINO big-little encoder goes here
        self.queries = GaussianQueries(num_slots, slot_dim)
        self.slot_attention = SlotAttention(slot_dim, slot_dim, iters, bilevel=bilevel)
        token = resolution // 4  # the VAE's scale-1 token grid (4x down-sampling)
        if decoder == "transformer":
            grids = [(token // 2 ** (n - 1),) * 2 for n in self.guide_scales]
            self.decoder = decoders.TransformerDecoder(code_dim, vae.vocab, grids, slot_dim, dec_dim, dec_layers, dec_heads)
        elif decoder == "diffusion":
            self.decoder = decoders.DiffusionDecoder(code_dim, slot_dim, base=unet_base, layers=unet_layers,
                                                     heads=max(1, unet_base // 16) if unet_base < 128 else 8)
        elif decoder == "mlp":
            self.decoder = decoders.MLPDecoder(slot_dim, code_dim, token * token, hidden=mlp_hidden)
        else:
            raise ValueError(f"unknown --decoder '{decoder}'; choose transformer, diffusion or mlp")

    def train(self, mode=True):
        super().train(mode)
        self.vae.eval()  # model.train() must not wake the frozen VAE (code replacement, Gumbel sampling)
        return self

    @torch.no_grad()
    def guide(self, image):
        """The frozen VAE's guidance at the guide scales: indices and X, lists over self.guide_scales."""
        indices, xs = self.vae.guidance(image)  # per VAE scale: (b, g, h_n, w_n), (b, c, h_n, w_n)
        return [indices[n - 1] for n in self.guide_scales], [xs[n - 1] for n in self.guide_scales]

    def forward(self, image, sigma=0.0, indices=None):
        """image (b, 3, H, W) -> dict(loss, masks (b, s, h, w), slots (b, s, d)). `indices`: the guidance indices
        if already known (GuidanceCache); X is then rebuilt from them instead of running the VAE."""
        b = image.shape[0]
        with torch.no_grad():
            if self.decoder_kind == "mlp":  # DINOSAUR reconstructs frozen features: the VAE encoder's Z_1
                target = self.vae.encoder(image)  # (b, c, h, w), continuous, frozen: the model cannot move it
            elif indices is None:
                indices, xs = self.guide(image)
            else:
                xs = [self.vae.x_from_indices(i, n) for i, n in zip(indices, self.guide_scales)]
        features, grid = self.encoder(image)  # (b, n, d), (h, w)
        slots, attn = self.slot_attention(self.queries(b, sigma), features)  # (b, s, d), (b, s, n)
        masks = attn.view(b, -1, *grid)  # (b, s, h, w)
        if self.decoder_kind == "transformer":
            loss = self.decoder.loss(self.decoder(xs, slots), indices)
        elif self.decoder_kind == "diffusion":
            loss = self.decoder.loss(xs[0], slots)
        else:
            recon, masks = self.decoder(slots, target.shape[-2:])  # masks from the decoder's alpha (b, s, h, w)
            loss = F.mse_loss(recon, target.flatten(2).transpose(1, 2))
        return {"loss": loss, "masks": masks, "slots": slots}


class GuidanceCache:
    """The frozen VAE is deterministic (eval mode) and training images are not augmented (paper A.4), so the code
    indices of a training image never change: compute them the first time the image is seen and reuse them (int16,
    ~0.5 KB per image) afterwards; the model rebuilds X from them (vae.x_from_indices). On a CPU the VAE forward
    was ~30% of a step. Results are identical with and without the cache (--no-cache)."""

    def __init__(self):
        self.store = {}  # dataset index -> list over guide scales of (g, h, w) int16

    def __call__(self, model, image, index):
        index = [int(i) for i in index]
        missing = [j for j, i in enumerate(index) if i not in self.store]
        if missing:
            indices, _ = model.guide(image[missing])
            for k, j in enumerate(missing):
                self.store[index[j]] = [t[k].to(torch.int16).cpu() for t in indices]
        return [torch.stack([self.store[i][s] for i in index]).long().to(image.device)
                for s in range(len(model.guide_scales))]  # per guide scale (b, g, h, w)


def build_ocl(vae_ckpt, model_args):
    """Rebuild an OCL model: the VAE from its checkpoint dict, the rest from model_args."""
    vae, _ = train_vae.load_vae(vae_ckpt)
    return OCL(vae, **model_args)


def load_ocl(path_or_ckpt, device="cpu"):
    """(model in eval mode, checkpoint dict) from an OCL checkpoint; it carries its VAE."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else train_vae.load_checkpoint(path_or_ckpt, "ocl")
    vae_part = {"kind": "vae", "model_args": ckpt["vae"]["model_args"],
                "model": {k[4:]: v for k, v in ckpt["model"].items() if k.startswith("vae.")}}
    model = build_ocl(vae_part, ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


# -----------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stage 2: Slot Attention OCL guided by a frozen (MSF) VAE.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="shapes", help=f"one of {', '.join(data.PRESETS)}")
    p.add_argument("--data-root", default="data", help="folder holding the LMDB datasets")
    p.add_argument("--decoder", default="transformer", choices=["transformer", "diffusion", "mlp"],
                   help="transformer = SLATE, diffusion = SlotDiffusion, mlp = DINOSAUR-style")
    p.add_argument("--vae-ckpt", default=None, help="stage-1 checkpoint (default: train_vae.py's path for the dataset, msf, "
                                                    "c = 256 for transformer/mlp, c = 4 for diffusion)")
    p.add_argument("--slots", type=int, default=None, help="number of slots (default: dataset preset)")
    p.add_argument("--guide-scales", default="1", choices=["1", "1,2", "2"], help="VAE scales used as guidance (Tab. 5)")
    p.add_argument("--size", default=None, choices=list(SIZES), help="model widths (default: cpu for shapes, paper otherwise)")
    for name, kind in [("slot-dim", int), ("enc-channels", int), ("enc-stride", int), ("dec-dim", int),
                       ("dec-layers", int), ("dec-heads", int), ("unet-base", int), ("unet-layers", int), ("mlp-hidden", int)]:
        p.add_argument(f"--{name}", type=kind, default=None, help=f"override the --size value of {name.replace('-', '_')}")
    p.add_argument("--iters", type=int, default=3, help="Slot Attention iterations")
    p.add_argument("--bilevel", action="store_true",
                   help="BO-QSA's truncated gradient (the authors' code): backpropagate through the last iteration only")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: dataset preset; paper 50000)")
    p.add_argument("--batch-size", type=int, default=None, help="default: dataset preset (paper 32)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default: dataset preset; paper 2e-4, shapes 2e-3 for its short CPU schedule)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm (paper 1.0 for images)")
    p.add_argument("--sigma", type=float, default=1.0, help="start of the query-init sigma, cosine-annealed to 0 (A.5)")
    p.add_argument("--no-cache", action="store_true", help="run the frozen VAE every step instead of caching its indices")
    train_vae.add_run_args(p, val_default="steps/10")
    p.add_argument("--out", default=None, help="run folder (default runs/ocl_<dataset>_<decoder>_<vae kind>)")
    args = p.parse_args(argv)
    preset = train_vae.apply_preset(p, args, "ocl", val_parts=10)
    if preset["video"]:
        p.error(f"{args.dataset} is a video dataset, and video OCL (STEVE: slots carried from frame to frame by a "
                f"transition transformer, bounding-box queries) is not implemented yet (README, 'Status'). Its stage 1 "
                f"works: python train_vae.py --dataset {args.dataset}")
    args.slots = args.slots or preset["num_slots"]
    args.lr = args.lr or preset["ocl_lr"]
    args.size = args.size or ("cpu" if args.dataset == "shapes" else "paper")
    for key, value in SIZES[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.decoder != "transformer" and args.guide_scales != "1":
        p.error(f"--guide-scales {args.guide_scales} needs the transformer decoder (the others decode one grid)")
    if args.vae_ckpt is None:
        code_dim = 4 if args.decoder == "diffusion" else 256
        args.vae_ckpt = str(Path(train_vae.default_vae_dir(args.dataset, "msf", code_dim)) / "best.pt")
    if args.out is None:
        args.out = f"runs/ocl_{args.dataset}_{args.decoder}_msf"
    return args


def load_frozen_vae(args):
    """The stage-1 VAE for this run, with every mismatch named."""
    path = Path(args.vae_ckpt)
    if not path.exists():
        code = "4" if args.decoder == "diffusion" else "256"
        raise FileNotFoundError(f"no VAE checkpoint at {path}. Train it first:\n"
                                f"    python train_vae.py --dataset {args.dataset} --code-dim {code}")
    ckpt = train_vae.load_checkpoint(path, "vae")
    c = ckpt["model_args"]["code_dim"]
    if args.decoder in CODE_DIM and c != CODE_DIM[args.decoder]:
        raise ValueError(f"the {args.decoder} decoder needs c = {CODE_DIM[args.decoder]} guidance, but {path} is a c = {c} VAE; "
                         f"train one with: python train_vae.py --dataset {args.dataset} --code-dim {CODE_DIM[args.decoder]}")
    if ckpt["args"]["dataset"] != args.dataset:
        raise ValueError(f"{path} was trained on '{ckpt['args']['dataset']}', not on '{args.dataset}'")
    scales = [int(n) for n in args.guide_scales.split(",")]
    if max(scales) > ckpt["model_args"]["scales"] or (max(scales) > 1 and ckpt["model_args"]["kind"] in ("vqvae", "gdr")):
        raise ValueError(f"--guide-scales {args.guide_scales} needs a multi-scale VAE with at least {max(scales)} scales; "
                         f"{path} is {ckpt['model_args']['kind']} with N = {ckpt['model_args']['scales']}")
    return ckpt


# -----------------------------------------------------------------------------
# Validation: masks -> labels at the ground-truth resolution -> ARI, ARIfg, mIoU, mBO (evaluate.py)


@torch.no_grad()
def validate(model, dataset, device, batch_size, max_batches=0, size_split=True):
    """Per-sample metric values over the first max_batches batches (0 = all), and the last batch's outputs.
    Datasets that store object areas (COCO, Open Images) add the size split of Tab. 7 (`size_split`)."""
    model.eval()
    values = {k: [] for k in ("ari", "ari_fg", "miou", "mbo")}
    loader = torch.utils.data.DataLoader(dataset, batch_size, shuffle=False)
    last = None
    for i, batch in enumerate(loader):
        if max_batches and i == max_batches:
            break
        image, segment = batch["image"].to(device), batch["segment"]
        out = model(image)
        pred = evaluate.masks_to_labels(out["masks"], segment.shape[-2:]).cpu()  # (b, H, W)
        for k, v in evaluate.all_metrics(pred, segment).items():
            values[k].append(v)
        if "areas" in batch and size_split:  # areas[:, k-1] = original area of object k
            for k, v in evaluate.miou_by_size(pred, segment, batch["areas"]).items():
                values.setdefault(f"miou_{k}", []).append(v)
        last = (image, segment, pred, out["masks"])
    model.train()
    return {k: torch.cat(v) for k, v in values.items()}, last


def summary(values):
    return {k: evaluate.mean_and_count(v) for k, v in values.items()}


# -----------------------------------------------------------------------------
# Training


def train(args):
    train_vae.seed_everything(args.seed)
    d = train_vae.setup_distributed(args.device)  # one process, or this process of a torchrun group
    try:
        return _train(args, d)
    finally:
        train_vae.cleanup_distributed(d)


def _train(args, d):
    device = d.device
    train_data = data.load_dataset(args.dataset, "train", args.data_root)  # missing data is named before the VAE
    val_data = data.load_dataset(args.dataset, "val", args.data_root)
    vae_ckpt = load_frozen_vae(args)
    resolution = vae_ckpt["args"]["resolution"]
    if train_data.meta["resolution"] != resolution:
        raise ValueError(f"the VAE was trained at {resolution}px but the dataset holds {train_data.meta['resolution']}px images")
    model_args = dict(decoder=args.decoder, num_slots=args.slots, resolution=resolution,
                      guide_scales=[int(n) for n in args.guide_scales.split(",")], slot_dim=args.slot_dim,
                      enc_channels=args.enc_channels, enc_stride=args.enc_stride, iters=args.iters, bilevel=args.bilevel,
                      dec_dim=args.dec_dim, dec_layers=args.dec_layers, dec_heads=args.dec_heads,
                      unet_base=args.unet_base, unet_layers=args.unet_layers, mlp_hidden=args.mlp_hidden)
    model = build_ocl(vae_ckpt, model_args).to(device)
    model.train()
    out = train_vae.prepare_out_dir(args.out, model, args.keep, args.resume, args.overwrite, d.main)
    params = [p for p in model.parameters() if p.requires_grad]  # everything but the frozen VAE
    optimizer = torch.optim.Adam(params, lr=args.lr)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    train_vae.reseed_for_rank(args.seed, d)
    start, best, metrics = 0, -float("inf"), {}
    if args.resume:  # everything the next step depends on; the data order and schedules are functions of the step
        ckpt = train_vae.load_for_resume(out, "ocl", args, model_args, extra={"vae": vae_ckpt["model_args"]})
        ts = ckpt["train_state"]
        model.load_state_dict(ckpt["model"])  # includes the VAE the run started with
        optimizer.load_state_dict(ts["optimizer"])
        scaler.load_state_dict(ts["scaler"])
        train_vae.set_rng_state(ts["rng"], d)
        start, best, metrics = ckpt["step"], ts["best"], ckpt["metrics"]
    log = train_vae.Log(out, args.steps, start, enabled=d.main)
    workers = train_vae.default_workers(device) if args.workers is None else args.workers
    if d.main:
        print(f"OCL {args.decoder} + frozen {vae_ckpt['model_args']['kind']} VAE ({args.vae_ckpt}) | "
              f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters | {args.slots} slots | "
              f"{args.dataset} {resolution}px | {args.steps} steps x batch {args.batch_size} on {device}"
              + (f" | resumed at step {start}" if start else ""))
    train_vae.print_batch_rule(d, args.batch_size, args.lr)

    batches = train_vae.infinite_batches(train_data, args.batch_size, args.seed, start, d.rank, d.world, workers,
                                         device.type == "cuda")
    ddp = train_vae.wrap_ddp(model, d)
    cache = None if args.no_cache or args.decoder == "mlp" else GuidanceCache()
    stop = train_vae.StopSignal()
    try:
        for step in range(start, args.steps):
            lr = train_vae.lr_at(step, args.steps, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sigma = train_vae.cosine_decay(step, args.steps, args.sigma, 0.0)  # A.5: 1 -> 0 over training
            batch = next(batches)
            image = batch["image"].to(device, non_blocking=True)  # (b, 3, H, W), this process's share
            indices = cache(model, image, batch["index"]) if cache else None
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = ddp(image, sigma, indices)["loss"]
            bad, stopping = train_vae.step_flags(loss, stop, d)
            if bad:
                raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {step + 1}; stopping without saving. "
                                         f"Try a lower --lr.")
            train_vae.optimizer_step(loss, optimizer, scaler, params, args.clip)

            if (step + 1) % args.log_every == 0 or step == 0:
                log(step + 1, loss=loss.item(), lr=lr, sigma=sigma)
                log.progress(step, loss=loss.item(), sigma=sigma)
            validating = (step + 1) % args.val_every == 0 or step + 1 == args.steps
            if validating and d.main:
                values, last = validate(model, val_data, device, args.batch_size, args.val_batches)
                metrics = {k: m for k, (m, _) in summary(values).items()}
                log(step + 1, **{f"val_{k}": round(v, 5) for k, v in metrics.items()})
                print("  val | " + " | ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()), flush=True)
                score = metrics["ari"] + metrics["ari_fg"]
                if score > best or best == -float("inf"):
                    best = score
                    train_vae.save_checkpoint(out / "best.pt", checkpoint(args, model_args, model, step, metrics, vae_ckpt))
                image, segment, pred, masks = last
                n = min(8, len(image))
                up = F.interpolate(masks[:n].float(), size=segment.shape[-2:], mode="bilinear", align_corners=False)
                evaluate.fig2(out / "masks.png", image[:n], segment[:n], pred[:n], up)
            if validating or stopping or (step + 1) % args.ckpt_every == 0:  # last: after everything of this step
                ckpt = checkpoint(args, model_args, model, step, metrics, vae_ckpt)
                ckpt["train_state"] = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "best": best,
                                       "rng": train_vae.rng_state(d)}
                if d.main:
                    train_vae.save_train_checkpoint(out, ckpt, args.keep)
            if stopping:
                raise train_vae.TrainingStopped(f"stopped by {stop.received} after step {step + 1}; {out / 'last.pt'} "
                                                f"holds it. Continue with the same command plus --resume")
    finally:
        stop.close()
    if d.main:
        print(f"done: {out / 'best.pt'} (validation ARI + ARIfg {100 * best:.2f}); masks in {out / 'masks.png'}")
    return out


def checkpoint(args, model_args, model, step, metrics, vae_ckpt):
    """What best.pt holds (it embeds the VAE: weights in "model", arguments in "vae"); last.pt adds "train_state"."""
    return {"kind": "ocl", "format_version": train_vae.CKPT_VERSION, "args": vars(args), "model_args": model_args,
            "model": model.state_dict(), "step": step + 1, "metrics": metrics,
            "vae": {"model_args": vae_ckpt["model_args"], "args": vae_ckpt["args"]}}


# -----------------------------------------------------------------------------
# Evaluation of a checkpoint (called by evaluate.py's CLI)


@torch.no_grad()
def evaluate_checkpoint(ckpt, args, device):
    """Score an OCL checkpoint on a split: the metrics table (x100, two decimals, as in the paper) and --viz figures."""
    model, ckpt = load_ocl(ckpt, device)
    a = ckpt["args"]
    dataset = data.load_dataset(a["dataset"], args.split, args.data_root or a["data_root"],
                                semantic=getattr(args, "semantic", False))
    if args.limit:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    values, _ = validate(model, dataset, device, args.batch_size, size_split=not getattr(args, "semantic", False))
    stats = summary(values)
    print(f"{args.ckpt}: {a['decoder']} + {ckpt['vae']['model_args']['kind']} VAE, step {ckpt['step']}, "
          f"{a['dataset']}/{args.split}")
    print(f"{'':>8} {'ARI':>7} {'ARIfg':>7} {'mIoU':>7} {'mBO':>7}")
    print(f"{'x100':>8} " + " ".join(f"{100 * stats[k][0]:7.2f}" for k in ("ari", "ari_fg", "miou", "mbo")))
    print(f"{'samples':>8} " + " ".join(f"{stats[k][1]:7d}" for k in ("ari", "ari_fg", "miou", "mbo")))
    if "miou_small" in stats:  # Tab. 7: mIoU of small / medium / large objects (COCO area thresholds)
        sizes = ("miou_small", "miou_medium", "miou_large")
        print(f"{'':>8} {'mIoU_S':>7} {'mIoU_M':>7} {'mIoU_L':>7}")
        print(f"{'x100':>8} " + " ".join(f"{100 * stats[k][0]:7.2f}" for k in sizes))
        print(f"{'samples':>8} " + " ".join(f"{stats[k][1]:7d}" for k in sizes))
    if args.viz:
        out_dir = Path(args.out or Path(args.ckpt).parent)
        out_dir.mkdir(parents=True, exist_ok=True)
        batch = next(iter(torch.utils.data.DataLoader(dataset, args.viz, shuffle=False)))
        image, segment = batch["image"].to(device), batch["segment"]
        masks = model(image)["masks"]
        pred = evaluate.masks_to_labels(masks, segment.shape[-2:]).cpu()
        up = F.interpolate(masks.float(), size=segment.shape[-2:], mode="bilinear", align_corners=False)
        evaluate.fig2(out_dir / "fig2.png", image, segment, pred, up)
        print(f"wrote {out_dir / 'fig2.png'} (image | ground truth | prediction | one column per slot)")
        if model.decoder_kind == "diffusion":  # reconstructions through the sampler and the VAE decoder
            _, xs = model.vae.guidance(image)
            slots = model(image)["slots"]
            gen = torch.Generator(device=device).manual_seed(args.seed)
            sampled = model.decoder.sample(slots, xs[0].shape, steps=25, generator=gen)
            train_vae.save_rows_png(out_dir / "diffusion_recon.png",
                                    [image, model.vae.decoder(xs[0]), model.vae.decoder(sampled)])
            print(f"wrote {out_dir / 'diffusion_recon.png'} (rows: image, VAE decoding of X, of the sampled X')")
    return {"ckpt": str(args.ckpt), "kind": "ocl", "split": args.split, "decoder": a["decoder"], "step": ckpt["step"],
            "metrics": {k: {"mean": m, "count": c} for k, (m, c) in stats.items()}}


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (data.DatasetMissing, FileNotFoundError, FloatingPointError, ValueError, train_vae.RunError,
            train_vae.TrainingStopped) as e:
        sys.exit(str(e))


if __name__ == "__main__":
    main()
