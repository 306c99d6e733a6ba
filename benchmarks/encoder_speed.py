"""Training-step time of SLATE+MSF with A.3's big-little encoder (frozen DINO ViT-S/8 + naive CNN) at 128 px:
DINO's features computed on the fly vs read from the feature cache (--cache-features), side by side (interleaved)
in one run, and the naive CNN alone for scale. Target: the cached step at least 3x faster than the uncached one
on a CPU.

A step here is what train_ocl.py's loop does per batch: the model's loss with the guidance indices already known
(the GuidanceCache), backward, Adam. The cached variant is handed DINO's fp16 maps as FeatureCache would read them
(the LMDB read itself is timed apart: it is memory-bound and small). DINO's weights are random: its cost does not
depend on their values.

Run: python benchmarks/encoder_speed.py [--size cpu] [--batch-size 8] [--repeats 5] [--device cpu]
"""
import argparse
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import encoders  # noqa: E402
import msf  # noqa: E402
import ocl  # noqa: E402
import train_ocl  # noqa: E402


def step(model, opt, image, indices, maps, device):
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        loss = model(image, 0.5, indices, maps)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def read_time(maps, repeats):
    """Seconds to read a batch of fp16 maps back from an LMDB FeatureCache (written here, in a temporary folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        dataset = types.SimpleNamespace(path=Path(tmp) / "train", meta={"resolution": maps.shape[-1] * 8},
                                        rows=range(len(maps)))
        cache = train_ocl.FeatureCache(dataset, "benchmark", Path(tmp) / "train_dino")
        import lmdb
        env = lmdb.open(str(cache.folder), map_size=1 << 30)
        with env.begin(write=True) as txn:
            for i, m in enumerate(maps.cpu()):
                txn.put(str(i).encode(), m.numpy().tobytes())
        env.close()
        cache.env = lmdb.open(str(cache.folder), readonly=True, lock=False)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            cache(range(len(maps)), "cpu")
            times.append(time.perf_counter() - start)
        cache.close()
        return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="cpu", choices=list(ocl.SIZES), help="OCL widths (ocl.SIZES)")
    p.add_argument("--resolution", type=int, default=128, help="image side (the paper's 128)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant, interleaved")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    vae = msf.build_vae("msf", 256).to(device).eval()
    dino, _, digest = encoders.dino_vit_s8("random")
    common = dict(decoder="transformer", num_slots=11, resolution=args.resolution, **ocl.SIZES[args.size])
    models = {"cnn": ocl.OCL(vae, **common).to(device),
              "dino": ocl.OCL(vae, **common, encoder="dino", dino=dino, dino_sha256=digest).to(device)}
    opts = {k: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], 1e-4) for k, m in models.items()}
    image = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1
    with torch.no_grad():
        indices, _ = models["cnn"].guide(image)
        maps = dino.to(device)(image).half()  # what FeatureCache hands the step
    variants = {"naive CNN": ("cnn", None), "big-little, DINO on the fly": ("dino", None),
                "big-little, DINO cached": ("dino", maps)}
    times = {v: [] for v in variants}
    for v, (k, m) in variants.items():  # warm-up
        step(models[k], opts[k], image, indices, m, device)
    for _ in range(args.repeats):  # interleaved, so machine noise hits every variant alike
        for v, (k, m) in variants.items():
            times[v].append(step(models[k], opts[k], image, indices, m, device))
    read = read_time(maps, args.repeats)
    med = {v: statistics.median(t) for v, t in times.items()}
    print(f"device {device} | {args.resolution} px | --size {args.size} | batch {args.batch_size} | "
          f"{args.repeats} timed steps each, interleaved (median)")
    print(f"{'variant':>28} | {'s/step':>7} | {'vs cached':>9}")
    for v in variants:
        extra = read if v.endswith("cached") else 0.0
        print(f"{v:>28} | {med[v] + extra:>7.3f} | {(med[v] + extra) / (med['big-little, DINO cached'] + read):>8.2f}x")
    print(f"(the cached step includes reading the batch's maps from the LMDB: {read * 1000:.1f} ms)")
    ratio = med["big-little, DINO on the fly"] / (med["big-little, DINO cached"] + read)
    print(f"cached step {ratio:.2f}x faster than on the fly (target >= 3x on a CPU)")


if __name__ == "__main__":
    main()
