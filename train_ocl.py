"""Stage 2: train the object-centric model of ocl.py, guided by the frozen (MSF) VAE of stage 1: Slot Attention + a
transformer (SLATE), diffusion (SlotDiffusion) or MLP (DINOSAUR) decoder; on videos STEVE and video SlotDiffusion.

Paper: "Multi-Scale Fusion for Object Representation" (Zhao et al., ICLR 2025), Sect. 3.1 (OCL with VAE guidance),
A.3-A.5 ("Training the OCL Model": Adam, lr 2e-4, warmup over the first 1/20 then cosine annealing, AMP, gradient
clipping at 1.0, 50,000 steps at batch 32; the VAE is frozen; sigma of the query init anneals 1 -> 0).

Run:  python train_ocl.py                                    # shapes, SLATE + MSF, CPU-sized
      python train_ocl.py --decoder diffusion                # SlotDiffusion + MSF (needs a c = 4 VAE; shapes: x0 +
                                                             # the mask gate, RECIPES)
      python train_ocl.py --decoder diffusion --diffusion-prediction eps --no-mask-gate   # the authors' decoder
      python train_ocl.py --decoder mlp                      # DINOSAUR's decoder on a stand-in target (shapes)
      python train_ocl.py --dataset coco --decoder mlp       # DINOSAUR: DINO's features, big-little encoder, no VAE
      python train_ocl.py --dataset coco --decoder diffusion --device cuda   # the paper's recipe (RECIPES)
      torchrun --nproc_per_node 4 train_ocl.py --dataset coco --decoder diffusion   # 4 GPUs, same global batch
      python train_ocl.py --dataset coco --decoder diffusion --resume        # continue a killed run exactly
      python train_ocl.py --dataset shapes_video                 # STEVE + MSF on the built-in video dataset (CPU)
      python train_ocl.py --dataset movi_c --decoder diffusion   # video SlotDiffusion + MSF (the paper's recipe)

Reads the VAE written by train_vae.py (runs/vae_<dataset>_msf_c256/best.pt for the transformer and mlp decoders,
..._c4 for diffusion, or --vae-ckpt). Writes runs/ocl_<dataset>_<decoder>_<target>/ (`run_folder`): best.pt (by
ARI + ARIfg on the `select` split, held out of the training data; never on val, which the tables report),
last.pt, metrics.jsonl, masks.png, curves.png. A checkpoint embeds its VAE, so `python evaluate.py --ckpt
runs/.../best.pt` needs nothing else.

Reading order: RECIPES (what each dataset trains with), the schedules of A.5 (lr_at, sigma_at), `train` (per step:
lr, sigma -> forward -> loss -> update -> log, validate, checkpoint), `describe`, `validate`, `checkpoint`, the
caches (GuidanceCache, FeatureCache), the arguments. The model is ocl.OCL; validation metrics come from
evaluate.py; what keeps a run alive for days (DDP, resume, stop signals, the log) is train_common.py, called by name.
"""
import argparse
import json
import sys
from pathlib import Path

import lmdb
import torch

import checkpoints
import data
import evaluate
import figures
import msf
import ocl
import train_common

# -----------------------------------------------------------------------------
# The recipe of every dataset: defaults that explicit flags override (A.4-A.5 and the authors' configs for the
# paper's datasets; `shapes` and `shapes_video` sized for a 2-core CPU). val_every: steps between validations;
# val_batch: images or clips per validation batch (default: the training batch); clip: gradient-norm clipping;
# iters: Slot Attention iterations (per frame for video); clip_frames: frames per training clip (A.4's crop).
PAPER = dict(steps=50000, batch=32, val_every=1000, lr=2e-4, iters=3, clip=1.0, encoder="dino")  # A.3: big-little
# MOVi: A.4-A.5's steps, lr (2e-4) and clipping (0.02), 8 clips of 6 frames, 4 per validation batch; from VQ-VFM-OCL's
# STEVE config (a later paper of the authors, no MSF), which trains at lr 5e-5, clipping 0.05, DINOv2 at 256 px, augmented:
MOVI = dict(PAPER, batch=8, val_batch=4, clip=0.02, iters=1, clip_frames=6, box_prior=False, predictor_lr=1.0,
            predictor="authors", boxless="zero")  # authors: 1 iteration per frame, their predictor and box queries
RECIPES = {
    # ours: 2 cores. SlotDiffusion predicts x0 and reads the slots through Slot Attention's masks (--mask-gate), and
    # trains 4,800 steps (a decoder's own keys: recipe_of); the other datasets keep the authors' decoder
    # (results/2026-12-02-slotdiffusion-slot-use.md, results/2026-12-03-slotdiffusion-preset.md)
    "shapes": dict(steps=3200, batch=16, val_every=320, lr=2e-3, iters=3, clip=1.0, encoder="cnn",
                   diffusion_prediction="x0", mask_gate=True, diffusion=dict(steps=4800, val_every=480)),
    # ours: 8 clips of 3 frames, the image recipe's lr and clipping, 1 iteration per frame (the authors' STEVE), our
    # predictor and box-less queries, the box prior and the predictor at 0.1 x lr (results/2026-11-26-video-preset.md)
    "shapes_video": dict(steps=6000, batch=8, val_every=600, val_batch=4, lr=2e-3, iters=1, clip=1.0,
                         clip_frames=3, box_prior=True, predictor_lr=0.1, predictor="ours", boxless="gaussian",
                         encoder="cnn"),
    "clevrtex": PAPER, "coco": PAPER, "voc": PAPER, "openimages": PAPER,
    "movi_c": MOVI, "movi_d": MOVI, "movi_e": MOVI,
}


