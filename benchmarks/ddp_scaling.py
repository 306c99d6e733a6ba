"""Training throughput (samples/s) with 1, 2, ... torchrun processes, side by side in one run.

Each row launches `python -m torch.distributed.run --standalone --nproc_per_node N <script> ...` on the built-in
shapes data (a small copy written to a temporary folder), with a fixed batch per process (weak scaling: the
global batch is N x --per-process-batch), and reads the trainer's own steady-state s/step (steps after the first
--warmup are timed). CPU: gloo, every process gets cores/N threads. GPU: nccl, one GPU per process.

Run: python benchmarks/ddp_scaling.py                          # CPU, 1 and 2 gloo processes, VAE and OCL
     python benchmarks/ddp_scaling.py --device cuda --nproc 1,2,4,8 --resolution 128
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402


def timed_run(script, nproc, args, work, threads, env_extra):
    out = work / f"{Path(script).stem}_n{nproc}_{time.time_ns()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *args, "--out", str(out), "--log-every", "1", "--keep", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **env_extra}
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return out


def steady_seconds_per_step(out, warmup):
    """Mean wall time per step after the first `warmup` steps, from the 'time' field (seconds since the training
    loop started) that the trainer writes with every logged step of metrics.jsonl."""
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    t = {r["step"]: r["time"] for r in rows if "time" in r}
    last = max(t)
    return (t[last] - t[warmup]) / (last - warmup)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--nproc", default="1,2", help="process counts to compare")
    p.add_argument("--scripts", default="train_vae.py,train_ocl.py")
    p.add_argument("--per-process-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--size", default="cpu", choices=["cpu", "paper"], help="OCL model widths")
    args = p.parse_args()
    counts = [int(n) for n in args.nproc.split(",")]
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="msf-ddp-"))
    root = work / "data"
    data.write_shapes(root, args.resolution, seed=0, counts={"train": args.per_process_batch * max(counts) * 8,
                                                             "val": 64}, quiet=True)
    common = ["--data-root", str(root), "--device", args.device, "--val-every", str(10 ** 6)]
    # a small VAE for the OCL rows (its quality does not matter for throughput)
    vae_out = work / "vae"
    subprocess.run([sys.executable, str(ROOT / "train_vae.py"), *common, "--resolution", str(args.resolution),
                    "--steps", "2", "--out", str(vae_out), "--keep", "0"], check=True, capture_output=True, cwd=work)
    rows = []
    for script in args.scripts.split(","):
        extra = ["--resolution", str(args.resolution)] if script == "train_vae.py" else \
            ["--vae-ckpt", str(vae_out / "best.pt"), "--size", args.size]
        base = None
        for n in counts:
            threads = max(1, cores // n) if args.device == "cpu" else 4
            out = timed_run(script, n, [*common, *extra, "--steps", str(args.steps),
                                        "--batch-size", str(args.per_process_batch * n)], work, threads, {})
            sps = steady_seconds_per_step(out, args.warmup)
            samples = args.per_process_batch * n / sps
            base = base or samples
            rows.append((script, n, args.per_process_batch * n, threads, sps, samples, samples / base))
    print(f"\n{args.device}, {cores} cores, {args.resolution}px, batch {args.per_process_batch} per process, "
          f"steps {args.warmup + 1}..{args.steps} timed\n")
    print("| script | processes | global batch | threads/process | s/step | samples/s | vs 1 process |")
    print("|---|---|---|---|---|---|---|")
    for script, n, gb, th, sps, samples, ratio in rows:
        print(f"| {script} | {n} | {gb} | {th} | {sps:.3f} | {samples:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
