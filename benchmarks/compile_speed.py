"""torch.compile against eager for the quick start's stage 2 (`python train_ocl.py --compile`): the same steps from the
same seed on the same frozen VAE, one run after the other in this invocation, each in its own process. Prints the
seconds per step of each (the compiled run's first steps, which pay for the compilation, are counted apart), the
ratio, and the digits each reaches: the training loss at the last step and the validation metrics at the end.

Compiled code sums floats in another order than eager code, so the digits may differ in the last places and then
drift apart over steps the way two machines' runs do (results/2026-11-26-machines.md); what must not differ is the
order of magnitude of the loss and the metrics.

Run: python benchmarks/compile_speed.py --vae-ckpt runs/vae_shapes_msf_c256/best.pt            # 200 steps each
     OMP_NUM_THREADS=1 python benchmarks/compile_speed.py --vae-ckpt ... --steps 200 --keep runs/compile_speed
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(mode, args, out):
    """Train `args.steps` steps eager or compiled into `out`; returns (wall seconds, the log's rows)."""
    cmd = [sys.executable, str(ROOT / "train_ocl.py"), "--vae-ckpt", str(args.vae_ckpt), "--steps", str(args.steps),
           "--val-every", str(args.steps), "--log-every", str(args.log_every), "--seed", str(args.seed),
           "--workers", "0", "--device", "cpu", "--out", str(out), *(["--compile"] if mode == "compiled" else [])]
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the {mode} run failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.time() - start, rows(out / "metrics.jsonl")


def s_per_step(log, first):
    """Seconds per step between the log line of step `first` and the last training line (the compiled run's first
    steps compile, so the rate is taken after them)."""
    train = [r for r in log if "loss" in r]
    a = next(r for r in train if r["step"] >= first)
    b = train[-1]
    return (b["time"] - a["time"]) / max(b["step"] - a["step"], 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae-ckpt", type=Path, required=True, help="the quick start's stage 1 (python train_vae.py)")
    p.add_argument("--steps", type=int, default=200, help="steps of each run")
    p.add_argument("--log-every", type=int, default=25, help="log interval; the rate is taken from the second log line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=Path, default=None, help="keep both runs in this folder (default: a temporary one)")
    args = p.parse_args(argv)
    if not args.vae_ckpt.exists():
        sys.exit(f"no VAE checkpoint at {args.vae_ckpt}; train one first: python train_vae.py")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        result = {}
        for mode in ("eager", "compiled"):
            wall, log = run(mode, args, folder / mode)
            val = [r for r in log if "val_ari_fg" in r][-1]
            loss = [r for r in log if "loss" in r][-1]
            result[mode] = {"wall_s": wall, "s_step": s_per_step(log, args.log_every), "loss": loss["loss"],
                            "loss_step": loss["step"], **{k[4:]: v for k, v in val.items() if k.startswith("val_")}}
    e, c = result["eager"], result["compiled"]
    print(f"{args.steps} steps of the quick start's stage 2 from seed {args.seed}, eager then compiled")
    print(f"{'':>9} {'s/step':>8} {'wall s':>8} {'loss@' + str(e['loss_step']):>10} {'ARI':>7} {'ARIfg':>7} "
          f"{'mIoU':>7} {'mBO':>7}")
    for mode, r in result.items():
        print(f"{mode:>9} {r['s_step']:8.3f} {r['wall_s']:8.1f} {r['loss']:10.5f} {100 * r['ari']:7.2f} "
              f"{100 * r['ari_fg']:7.2f} {100 * r['miou']:7.2f} {100 * r['mbo']:7.2f}")
    print(f"compiled / eager: {c['s_step'] / e['s_step']:.2f}x per step after the first {args.log_every} steps, "
          f"{c['wall_s'] / e['wall_s']:.2f}x wall time in all (start-up and compilation included)")
    return result


if __name__ == "__main__":
    main()
