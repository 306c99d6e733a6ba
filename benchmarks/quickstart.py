"""Runs the README's bare quick start (python train_vae.py && python train_ocl.py && python evaluate.py) from scratch
in an empty folder, and records the wall time of every command and the final metrics.

Target: the whole quick start within 20 minutes on a 2-core CPU, ARIfg >= 0.60 on shapes.
Video: `--dataset shapes_video` runs stage 1 + STEVE + MSF (+ evaluate) the same way; target: within 30
minutes, video ARIfg over whole clips >= 0.50. `--ocl-args "--queries gaussian"` is the same run without the boxes.

SlotDiffusion: `--vae-args "--code-dim 4" --ocl-args "--decoder diffusion"` runs the README's two SlotDiffusion
commands the same way (its recipe: 4,800 steps; target: stage 2 within 30 minutes, ARIfg >= 0.50).

Run: python benchmarks/quickstart.py [--workdir /tmp/msf-quickstart] [--keep]
     python benchmarks/quickstart.py --dataset shapes_video [--ocl-args "--queries gaussian"] [--seed 1]
Writes <workdir>/quickstart.json and prints a table; the figures stay in <workdir>/runs/ with --keep.
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None, help="empty folder to run in (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the folder (data, runs, figures) afterwards")
    p.add_argument("--dataset", default="shapes", choices=["shapes", "shapes_video"], help="the built-in dataset")
    p.add_argument("--vae-args", default="", help="extra flags of train_vae.py, e.g. \"--code-dim 4\"")
    p.add_argument("--ocl-args", default="", help="extra flags of train_ocl.py, e.g. \"--queries gaussian\"")
    p.add_argument("--seed", type=int, default=0, help="--seed of both training scripts")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="msf-quickstart-"))
    work.mkdir(parents=True, exist_ok=True)
    commands = [["train_vae.py"], ["train_ocl.py"], ["evaluate.py", "--viz", "8", "--json", str(work / "metrics.json")]]
    if args.dataset != "shapes" or args.vae_args or args.ocl_args or args.seed:  # else the bare quick start
        common = ["--dataset", args.dataset, "--seed", str(args.seed)]
        commands = [["train_vae.py", *common, *args.vae_args.split()],
                    ["train_ocl.py", *common, "--out", "runs/ocl", *args.ocl_args.split()],
                    ["evaluate.py", "--ckpt", "runs/ocl/best.pt", "--viz", "2" if args.dataset == "shapes_video" else "8",
                     "--json", str(work / "metrics.json")]]
    times = {}
    for cmd in commands:
        start = time.time()
        print(f"$ python {' '.join(cmd)}", flush=True)
        subprocess.run([sys.executable, str(ROOT / cmd[0]), *cmd[1:]], cwd=work, check=True)
        times[cmd[0]] = time.time() - start
    metrics = json.loads((work / "metrics.json").read_text())["metrics"]
    result = {"seconds": times, "total_minutes": sum(times.values()) / 60,
              "metrics_x100": {k: round(100 * v["mean"], 2) for k, v in metrics.items()}}
    (work / "quickstart.json").write_text(json.dumps(result, indent=1))
    print("\n| command | minutes |\n|---|---|")
    for k, v in times.items():
        print(f"| python {k} | {v / 60:.1f} |")
    print(f"| total | {result['total_minutes']:.1f} |")
    keys = [k for k in ("ari", "ari_fg", "miou", "mbo", "ari_fg_frame", "ari_fg_later") if k in result["metrics_x100"]]
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    print("| " + " | ".join(f"{result['metrics_x100'][k]:.2f}" for k in keys) + " |")
    print(f"\nfigures: {work / 'runs'}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