def recipe_of(dataset, decoder):
    """RECIPES[dataset] with the decoder's own entries, if any (shapes: SlotDiffusion's steps), over the rest."""
    return {**RECIPES[dataset], **RECIPES[dataset].get(decoder, {})}


# -----------------------------------------------------------------------------
# The schedules of A.5: functions of the step, so a resumed run needs to save none of them


def lr_at(step, steps, lr):
    """A.5: linear warmup over the first 1/20 of the steps, then half a cosine down to lr / 1000 (where the authors'
    code ends it; the paper does not say)."""
    return train_common.warmup_cosine(step, steps, lr, warmup=max(1, steps // 20), end=1e-3 * lr)  # authors: lr/1000


def sigma_at(step, steps, start):
    """The noise of the query initialization (A.5): half a cosine from `start` (1) to 0 over training; 0 at
    evaluation."""
    return train_common.cosine(step, steps, start, 0.0)


class GuidanceCache:  # ours: the guidance indices of a training image computed once, reused after
    """The frozen VAE is deterministic (Eq. 1's argmax) and the images are not augmented (no --augment or
    --guidance-noise, which turn the cache off), so a training image's code indices never change: computed the first
    time it is seen, kept (int16, ~0.5 KB per image), and X rebuilt from them (vae.x_from_indices). The quick start's
    step: 0.19 s while the cache fills, 0.11 s after; the losses equal --no-cache's."""

    def __init__(self):
        self.store = {}  # dataset index -> list over guide scales of (g, h, w) int16

    def __call__(self, model, image, index):
        """The guidance indices of a batch, per guide scale (b, g, h, w): from the store where seen before, from
        the frozen VAE (model.guide) for the images seen for the first time. index: the images' dataset indices;
        for video frames (b, 3, H, W) cut from clips, (clip index, frame number) pairs (crop_clips)."""
        index = [i if isinstance(i, tuple) else int(i) for i in index]
        missing = [j for j, i in enumerate(index) if i not in self.store]
        if missing:  # only the new images go through the VAE
            indices, _ = model.guide(image[missing])
            for k, j in enumerate(missing):
                self.store[index[j]] = [t[k].to(torch.int16).cpu() for t in indices]  # codes < 32768 fit int16
        return [torch.stack([self.store[i][s] for i in index]).long().to(image.device)
                for s in range(len(model.guide_scales))]  # per guide scale (b, g, h, w)


class FeatureCache:
    """--cache-features: the frozen DINO's map of every training image (big-little encoder), computed once into an
    LMDB beside the dataset (data/<dataset>_features/dino_train, fp16) and read back in later epochs and runs: the
    frozen backbone dominates a big-little step (benchmarks/encoder_speed.py) and the images are not augmented.
    Both paths round DINO's features to fp16, so what is read back is bit for bit what the encoder computes.
    A header names what the features depend on (DINO's sha256, the resolution, the dataset's meta record, the maps
    kept): a cache made with anything else is refused with a message, never used or overwritten. Process 0 alone
    fills it (the others read once it is complete); a fill cut short continues where it stopped; records are
    written and read per batch."""

    def __init__(self, dataset, dino_sha256, folder=None, prenorm=False):
        split = Path(dataset.path)  # data/<dataset>/<split>: the cache is data/<dataset>_features/dino_<split>, beside
        name = f"dino_{split.name}" + ("_prenorm" if prenorm else "")  # with the map before DINO's last norm too
        self.folder = Path(folder or split.parent.with_name(f"{split.parent.name}_features") / name)
        self.header = {"dino_sha256": dino_sha256, "resolution": dataset.meta["resolution"],
                       "dataset_meta": json.dumps(dataset.meta, sort_keys=True), "dtype": "float16",
                       "maps": "postnorm+prenorm" if prenorm else "postnorm"}
        self.dataset, self.env, self.prenorm = dataset, None, prenorm

    def open(self, model, device, batch_size, d):
        """Check the header of an existing cache, fill what is missing (process 0), then open it for reading."""
        if d.main:
            self.fill(model, device, batch_size)
        if d.world > 1:
            torch.distributed.barrier()  # the others wait until process 0 has filled it
        self.env = lmdb.open(str(self.folder), readonly=True, lock=False, readahead=False)
        return self

    def check(self, txn):
        """The stored header against ours: None if there is none yet; a ValueError naming the difference if stale."""
        raw = txn.get(b"header")
        if raw is None:
            return None
        theirs = json.loads(raw)
        diffs = [k for k in self.header if theirs.get(k) != self.header[k]]
        if diffs:
            raise ValueError(f"the DINO feature cache {self.folder} was made for another {' and '.join(diffs)} than "
                             f"this run's; it is left as it is. Delete it to rebuild it (rm -r {self.folder}), or run "
                             f"without --cache-features")
        return theirs

    @torch.no_grad()
    def fill(self, model, device, batch_size):
        h = w = self.header["resolution"] // 8
        record = model.encoder.dino.dim * (2 if self.prenorm else 1) * h * w * 2  # fp16 bytes of one image's maps
        size = int(1.2 * len(self.dataset) * (record + 4096)) + (1 << 24)  # the records, LMDB's pages, room
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(str(self.folder), map_size=size, subdir=True, readahead=False)
        try:
            self._fill(env, model.encoder, device, batch_size)
        finally:
            env.close()

    def _fill(self, env, encoder, device, batch_size):
        with env.begin(write=True) as txn:
            stored = self.check(txn)  # a stale cache stops here, untouched
            if stored is None:
                txn.put(b"header", json.dumps({**self.header, "complete": False}).encode())
        if stored is not None and stored.get("complete"):
            return
        with env.begin() as txn:
            todo = [j for j, i in enumerate(self.dataset.rows) if txn.get(str(i).encode()) is None]
        print(f"caching DINO features of {len(todo)} training images into {self.folder}", flush=True)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.dataset, todo), batch_size=batch_size)
        for batch in loader:  # one write transaction per batch: a stop loses at most one batch
            image = batch["image"].to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                maps = encoder.dino_map(image, self.prenorm).cpu()  # (b, 384 or 768, H/8, W/8) fp16, as the model
            with env.begin(write=True) as txn:
                for i, m in zip(batch["index"].tolist(), maps):
                    txn.put(str(i).encode(), m.numpy().tobytes())
        with env.begin(write=True) as txn:
            txn.put(b"header", json.dumps({**self.header, "complete": True}).encode())

    def close(self):
        if self.env is not None:
            self.env.close()
            self.env = None

    def __call__(self, index, device):
        """DINO's maps of a batch (b, 384, H/8, W/8; 768 with the prenorm map), fp16, read back from the cache."""
        h = w = self.header["resolution"] // 8
        with self.env.begin() as txn:
            maps = [torch.frombuffer(bytearray(txn.get(str(int(i)).encode())), dtype=torch.float16)
                    for i in index]
        return torch.stack(maps).view(len(maps), -1, h, w).to(device, non_blocking=True)



