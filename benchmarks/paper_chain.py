"""The card's command end to end, at the paper's settings, without a download: a synthetic COCO panoptic download
(benchmarks/synthetic_downloads.py) -> convert.py coco -> train_vae.py --dataset coco --code-dim 4 -> train_ocl.py
--dataset coco --decoder diffusion --dino-weights random -> evaluate.py, each training stopped by SIGTERM half-way and
continued with --resume, as a cluster would. Prints each command with its wall time, the conversion's throughput
and bytes per sample, DINO's feature cache bytes per sample, and both extrapolated to the full COCO download (what
the README's "the paper's own runs" quotes; benchmarks/paper_scale.py gives the time per training step).

Run: python benchmarks/paper_chain.py --work /tmp/chain                      # 500 + 50 images, 4 steps per stage
     python benchmarks/paper_chain.py --work /tmp/chain --train 3000 --val 300 --steps 10
     python benchmarks/paper_chain.py --work /tmp/chain --tiny               # a seconds-long check (the test's)
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import data  # noqa: E402
import synthetic_downloads  # noqa: E402

# images of the official COCO 2017 download, for the extrapolation (train2017, val2017)
FULL = {"coco train2017": 118_287, "coco val2017": 5_000}
TINY_VAE = ["--channels", "16", "--batch-size", "4"]
TINY_OCL = ["--size", "class", "--batch-size", "2"]


def folder_bytes(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run(cmd, log, stop_at=None, out=None):
    """Run cmd (a list) to its end; with stop_at, send SIGTERM once out/step_<stop_at>.pt exists and then continue
    the run with --resume. Returns the wall seconds of all of it."""
    start = time.time()
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        if stop_at is not None:
            while not (Path(out) / f"step_{stop_at:07d}.pt").exists():
                if proc.poll() is not None:
                    break
                time.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # as a scheduler stops a job: the step ends, last.pt is written
        code = proc.wait()
        if stop_at is not None:
            if code != 1:
                raise SystemExit(f"{cmd[1]} should have stopped on SIGTERM (exit 1), exit {code}: see {log}")
            print(f"  stopped by SIGTERM after a checkpoint; continuing with --resume", flush=True)
            code = subprocess.run(cmd + ["--resume"], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:2])} failed (exit {code}): see {log}")
    return time.time() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="a new folder for the download, the dataset and the runs")
    p.add_argument("--train", type=int, default=500, help="synthetic training images")
    p.add_argument("--val", type=int, default=50, help="synthetic validation images")
    p.add_argument("--steps", type=int, default=4, help="training steps per stage (stopped half-way, resumed)")
    p.add_argument("--tiny", action="store_true", help="small images, widths and batches: the chain in seconds")
    args = p.parse_args(argv)
    work = Path(args.work)
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"--work {work} is not empty; give a new folder")
    work.mkdir(parents=True, exist_ok=True)
    log, py, steps = work / "chain.log", sys.executable, max(2, args.steps)
    half = steps // 2
    t = time.time()
    synthetic_downloads.write_coco(work / "download", {"train": args.train, "val": args.val},
                                   long_side=160 if args.tiny else 640)
    made = time.time() - t
    rows = [("synthetic download (not part of a real run)", f"{args.train} + {args.val} images", made)]

    seconds = run([py, "convert.py", "coco", "--src", str(work / "download"), "--out", str(work / "data" / "coco")], log)
    lmdb = folder_bytes(work / "data" / "coco")
    kept = {s: data.read_meta(work / "data" / "coco" / s)["count"] for s in ("train", "val")}
    per_image = seconds / (args.train + args.val)
    per_sample = lmdb / (kept["train"] + kept["val"])
    rows.append(("convert.py coco", f"{(args.train + args.val) / seconds:.1f} images/s, {per_sample / 1024:.1f} KiB "
                                    f"per kept sample ({kept['train']} + {kept['val']} kept)", seconds))

    runs, common = work / "runs", ["--data-root", str(work / "data"), "--ckpt-every", str(half), "--val-every",
                                   str(steps), "--val-batches", "1", "--log-every", "1"]
    vae = runs / "vae"
    seconds = run([py, "train_vae.py", "--dataset", "coco", "--code-dim", "4", "--steps", str(steps), "--out", str(vae),
                   *common, *(TINY_VAE if args.tiny else [])], log, stop_at=half, out=vae)
    rows.append(("train_vae.py --dataset coco --code-dim 4", f"{steps} steps, stopped at {half}, resumed", seconds))
    ocl = runs / "ocl"
    seconds = run([py, "train_ocl.py", "--dataset", "coco", "--decoder", "diffusion", "--dino-weights", "random",
                   "--vae-ckpt", str(vae / "best.pt"), "--steps", str(steps), "--out", str(ocl), *common,
                   *(TINY_OCL if args.tiny else [])], log, stop_at=half, out=ocl)
    rows.append(("train_ocl.py --dataset coco --decoder diffusion", f"{steps} steps, stopped at {half}, resumed",
                 seconds))
    seconds = run([py, "evaluate.py", "--ckpt", str(ocl / "best.pt"), "--json", str(work / "metrics.json")], log)
    metrics = json.loads((work / "metrics.json").read_text())["metrics"]
    rows.append(("evaluate.py", f"ARI {100 * metrics['ari']['mean']:.2f} on {metrics['ari']['count']} val images",
                 seconds))
    # DINO's feature cache (--cache-features, DINOSAUR's and the big-little encoder's): its bytes per sample
    cache_out = runs / "dinosaur"
    seconds = run([py, "train_ocl.py", "--dataset", "coco", "--decoder", "mlp", "--dino-weights", "random",
                   "--cache-features", "--steps", "1", "--out", str(cache_out), *common,
                   *(TINY_OCL if args.tiny else [])], log)
    cached = kept["train"] - len(data.select_rows(kept["train"]))  # the cache holds the training view (no select)
    cache = folder_bytes(work / "data" / "coco_features") / cached  # bytes per cached image
    rows.append(("train_ocl.py --decoder mlp --cache-features", f"feature cache {cache / 1024:.1f} KiB "
                                                                 f"per training sample", seconds))

    print("\n| step | what | wall s |\n|---|---|---|")
    for name, what, s in rows:
        print(f"| {name} | {what} | {s:.1f} |")
    print(f"\nExtrapolated (this machine's conversion throughput, {per_sample / 1024:.1f} KiB per kept sample; "
          f"the feature cache {cache / 1024:.1f} KiB per training image):")
    print("| split | images | conversion hours (one process) | LMDB GiB | feature cache GiB |\n|---|---|---|---|---|")
    for name, n in FULL.items():
        print(f"| {name} | {n:,} | {n * per_image / 3600:.1f} | {n * per_sample / 2 ** 30:.1f} | "
              f"{n * cache / 2 ** 30:.1f} |")
    result = {"rows": rows, "per_image_s": per_image, "bytes_per_sample": per_sample,
              "cache_bytes_per_sample": cache, "metrics": metrics}
    (work / "chain.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
