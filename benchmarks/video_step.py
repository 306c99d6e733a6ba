"""Time of one MOVi-sized video OCL training step at the paper's settings (A.5): STEVE + MSF (and video SlotDiffusion
+ MSF), batch 8 clips x 6 frames at 128 px, --size paper, A.3's big-little encoder (frozen DINO ViT-S/8 + naive CNN),
box queries, 1 Slot Attention iteration per frame, AMP fp16 on a GPU. Also the validation forward of the paper's
4 clips x 24 frames, and peak GPU memory.

A step is what train_ocl.py's loop does per batch: the model's loss (guidance indices already known, as the
GuidanceCache hands them after the first epoch; "+ VAE" runs the frozen VAE on every frame instead), backward,
gradient clipping at 0.02, Adam. Weights are random (DINO's, the VAE's): the cost does not depend on their values.
Variants are interleaved, so machine noise hits every one alike.

Run: python benchmarks/video_step.py                 # on the GPU if there is one
     python benchmarks/video_step.py --size class --batch-size 2 --repeats 2   # a CPU smoke run
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import encoders  # noqa: E402
import msf  # noqa: E402
import ocl  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(model, opt, scaler, clip, bbox, indices, device):
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        loss = model(clip, 0.0, indices, None, bbox)["loss"]
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 0.02)
    scaler.step(opt)
    scaler.update()
    sync(device)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="paper", choices=list(ocl.SIZES), help="OCL widths (ocl.SIZES)")
    p.add_argument("--resolution", type=int, default=128, help="frame side (the paper's 128)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per training step (paper 8)")
    p.add_argument("--frames", type=int, default=6, help="frames per training clip (paper 6)")
    p.add_argument("--val-batch-size", type=int, default=4, help="clips per validation batch (paper 4)")
    p.add_argument("--val-frames", type=int, default=24, help="frames per validation clip (MOVi 24)")
    p.add_argument("--slots", type=int, default=11, help="MOVi-C 11, MOVi-D/E 21")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant, interleaved")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    dino, _, digest = encoders.dino_vit_s8("random")
    dino = dino.to(device)
    common = dict(num_slots=args.slots, resolution=args.resolution, iters=1, encoder="dino", dino=dino,
                  dino_sha256=digest, video=True, queries="box", **ocl.SIZES[args.size])
    models = {"STEVE + MSF": ocl.OCL(msf.build_vae("msf", 256).eval(), "transformer", **common).to(device),
              "video SlotDiffusion + MSF": ocl.OCL(msf.build_vae("msf", 4).eval(), "diffusion", **common).to(device)}
    opts = {k: torch.optim.Adam([q for q in m.parameters() if q.requires_grad], 1e-4) for k, m in models.items()}
    scalers = {k: torch.amp.GradScaler("cuda", enabled=device.type == "cuda") for k in models}
    b, t, r = args.batch_size, args.frames, args.resolution
    clip = torch.rand(b, t, 3, r, r, device=device) * 2 - 1  # (b, t, 3, H, W)
    corner = torch.rand(b, t, args.slots - 1, 2, device=device) * 0.6
    bbox = torch.cat([corner, corner + 0.1 + torch.rand_like(corner) * 0.3], -1)  # (b, t, K, 4) valid boxes
    indices = {k: m.guide(clip.flatten(0, 1))[0] for k, m in models.items()}  # what the GuidanceCache hands over
    variants = {f"{k}{v}": (k, indices[k] if v == "" else None) for k in models for v in ("", " + VAE")}
    for m in models.values():
        m.train()
    for name, (k, idx) in variants.items():  # warm-up (cuDNN autotuning, allocator)
        step(models[k], opts[k], scalers[k], clip, bbox, idx, device)
    times = {v: [] for v in variants}
    peak = {}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every variant alike
        for name, (k, idx) in variants.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[name].append(step(models[k], opts[k], scalers[k], clip, bbox, idx, device))
            if device.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated() / 2 ** 30
    val_clip = torch.rand(args.val_batch_size, args.val_frames, 3, r, r, device=device) * 2 - 1
    val_box = bbox[:1, :1].expand(args.val_batch_size, args.val_frames, -1, -1)
    val = {}
    for k, m in models.items():
        m.eval()
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            m.segment(val_clip, val_box)  # warm-up
            sync(device)
            start = time.perf_counter()
            m.segment(val_clip, val_box)
            sync(device)
        val[k] = time.perf_counter() - start
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name} | torch {torch.__version__} | {r} px | --size {args.size} | {args.slots} slots | train batch {b} "
          f"clips x {t} frames | {args.repeats} timed steps each, interleaved (median)")
    print(f"{'variant':>34} | {'s/step':>7} | {'frames/s':>8} | {'peak GiB':>8}")
    for v in variants:
        med = statistics.median(times[v])
        print(f"{v:>34} | {med:>7.3f} | {b * t / med:>8.1f} | {peak.get(v, float('nan')):>8.2f}")
    for k, s in val.items():
        print(f"validation forward of {args.val_batch_size} clips x {args.val_frames} frames, {k}: {s:.3f} s")
    full = 50000 * statistics.median(times["STEVE + MSF"])
    print(f"50,000 steps of STEVE + MSF (A.5) at this speed: {full / 3600:.1f} h (cached guidance, no validation)")


if __name__ == "__main__":
    main()