# -----------------------------------------------------------------------------
# Training


def train(args):
    """Train the OCL model as `args` (parse_args) says; returns the run folder (best.pt, last.pt, masks.png)."""
    train_common.seed_everything(args.seed)
    with train_common.distributed(args.device) as d:  # one process, or this process of a torchrun group
        device = d.device
        # model selection on `select`, a slice held out of the training split: the val split is only ever reported
        train_data = data.load_dataset(args.dataset, "train", args.data_root)  # missing data is named before the VAE
        val_data = data.load_dataset(args.dataset, "select", args.data_root)
        vae_ckpt = load_frozen_vae(args) if args.vae_ckpt else None  # DINOSAUR on DINO's features reads no VAE
        args.out = args.out or run_folder(args, vae_ckpt and vae_ckpt["model_args"])  # named after its target
        resolution = vae_ckpt["args"]["resolution"] if vae_ckpt else train_data.meta["resolution"]
        if train_data.meta["resolution"] != resolution:
            raise ValueError(f"the VAE was trained at {resolution}px but the dataset holds "
                             f"{train_data.meta['resolution']}px images")

        # the model: the frozen VAE from its checkpoint, the rest from the flags (model_args rebuild it later)
        model_args = model_args_of(args, resolution)
        dino = None
        if args.encoder == "dino":  # frozen; its weights' sha256 goes into model_args (resume and evaluate check it)
            dino, model_args["dino_sha256"] = ocl.load_dino(args.dino_weights)
        vae = msf.load_vae(vae_ckpt) if vae_ckpt else None  # building it draws from the random generators, as many
        # draws as its kind needs:
        train_common.seed_everything(args.seed)  # seed again, so seed k starts the same encoder, queries and Slot
        model = ocl.OCL(vae, **model_args, dino=dino).to(device)  # Attention whatever the VAE (paired comparisons)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]  # everything but the frozen VAE
        out = checkpoints.prepare_out_dir(args.out, model, args.keep, args.resume, args.overwrite, d.main,
                                           checkpoints.checkpoint_bytes(model, params))
        # the predictor (video) learns at --predictor-lr times the lr of the rest: train_common.set_lr scales each
        # parameter group by its lr_scale. Image models: one group.
        in_predictor = {id(p) for p in model.predictor.parameters()} if model.video else set()
        groups = [{"params": [p for p in params if id(p) not in in_predictor], "lr_scale": 1.0}]
        if in_predictor:
            # ours: --predictor-lr (0.1 on shapes_video; MOVi 1.0 as the authors)
            groups.append({"params": [p for p in params if id(p) in in_predictor], "lr_scale": args.predictor_lr})
        optimizer = torch.optim.Adam(groups, lr=args.lr)
        scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")  # AMP on GPUs (A.5); a no-op on CPUs
        train_common.reseed_for_rank(args.seed, d)
        start, best, metrics = 0, -float("inf"), {}  # best: the highest validation ARI + ARIfg
        if args.resume:  # weights (the VAE the run started with included), optimizer, RNG
            start, best, metrics, _ = checkpoints.resume(out, "ocl", args, model_args, model, optimizer, scaler, d,
                                                          extra={"vae": vae_ckpt["model_args"]} if vae_ckpt else None)
        log = train_common.Log(out, args.steps, start, enabled=d.main)
        if d.main:
            print(describe(args, params, vae_ckpt, resolution, device, start))
            train_common.print_batch_rule(d, args.batch_size, args.lr)

        workers = train_common.default_workers(device) if args.workers is None else args.workers
        batches = train_common.infinite_batches(train_data, args.batch_size, args.seed, start, d.rank, d.world,
                                                workers, pin_memory=device.type == "cuda")
        ddp = train_common.wrap_ddp(train_common.compile_model(model) if args.compile else model, d)  # DDP: grads averaged
        # the cache holds code indices (mlp and diffusion on Z_1 read continuous targets), which augmented images and
        # sampled codes change at every step
        varying = args.augment or args.guidance_noise > 0
        cache = None if args.no_cache or args.decoder == "mlp" or model.diffuses_z or varying else GuidanceCache()
        if varying and not args.no_cache and d.main:
            print("note: --augment / --guidance-noise change an image's codes at every step: the guidance cache is off")
        features = None  # --cache-features: DINO's maps of the training images, computed once (FeatureCache)
        if args.cache_features:
            features = FeatureCache(train_data, model_args["dino_sha256"], prenorm=model.dino_prenorm).open(
                model, device, args.batch_size, d)
        with train_common.RunGuard(d, scaler.is_enabled(), "Try a lower --lr.") as guard:
            for step in range(start, args.steps):
                lr = train_common.set_lr(optimizer, lr_at(step, args.steps, args.lr))  # warmup, then cosine (A.5)
                # EXERCISE: sigma (EXERCISES.md 6): `--sigma 0` keeps the noise at 0 (A.5: single-object data)
                sigma = sigma_at(step, args.steps, args.sigma)  # query noise, 1 -> 0 (A.5)
                batch = next(batches)
                image, bbox, keys = batch["image"], batch.get("bbox"), batch["index"]  # this process's share
                if model.video:  # A.4: a random strided crop of --clip-frames frames of every clip
                    image, bbox, keys = train_common.crop_clips(image, bbox, keys, args.clip_frames, args.seed, step,
                                                          d.rank, d.world)
                if args.augment:  # authors: random crop and flip (--augment; boxes follow)
                    image, bbox = train_common.augment(image, bbox, args.seed, step, d.rank, d.world)
                image = image.to(device, non_blocking=True)  # (b, 3, H, W), video (b, t, 3, H, W)
                bbox = None if bbox is None else bbox.to(device, non_blocking=True)  # video (b, t, K, 4)
                # the guidance, if seen before (video: per frame)
                indices = cache(model, image.flatten(0, 1) if model.video else image, keys) if cache else None
                maps = features(batch["index"], device) if features else None  # DINO's, if cached

                with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                    loss = ddp(image, sigma, indices, maps, bbox)["loss"]  # guidance -> slots -> decoder -> loss
                stopping = guard.check(loss, step)  # non-finite loss, stop signal
                train_common.optimizer_step(loss, optimizer, scaler, params, args.clip)

                if (step + 1) % args.log_every == 0 or step == 0:
                    shown = train_common.rank_mean(loss, d)  # over every process's share of the batch
                    log(step + 1, loss=shown, lr=lr, sigma=sigma)
                    log.progress(step, loss=shown, sigma=sigma)
                validating = (step + 1) % args.val_every == 0 or step + 1 == args.steps
                if validating or stopping or (step + 1) % args.ckpt_every == 0:  # about to write: weights sane?
                    train_common.check_weights(model, d, step, lambda: model(image, 0.0, indices, maps, bbox)["loss"])
                if validating and d.main:  # process 0 alone validates and writes
                    metrics = validate(model, val_data, args, device, out, step, log)
                    score = metrics["ari"] + metrics["ari_fg"]
                    if score > best or best == -float("inf"):  # (the first validation always writes best.pt)
                        best = score
                        checkpoints.save_checkpoint(out / "best.pt",
                                                     checkpoint(args, model_args, model, step, metrics, vae_ckpt))
                if validating or stopping or (step + 1) % args.ckpt_every == 0:  # last: after everything of this step
                    checkpoints.save_last(out, checkpoint(args, model_args, model, step, metrics, vae_ckpt),
                                           optimizer, scaler, best, d, args.keep)
                if stopping:
                    raise guard.stopped(step, out)
        if d.main:
            print(f"done: {out / 'best.pt'} (validation ARI + ARIfg {100 * best:.2f}); masks in {out / 'masks.png'}")
    return out


