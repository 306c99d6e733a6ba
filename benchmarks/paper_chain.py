"""The README's COCO commands end to end, at the paper's settings, without a download: a synthetic COCO panoptic download
(benchmarks/synthetic_downloads.py) -> convert.py coco -> train_vae.py --dataset coco --code-dim 4 -> train_ocl.py
--dataset coco --decoder diffusion --dino-weights random -> evaluate.py, each training stopped by SIGTERM after its first checkpoint and
continued with --resume, as a cluster would. Prints each command with its wall time, the conversion's throughput
and bytes per sample, DINO's feature cache bytes per sample, and both extrapolated to the full COCO download (what
the README's "the paper's own runs" quotes; benchmarks/paper_scale.py gives the time per training step).

The same for MOVi (`--dataset movi_c`): synthetic TFDS shards -> convert.py movi_c -> train_vae.py --dataset movi_c
-> train_ocl.py --dataset movi_c (STEVE + MSF) -> evaluate.py over whole clips; and for ClevrTex and VOC
(`--dataset clevrtex`, `voc`: their official layouts, SLATE + MSF).

Run: python benchmarks/paper_chain.py --work /tmp/chain                      # 500 + 50 images, 4 steps per stage
     python benchmarks/paper_chain.py --work /tmp/chain --train 3000 --val 300 --steps 10
     python benchmarks/paper_chain.py --work /tmp/movi --dataset movi_c --train 100 --val 10
     python benchmarks/paper_chain.py --work /tmp/voc --dataset voc --convert-workers 2
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

# tiny: on the CPU, so that a step takes longer than the SIGTERM takes to arrive (a stop with steps left)
TINY_VAE = ["--channels", "16", "--batch-size", "4", "--device", "cpu"]
TINY_OCL = ["--size", "class", "--batch-size", "2", "--device", "cpu"]


def folder_bytes(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run(cmd, log, stop_at=None, out=None):
    """Run cmd (a list) to its end; with stop_at, send SIGTERM once out/step_<stop_at>.pt exists and then continue
    the run with --resume. Returns (wall seconds of all of it, the step it stopped at or None)."""
    start, stopped, sent = time.time(), None, False
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        if stop_at is not None:
            while not (Path(out) / f"step_{stop_at:07d}.pt").exists() and proc.poll() is None:
                time.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # as a scheduler stops a job: the step ends, last.pt is written
                sent = True
        code = proc.wait()
        if sent and code == 1 and (Path(out) / "last.pt").exists():  # stopped as asked: continue it
            import torch
            stopped = torch.load(Path(out) / "last.pt", map_location="cpu", weights_only=True)["step"]
            print(f"  stopped by SIGTERM after step {stopped}; continuing with --resume", flush=True)
            code = subprocess.run(cmd + ["--resume"], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        elif stop_at is not None and code == 0:
            print("  finished before SIGTERM reached it (steps faster than the wait): not resumed", flush=True)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:2])} failed (exit {code}): see {log}")
    return time.time() - start, stopped


# per dataset: the synthetic download's writer and splits, the README's stage-1 and stage-2 flags, the official
# download's sizes for the extrapolation (samples of train and val: COCO 2017 images, MOVi-C scenes of 24 frames)
CHAINS = {
    "coco": dict(write=synthetic_downloads.write_coco, splits=("train", "val"), vae=["--code-dim", "4"],
                 ocl=["--decoder", "diffusion"], full={"train2017": 118_287, "val2017": 5_000}, unit="images"),
    "clevrtex": dict(write=synthetic_downloads.write_clevrtex, splits=("train", "val"), vae=[],
                     ocl=["--decoder", "transformer"], full={"train": 40_000, "val": 5_000, "test": 5_000},
                     unit="images"),
    "voc": dict(write=synthetic_downloads.write_voc, splits=("train", "val"), vae=[], ocl=["--decoder", "transformer"],
                full={"train": 1_464, "val": 1_449}, unit="images"),
    "movi_c": dict(write=synthetic_downloads.write_movi, splits=("train", "validation"), vae=[],
                   ocl=["--decoder", "transformer"], full={"train": 9_737, "validation": 250}, unit="scenes"),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="a new folder for the download, the dataset and the runs")
    p.add_argument("--dataset", default="coco", choices=list(CHAINS),
                   help="coco: SlotDiffusion + MSF (the README's COCO commands); movi_c: STEVE + MSF on clips")
    p.add_argument("--train", type=int, default=500, help="synthetic training images (MOVi: scenes)")
    p.add_argument("--val", type=int, default=50, help="synthetic validation images (MOVi: scenes)")
    p.add_argument("--steps", type=int, default=4, help="training steps per stage (stopped after the first checkpoint, resumed)")
    p.add_argument("--convert-workers", type=int, default=0,
                   help="convert.py --workers: processes that prepare the samples (0: one process)")
    p.add_argument("--quick", action="store_true",
                   help="the stages only: no stop and resume, no feature cache (the COCO and MOVi chains test those)")
    p.add_argument("--tiny", action="store_true", help="small images, widths and batches: the chain in seconds")
    args = p.parse_args(argv)
    work, chain, name = Path(args.work), CHAINS[args.dataset], args.dataset
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"--work {work} is not empty; give a new folder")
    work.mkdir(parents=True, exist_ok=True)
    log, py, steps = work / "chain.log", sys.executable, max(2, args.steps)
    # the first checkpoint comes early and every step writes one after it, so that SIGTERM, sent when that first
    # checkpoint appears, finds steps left even on a loaded machine (a signal arriving late stops a later step)
    first = max(1, steps // 4)
    t = time.time()
    size = ({"long_side": 160 if args.tiny else 640} if name == "coco" else
            {"res": 64, "frames": 8} if args.tiny and name == "movi_c" else {})
    chain["write"](work / "download", dict(zip(chain["splits"], (args.train, args.val))), **size)
    rows = [("synthetic download (not part of a real run)", f"{args.train} + {args.val} {chain['unit']}",
             time.time() - t)]

    res = ["--resolution", "64"] if args.tiny and name == "movi_c" else []
    seconds, _ = run([py, "convert.py", name, "--src", str(work / "download"), "--out", str(work / "data" / name),
                      *res, "--workers", str(args.convert_workers)], log)
    lmdb = folder_bytes(work / "data" / name)
    metas = {s: data.read_meta(work / "data" / name / s) for s in data.splits_in(work / "data" / name)
             if s != "select"}  # ClevrTex: test too
    kept = {s: m["count"] for s, m in metas.items()}
    sources = sum(kept.values()) + sum(v for m in metas.values() for k, v in m["filtered"].items()
                                       if k.endswith(("_dropped", "_skipped")))  # every picture or scene read
    per_source, per_sample = seconds / sources, lmdb / sum(kept.values())
    rows.append((f"convert.py {name} --workers {args.convert_workers}",
                 f"{sources / seconds:.2f} {chain['unit']}/s, {per_sample / 1024:.1f} KiB per kept sample "
                 f"({' + '.join(str(n) for n in kept.values())} kept)", seconds))

    runs, common = work / "runs", ["--dataset", name, "--data-root", str(work / "data"), "--ckpt-every", str(first),
                                   "--val-every", str(steps), "--val-batches", "1", "--log-every", "1"]
    vae, stops, stop = runs / "vae", {}, None if args.quick else first
    seconds, stops["vae"] = run([py, "train_vae.py", *chain["vae"], "--steps", str(steps), "--out", str(vae), *common,
                                 *res, *(TINY_VAE if args.tiny else [])], log, stop_at=stop, out=vae)
    rows.append((f"train_vae.py --dataset {name} {' '.join(chain['vae'])}".rstrip(),
                 f"{steps} steps" + (f", stopped after {stops['vae']}, resumed" if stop else ""), seconds))
    ocl = runs / "ocl"
    seconds, stops["ocl"] = run([py, "train_ocl.py", *chain["ocl"], "--dino-weights", "random", "--vae-ckpt",
                            str(vae / "best.pt"), "--steps", str(steps), "--out", str(ocl), *common,
                            *(TINY_OCL if args.tiny else [])], log, stop_at=stop, out=ocl)
    rows.append((f"train_ocl.py --dataset {name} {' '.join(chain['ocl'])}",
                 f"{steps} steps" + (f", stopped after {stops['ocl']}, resumed" if stop else ""), seconds))
    seconds, _ = run([py, "evaluate.py", "--ckpt", str(ocl / "best.pt"), "--json", str(work / "metrics.json")], log)
    metrics = json.loads((work / "metrics.json").read_text())["metrics"]
    rows.append(("evaluate.py", f"ARI {100 * metrics['ari']['mean']:.2f} on {metrics['ari']['count']} val "
                                f"{chain['unit']}", seconds))
    cache = None
    video = chain["unit"] == "scenes"  # MOVi: clips
    if not video and not args.quick:  # DINO's feature cache (--cache-features) of the training images: bytes per image
        seconds, _ = run([py, "train_ocl.py", "--decoder", "mlp", "--dino-weights", "random", "--cache-features",
                          "--steps", "1", "--out", str(runs / "dinosaur"), *common, *(TINY_OCL if args.tiny else [])],
                         log)
        cached = kept["train"] - len(data.select_rows(kept["train"]))  # the training view (no select)
        cache = folder_bytes(work / "data" / f"{name}_features") / cached  # bytes per cached image
        rows.append(("train_ocl.py --decoder mlp --cache-features", f"feature cache {cache / 1024:.1f} KiB per "
                                                                     f"training image", seconds))

    print("\n| step | what | wall s |\n|---|---|---|")
    for step_name, what, s in rows:
        print(f"| {step_name} | {what} | {s:.1f} |")
    procs = f"{args.convert_workers} conversion processes" if args.convert_workers else "one conversion process"
    print(f"\nExtrapolated to the official {name} download ({procs} at this machine's throughput, "
          f"{per_sample / 1024:.1f} KiB per stored sample):")
    print(f"| split | {chain['unit']} | conversion hours | LMDB GiB | feature cache GiB |\n|---|---|---|---|---|")
    for split, n in chain["full"].items():
        print(f"| {split} | {n:,} | {n * per_source / 3600:.1f} | {n * per_sample / 2 ** 30:.1f} | "
              + (f"{n * cache / 2 ** 30:.1f} |" if cache else "- |"))
    if video:  # --cache-features is refused for clips; what it would hold, by the same arithmetic
        frame = 384 * (128 // 8) ** 2 * 2  # DINO's (384, 16, 16) fp16 map of one 128 px frame
        frames = 24
        print(f"\nThe feature cache is refused for clips (one DINO map per image; a video step crops its frames per "
              f"step): all {frames} frames of a scene would take {frames * frame / 2 ** 20:.1f} MiB, "
              f"{chain['full']['train'] * frames * frame / 2 ** 30:.0f} GiB for the train split.")
    result = {"dataset": name, "rows": rows, "stopped": stops, "per_source_s": per_source, "bytes_per_sample": per_sample,
              "cache_bytes_per_sample": cache, "metrics": metrics}
    (work / "chain.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