def model_args_of(args, resolution):
    """The flags that define the OCL model, as ocl.OCL takes them (and the checkpoint stores them)."""
    return dict(decoder=args.decoder, num_slots=args.slots, resolution=resolution,
                guide_scales=[int(n) for n in args.guide_scales.split(",")], slot_dim=args.slot_dim,
                enc_channels=args.enc_channels, enc_stride=args.enc_stride, iters=args.iters, bilevel=args.bilevel,
                dec_dim=args.dec_dim, dec_layers=args.dec_layers, dec_heads=args.dec_heads, unet_base=args.unet_base,
                unet_layers=args.unet_layers, mlp_hidden=args.mlp_hidden, encoder=args.encoder,
                grouping=args.slot_attention, video=data.DATASETS[args.dataset]["video"], queries=args.queries,
                predictor_dropout=args.predictor_dropout, box_prior=args.box_prior, predictor=args.predictor or "ours",
                boxless=args.boxless or "gaussian", diffusion_target=args.diffusion_target,
                latent_scale=args.latent_scale, diffusion_prediction=args.diffusion_prediction,
                mask_gate=args.mask_gate, guidance_noise=args.guidance_noise, dino_target=args.dino_target)


def describe(args, params, vae_ckpt, resolution, device, start):
    """The run's first line: what trains on what, guided by which VAE, for how long, where."""
    encoder = "naive CNN" if args.encoder == "cnn" else "big-little: frozen DINO ViT-S/8 + CNN" + (
        " with RANDOM DINO weights (smoke run only)" if args.dino_weights == "random" else "")
    grouping = ("SysBinder (2 blocks)" if args.slot_attention == "sysbinder" else "Slot Attention") + \
        f" x {args.iters} iterations, {args.queries} queries" + (" + box prior on frame 0" if args.box_prior else "")
    video = data.DATASETS[args.dataset]["video"]
    name = {"transformer": "STEVE" if video else "SLATE", "diffusion": "video SlotDiffusion" if video else
            "SlotDiffusion", "mlp": "DINOSAUR"}[args.decoder]
    target = f"frozen {vae_ckpt['model_args']['kind']} VAE ({args.vae_ckpt})" if vae_ckpt else "DINO's features"
    if args.decoder == "mlp" and args.encoder == "cnn":
        name = "a DINOSAUR stand-in: the VAE encoder's Z_1 as target, not DINO's features"
    return (f"OCL {name} ({args.decoder}) + {target} | "
            f"{encoder} | {grouping}" + (" + predictor (frame t's slots -> frame t+1's queries)" if video else "") +
            f" | {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters | {args.slots} slots | "
            f"{args.dataset} {resolution}px | {args.steps} steps x batch {args.batch_size}"
            + (f" clips x {args.clip_frames} frames (clip norm {args.clip})" if video else "") + f" on {device}"
            + (f" | resumed at step {start}" if start else ""))


def validate(model, val_data, args, device, out, step, log):
    """Validation on process 0: ARI, ARIfg, mIoU, mBO (evaluate.validate_ocl) on the first --val-batches batches,
    logged and printed x100, masks.png (Fig. 2 of 8 validation images; video: of one whole clip, one row per
    frame) and curves.png (figures.curves). Returns the metric means."""
    values, (image, segment, pred, masks) = evaluate.validate_ocl(model, val_data, device, args.val_batch_size,
                                                                  args.val_batches,
                                                                  thresholds=evaluate.size_thresholds(val_data))
    metrics = {k: mean for k, (mean, _) in evaluate.summary(values).items()}
    log(step + 1, **{f"val_{k}": round(v, 5) for k, v in metrics.items()})
    print("  val | " + " | ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()), flush=True)
    n = min(8, len(image))  # of the last validation batch; video: its first clip, one row per frame
    masks = evaluate.upsample_masks(masks, segment.shape[-2:])  # the masks the metrics scored: (b(, t), s, H, W)
    if model.video:
        figures.fig2(out / "masks.png", image[0], segment[0], pred[0], masks[0])
    else:
        figures.fig2(out / "masks.png", image[:n], segment[:n], pred[:n], masks[:n])
    figures.curves(out / "metrics.jsonl", out / "curves.png")
    return metrics


def checkpoint(args, model_args, model, step, metrics, vae_ckpt):
    """What best.pt holds: a plain dict that load_ocl rebuilds the model from. It embeds the VAE (weights in
    "model" under vae.*, arguments in "vae"), so evaluate.py needs nothing else. last.pt adds "train_state"."""
    return {"kind": "ocl", "format_version": checkpoints.CKPT_VERSION, "args": vars(args), "model_args": model_args,
            "model": model.state_dict(), "step": step + 1, "metrics": metrics,
            "vae": {"model_args": vae_ckpt["model_args"], "args": vae_ckpt["args"]} if vae_ckpt else None}


# -----------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = data.ArgumentParser(description="Stage 2: Slot Attention OCL guided by a frozen (MSF) VAE.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="shapes", help=f"one of {', '.join(RECIPES)}")
    p.add_argument("--data-root", default="data", help="folder holding the LMDB datasets")
    p.add_argument("--decoder", default="transformer", choices=ocl.DECODERS,
                   help="transformer = SLATE, diffusion = SlotDiffusion, mlp = DINOSAUR (--encoder dino: DINO's "
                        "features; --encoder cnn: a stand-in, the frozen VAE encoder's Z_1)")
    p.add_argument("--diffusion-target", default="x", choices=["x", "z"],
                   help="diffusion: what is denoised: x, the guidance X (the paper, Sect. 3.1); z, the VAE encoder's "
                        "continuous Z_1 (SlotDiffusion's and the authors' code, eaq=True)")
    p.add_argument("--latent-scale", default="auto", choices=["auto", "1"],
                   help="diffusion: auto, the target times 1 / std of the first batch (ours); 1, as it is (the authors')")
    p.add_argument("--diffusion-prediction", default=None, choices=["eps", "x0"],
                   help="diffusion: what the UNet predicts: eps, the noise (SlotDiffusion, the authors' code); x0, the "
                        "target itself (an option of SlotDiffusion's code) (default: the dataset's recipe)")
    p.add_argument("--mask-gate", action=argparse.BooleanOptionalAction, default=None,
                   help="diffusion (ours): Slot Attention's masks gate the UNet's cross-attention, each position reading "
                        "mostly the slots that claim it (default: the dataset's recipe)")
    p.add_argument("--guidance-noise", type=data.number(float, 0), default=0.0,
                   help="the authors' stage 2: Gumbel-sample the guidance codes at every step with this logit scale "
                        "(their std: 5 for MSF, 2 for GDR); 0: Eq. 1's argmax (the paper)")
    p.add_argument("--augment", action="store_true", help="the authors' random crop and flip (train_common.augment; the paper has none)")
    p.add_argument("--dino-target", default=None, choices=["postnorm", "prenorm"],
                   help="DINOSAUR: DINO's map after its final LayerNorm (the authors') or before it (DINOSAUR's own)")
    p.add_argument("--vae-ckpt", default=None, help="stage-1 checkpoint (default: train_vae.py's msf run of the dataset, "
                                                    "c = 4 for diffusion, 256 otherwise)")
    # the OCL model (Sect. 3.1, A.3): slots, guidance, widths
    p.add_argument("--slots", type=data.number(int, 1), default=None,
                   help="number of slots (default: the dataset's, data.DATASETS: objects + background)")
    p.add_argument("--guide-scales", default="1", choices=["1", "1,2", "2"], help="VAE scales used as guidance (Tab. 5)")
    p.add_argument("--size", default=None, choices=list(ocl.SIZES), help="model widths (default: cpu for the built-in shapes and shapes_video, paper otherwise)")
    for name in ("slot-dim", "enc-channels", "dec-dim", "dec-layers", "dec-heads", "unet-base", "unet-layers",
                 "mlp-hidden"):
        p.add_argument(f"--{name}", type=data.number(int, 1), default=None,
                       help=f"override the --size value of {name.replace('-', '_')}")
    p.add_argument("--enc-stride", type=int, choices=[1, 2, 4], default=None,
                   help="encoder stride r: masks at H/r (override the --size value)")
    p.add_argument("--encoder", default=None, choices=["cnn", "dino"],
                   help="primary encoder: the naive CNN, or A.3's big-little (frozen DINO ViT-S/8 + the CNN) "
                        "(default: the dataset's recipe; dino for the paper's datasets, cnn for shapes)")
    p.add_argument("--dino-weights", default=None,
                   help="--encoder dino: the official dino_deitsmall8_pretrain.pth (default: torch's hub cache, "
                        f"downloaded on first use), or 'random' (smoke runs only)")
    p.add_argument("--cache-features", action="store_true",
                   help="--encoder dino: compute DINO's features of the training images once into an LMDB beside the "
                        "dataset (data/<dataset>_features/dino_train) and read them back (this run and later ones)")
    p.add_argument("--slot-attention", default="sa", choices=["sa", "sysbinder"],
                   help="sa: Slot Attention (Locatello et al.); sysbinder: block-slot attention with 2 blocks, as "
                        "SysBinder's authors' code (the paper's competitor, A.3; the decoder reads the coupled blocks)")
    p.add_argument("--iters", type=data.number(int, 1), default=None,
                   help="Slot Attention iterations (default: the dataset's recipe; 3 for images, 1 per frame for video, as "
                        "the authors' STEVE)")
    p.add_argument("--queries", default=None, choices=["gaussian", "box"],
                   help="query initialization (A.5): gaussian (learned means + annealed sigma), or box (the first "
                        "frame's boxes through a 2-layer MLP) (default: box for video, gaussian for images)")
    # video (STEVE, video SlotDiffusion)
    p.add_argument("--box-prior", action=argparse.BooleanOptionalAction, default=None,
                   help="video, box queries: on the first frame a slot that starts from a box attends only inside "
                        "that box (ours; default: on for shapes_video, off for MOVi as the authors)")
    p.add_argument("--clip-frames", type=data.number(int, 1), default=None,
                   help="video: frames per training clip, a random strided crop (default: the dataset's recipe; A.4: 6, "
                        "shapes_video: 3); validation takes whole clips")
    p.add_argument("--predictor", default=None, choices=["authors", "steve", "ours"],
                   help="video: the layer from frame t's slots to frame t+1's queries: authors (post-norm, no bias), "
                        "steve (STEVE's) or ours (pre-norm, residual branches starting at zero) (default: the recipe's)")
    p.add_argument("--boxless", default=None, choices=["zero", "gaussian"],
                   help="video, box queries: slots without a box start from the zero box's query, boxes as they are "
                        "(zero: the authors'), or from Gaussian queries, boxes centred (gaussian: ours) (default: the recipe's)")
    p.add_argument("--predictor-dropout", type=data.number(float, 0), default=0.1,
                   help="video: dropout of the predictor (authors: 0.1)")
    p.add_argument("--predictor-lr", type=data.number(float, 0), default=None,
                   help="video: the predictor's learning rate as a multiple of --lr (default: the recipe's; MOVi 1.0 "
                        "as the authors, shapes_video 0.1)")
    p.add_argument("--val-batch-size", type=data.number(int, 1), default=None,
                   help="clips or images per validation batch (default: the dataset's recipe; paper: 32 images, 4 clips)")
    p.add_argument("--bilevel", action="store_true",
                   help="BO-QSA's truncated gradient (the authors' code): backpropagate through the last iteration only")
    # optimisation (A.5)
    p.add_argument("--steps", type=data.number(int, 1), default=None,
                   help="training steps (default: the dataset's recipe; paper 50000)")
    p.add_argument("--batch-size", type=data.number(int, 1), default=None, help="default: the dataset's recipe (paper 32)")
    p.add_argument("--lr", type=data.number(float, above=0), default=None,
                   help="Adam learning rate (default: the dataset's recipe; paper 2e-4, shapes 2e-3 for its short CPU schedule)")
    p.add_argument("--clip", type=data.number(float, above=0), default=None,
                   help="gradient clipping norm (default: the dataset's recipe; paper 1.0 for images, 0.02 for MOVi)")
    p.add_argument("--sigma", type=data.number(float, 0), default=1.0,
                   help="start of the query-init sigma, cosine-annealed to 0 (A.5)")
    p.add_argument("--no-cache", action="store_true", help="run the frozen VAE every step instead of caching its indices")
    # seeds, devices, logging, checkpoints and resume: the same flags as train_vae.py
    train_common.add_run_args(p, val_default="the recipe's: 1000 (A.5), shapes 320; steps/10 with other --steps")
    p.add_argument("--out", default=None, help="run folder (default: runs/ocl_<dataset>_<model>_<target>, run_folder)")
    args = p.parse_args(argv)

    # the dataset's recipe (steps, batch, lr, ...), then the model size, then the checks that need the final values
    recipe = train_common.apply_recipe(p, args, {name: recipe_of(name, args.decoder) for name in RECIPES}, val_parts=10)
    video = data.DATASETS[args.dataset]["video"]
    args.iters = recipe["iters"] if args.iters is None else args.iters
    args.clip = recipe["clip"] if args.clip is None else args.clip
    args.clip_frames = recipe.get("clip_frames", 6) if args.clip_frames is None else args.clip_frames  # A.4
    if args.predictor_lr is not None and not video:
        p.error(f"--predictor-lr is the video predictor's; {args.dataset} is an image dataset: leave it out")
    for flag, name in (("--predictor", args.predictor), ("--boxless", args.boxless)):
        if name is not None and not video:
            p.error(f"{flag} {name} sets the video model; {args.dataset} is an image dataset: leave it out")
    if video:  # images have no predictor and no box queries: None
        args.predictor_lr = recipe["predictor_lr"] if args.predictor_lr is None else args.predictor_lr
        args.predictor = recipe["predictor"] if args.predictor is None else args.predictor
        args.boxless = recipe["boxless"] if args.boxless is None else args.boxless
    args.queries = ("box" if video else "gaussian") if args.queries is None else args.queries
    if args.box_prior and args.queries != "box":
        p.error("--box-prior restricts the first frame's box slots to their boxes: it needs --queries box on a video "
                "dataset")
    if args.box_prior is None:  # the recipe's (shapes_video: on), with box queries only
        args.box_prior = recipe.get("box_prior", False) and args.queries == "box"
    if args.queries == "box" and not video:
        p.error(f"--queries box initialises slots from the first frame's bounding boxes; {args.dataset} is an image "
                f"dataset without boxes: use --queries gaussian")
    args.val_batch_size = args.val_batch_size or recipe.get("val_batch", args.batch_size)
    if video and args.cache_features:
        p.error("--cache-features stores one DINO map per image; it does not cache video frames yet: run without it")
    args.slots = data.DATASETS[args.dataset]["num_slots"] if args.slots is None else args.slots
    args.lr = recipe["lr"] if args.lr is None else args.lr
    args.encoder = recipe["encoder"] if args.encoder is None else args.encoder
    if args.cache_features and args.encoder != "dino":
        p.error(f"--cache-features caches DINO's features: it needs --encoder dino (this run's is {args.encoder})")
    if args.dino_weights is not None and args.encoder != "dino":
        p.error(f"--dino-weights {args.dino_weights} is for --encoder dino (this run's encoder is {args.encoder})")
    args.size = args.size or ("cpu" if args.dataset in data.BUILTIN else "paper")
    for key, value in ocl.SIZES[args.size].items():  # --size fills every width no flag gave
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dec_dim % args.dec_heads:  # attention splits its width over the heads
        p.error(f"--dec-heads {args.dec_heads} does not divide --dec-dim {args.dec_dim}: each attention head "
                f"takes dec-dim / heads channels")
    widths = [args.unet_base * mult for mult in (1, 2, 3, 4)]  # the UNet's levels (decoders.UNet mults)
    if any(w % 8 or w % ocl.unet_heads(args.unet_base) for w in widths):
        p.error(f"--unet-base {args.unet_base}: the UNet's group norms and its {ocl.unet_heads(args.unet_base)} attention "
                f"heads need every level width ({', '.join(map(str, widths))}) divisible by 8 and by the heads; "
                f"use a multiple of 32 (e.g. 32, 128)")
    if args.decoder != "diffusion" and ((args.diffusion_target, args.latent_scale) != ("x", "auto") or
                                        args.diffusion_prediction is not None or args.mask_gate is not None):
        p.error(f"--diffusion-target, --latent-scale, --diffusion-prediction and --mask-gate set the diffusion "
                f"decoder; --decoder {args.decoder} has none: leave them out")
    # SlotDiffusion's decoder: the recipe's (shapes: x0 and the mask gate) with Slot Attention. SysBinder has no mask
    # per decoder token and x0 without the gate lets one slot take the image, so it keeps the authors' (eps, no gate)
    ours = args.decoder == "diffusion" and args.slot_attention == "sa"
    if args.diffusion_prediction is None:
        args.diffusion_prediction = recipe.get("diffusion_prediction", "eps") if ours else "eps"
    if args.mask_gate is None:
        args.mask_gate = recipe.get("mask_gate", False) if ours else False
    if args.mask_gate and args.slot_attention == "sysbinder":
        p.error("--mask-gate gates each slot by its mask; SysBinder's decoder reads 2 coupled tokens per slot: use "
                "--slot-attention sa with --mask-gate")
    if args.decoder != "transformer" and args.guide_scales != "1":
        p.error(f"--guide-scales {args.guide_scales} needs the transformer decoder (the others decode one grid)")
    dinosaur = args.decoder == "mlp" and args.encoder == "dino"
    if args.dino_target is not None and not dinosaur:
        p.error(f"--dino-target {args.dino_target} chooses DINOSAUR's target: it needs --decoder mlp --encoder dino")
    args.dino_target = args.dino_target or "postnorm"
    if args.guidance_noise > 0 and (args.decoder == "mlp" or args.diffusion_target == "z"):
        p.error("--guidance-noise samples guidance codes; mlp and --diffusion-target z read none: leave it out")
    if args.augment and args.cache_features:
        p.error("--cache-features keeps DINO's map of each image as it is, --augment changes it: give one of them")
    if dinosaur:  # DINOSAUR: DINO's features are the target, no VAE
        if args.vae_ckpt is not None:
            p.error("--decoder mlp --encoder dino is DINOSAUR: it reconstructs DINO's features and reads no VAE; "
                    "leave out --vae-ckpt (or use --encoder cnn for the stand-in that reconstructs a VAE's Z_1)")
    elif args.vae_ckpt is None:  # where `python train_vae.py --dataset D --code-dim c` writes (its default --out)
        args.vae_ckpt = f"runs/vae_{args.dataset}_msf_c{ocl.CODE_DIM.get(args.decoder, 256)}/best.pt"
    return args


def run_folder(args, vae_args):
    """The default --out: runs/ocl_<dataset>_<model>_<target>. The target is what the decoder reconstructs: the
    guidance of a VAE named as its run folder (msf.vae_name; -g12 / -g2 for other --guide-scales), `dino` for
    DINOSAUR (vae_args None), `z1-<vae>` for the mlp stand-in. The model is the decoder plus a tag for every switch
    that is not the default (-z, -scale1, -x0, -gate, -dino, -sysbinder, -prenorm, -gnoise<std>, -aug; video:
    -gaussian, -boxprior, and -pred<kind>, -boxless<kind>, -plr<x> where they differ from the dataset's recipe).
    The quick start's run is runs/ocl_shapes_transformer_msf, evaluate.py's default --ckpt."""
    target = "dino" if vae_args is None else msf.vae_name(vae_args)
    if args.decoder == "mlp" and vae_args is not None:
        target = f"z1-{target}"
    elif args.guide_scales != "1":
        target += "-g" + args.guide_scales.replace(",", "")
    model = args.decoder + ("-z" if args.diffusion_target == "z" else "") + \
        ("-scale1" if args.latent_scale == "1" else "") + ("-x0" if args.diffusion_prediction == "x0" else "") + \
        ("-gate" if args.mask_gate else "") + ("-dino" if args.encoder == "dino" else "") + \
        ("-sysbinder" if args.slot_attention == "sysbinder" else "") + \
        ("-gaussian" if data.DATASETS[args.dataset]["video"] and args.queries == "gaussian" else "") + \
        ("-boxprior" if args.box_prior else "") + ("-prenorm" if args.dino_target == "prenorm" else "") + \
        (f"-gnoise{args.guidance_noise:g}" if args.guidance_noise > 0 else "") + ("-aug" if args.augment else "")
    recipe = RECIPES[args.dataset]
    if data.DATASETS[args.dataset]["video"]:  # runs that differ in a video switch must not share a folder
        model += "".join(f"-{tag}{value:g}" if isinstance(value, float) else f"-{tag}{value}"
                         for tag, key, value in (("pred", "predictor", args.predictor),
                                                 ("boxless", "boxless", args.boxless),
                                                 ("plr", "predictor_lr", args.predictor_lr))
                         if value != recipe[key])
    return f"runs/ocl_{args.dataset}_{model}_{target}"


def load_frozen_vae(args):
    """The stage-1 checkpoint this run is guided by, with every mismatch named before anything is built: the code
    dimension its decoder needs (A.3), the dataset, and the scales --guide-scales asks for."""
    path = Path(args.vae_ckpt)
    if not path.exists():
        raise FileNotFoundError(f"no VAE checkpoint at {path}. Train it first:\n    python train_vae.py "
                                f"--dataset {args.dataset} --code-dim {ocl.CODE_DIM.get(args.decoder, 256)}")
    ckpt = checkpoints.load_checkpoint(path, "vae")  # refuses an OCL checkpoint, a corrupt file, a newer format
    c, need = ckpt["model_args"]["code_dim"], ocl.CODE_DIM.get(args.decoder)
    if need is not None and c != need:
        raise ValueError(f"the {args.decoder} decoder needs c = {need} guidance, but {path} is a c = {c} VAE; "
                         f"train one with: python train_vae.py --dataset {args.dataset} --code-dim {need}")
    if ckpt["args"]["dataset"] != args.dataset:
        raise ValueError(f"{path} was trained on '{ckpt['args']['dataset']}', not on '{args.dataset}'")
    scales = [int(n) for n in args.guide_scales.split(",")]  # the single-scale baselines have scale 1 only
    if max(scales) > ckpt["model_args"]["scales"] or (max(scales) > 1 and ckpt["model_args"]["kind"] in ("vqvae", "gdr")):
        raise ValueError(f"--guide-scales {args.guide_scales} needs a multi-scale VAE with at least {max(scales)} scales; "
                         f"{path} is {ckpt['model_args']['kind']} with N = {ckpt['model_args']['scales']}")
    return ckpt


def main(argv=None):
    """The command line: parse, train, and turn the errors a user can fix into one-line messages."""
    args = parse_args(argv)
    try:
        train(args)
    except (data.DatasetMissing, FileNotFoundError, FloatingPointError, ValueError, train_common.RunError,
            train_common.TrainingStopped) as e:
        sys.exit(str(e))  # a problem the user can fix: the message, without a traceback
    train_common.exit_worker()  # a torchrun worker leaves here, past the teardown where gloo can abort it


if __name__ == "__main__":
    main()
