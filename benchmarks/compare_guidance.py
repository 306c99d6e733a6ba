"""Does MSF help? The paper's comparison of guidances (Tab. 1-2), its ablations (Tab. 5-6) and its size split
(Tab. 7) in miniature, over seeds: every VAE variant is trained, an OCL model is trained on its guidance, best.pt
(chosen on the `select` split) is scored on `val`, and the cells are gathered into one Markdown table.

Run:  python benchmarks/compare_guidance.py                        # the main table: 3 seeds (hours on a 2-core CPU)
      python benchmarks/compare_guidance.py --cells ablations --seeds 0,1
      python benchmarks/compare_guidance.py --cells msf,vqvae --decoders transformer --seeds 0   # a few cells
      python benchmarks/compare_guidance.py --table                # only rebuild the table from the cells on disk
      python benchmarks/compare_guidance.py --dataset clevrtex --data-root data --vae-steps 30000 --ocl-steps 50000

Resumable and incremental: each finished (variant, decoder, seed) cell is one JSON file in --results (never
recomputed; delete it to recompute); an interrupted training run is continued with --resume. Stopped and restarted
any number of times, it ends in the same table. The runs themselves go to --work (not committed).

Pairing: seed k of every variant uses --seed k in both stages, so all see the same data order, and the OCL model's
encoder, queries and Slot Attention start from the same weights (train_ocl seeds again after loading the VAE).
Budget: the quick start's (VAE 400 steps, OCL 3,200 steps at batch 16) unless --vae-steps / --ocl-steps say otherwise.
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# variant -> (train_vae.py flags, train_ocl.py flags, what it is). The VAE flags decide which VAE a cell trains on;
# variants with the same VAE flags (msf, msf-g12, msf-g2) share one VAE run per seed.
VARIANTS = {
    "vqvae": (["--vae", "vqvae"], [], "VQ-VAE, the paper's recipe (no stabilisers): 4,096 codes"),
    "vqvae+stab": (["--vae", "vqvae", "--stabilisers", "on"], [],
                   "VQ-VAE with the stabilisers MSF gets (annealed residual, Gumbel matching, code replacing)"),
    "gdr": (["--vae", "gdr"], [], "GDR@g2: 2 groups of 64 codes, invertible projection"),
    "multiscale": (["--vae", "multiscale"], [], "naive multi-scale: pyramid + one shared 4,096-code codebook (3.2)"),
    "msf": ([], [], "MSF: inter/intra-scale fusion (3.3)"),
    # Tab. 5: fusion switches, shared scale-variant codebook, number of scales, guide scales; Tab. 6: fusions
    "msf-nointer": (["--no-inter"], [], "MSF without inter-scale fusion"),
    "msf-nointra": (["--no-intra"], [], "MSF without intra-scale fusion (one 4,096-code shared codebook)"),
    "msf-svshared": (["--sv-shared"], [], "MSF with one scale-variant codebook for all scales"),
    "msf-N2": (["--scales", "2"], [], "MSF with N = 2 scales"),
    "msf-N4": (["--scales", "4"], [], "MSF with N = 4 scales"),
    "msf-g12": ([], ["--guide-scales", "1,2"], "MSF, guidance at scales 1 and 2"),
    "msf-g2": ([], ["--guide-scales", "2"], "MSF, guidance at scale 2 only"),
    "msf-concat": (["--fusion", "concat"], [], "channel-concat fusion of continuous scales (Tab. 6)"),
    "msf-sum": (["--fusion", "sum"], [], "element-wise-sum fusion of continuous scales (Tab. 6)"),
}
MAIN = ["vqvae", "vqvae+stab", "gdr", "multiscale", "msf"]
ABLATIONS = ["msf-nointer", "msf-nointra", "msf-svshared", "msf-N2", "msf-N4", "msf-g12", "msf-g2", "msf-concat",
             "msf-sum"]
DIFFUSION = ["vqvae+stab", "gdr", "msf"]  # SlotDiffusion on VQ-VAE (the healthy row), GDR and MSF (Tab. 1-2)
# The baseline of the paired differences, fixed before any cell ran: the VQ-VAE with the same stabilisers as MSF
# (the paper's recipe collapses at CPU budgets; a comparison against a collapsed codebook says nothing about MSF).
BASELINE = "vqvae+stab"
METRICS = ("ari", "ari_fg", "miou", "mbo")


def cells(args):
    """(variant, decoder, seed) of the cells asked for, seed-major: a partial run has every variant of seed 0 first."""
    names = MAIN if args.cells == "main" else ABLATIONS if args.cells == "ablations" else \
        MAIN + ABLATIONS if args.cells == "all" else args.cells.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    out = []
    for seed in args.seeds:
        for decoder in args.decoders:
            for name in names:
                if decoder == "diffusion" and name not in DIFFUSION and args.cells in ("main", "all"):
                    continue  # the main table's diffusion rows are those of the paper
                out.append((name, decoder, seed))
    return out


def run(cmd, log):
    """A script of the project in its own process, its output appended to `log`; a failure stops everything."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")


def train(script, out, flags, steps, log):
    """Train into `out` unless it already finished there; continue it (--resume) if it was interrupted."""
    import torch
    last = out / "last.pt"
    if last.exists():
        if torch.load(last, map_location="cpu", weights_only=True)["step"] >= steps:
            return 0.0
        flags = [*flags, "--resume"]
    start = time.time()
    run([str(ROOT / script), *flags, "--out", str(out)], log)
    return time.time() - start


def run_cell(args, name, decoder, seed):
    vae_flags, ocl_flags, _ = VARIANTS[name]
    code = 4 if decoder == "diffusion" else 256
    common = ["--dataset", args.dataset, "--data-root", str(args.data_root), "--seed", str(seed)]
    vae_key = "_".join(vae_flags).replace("-", "") or "msf"
    vae_dir = args.work / f"vae_{vae_key}_c{code}_s{seed}"
    ocl_dir = args.work / f"ocl_{name}_{decoder}_s{seed}"
    log = args.work / "log.txt"
    vae_time = train("train_vae.py", vae_dir, [*common, *vae_flags, "--code-dim", str(code), "--steps",
                                               str(args.vae_steps), "--log-every", "100"], args.vae_steps, log)
    ocl_time = train("train_ocl.py", ocl_dir, [*common, *ocl_flags, "--decoder", decoder, "--vae-ckpt",
                                               str(vae_dir / "best.pt"), "--steps", str(args.ocl_steps),
                                               "--log-every", "200"], args.ocl_steps, log)
    scores = {}
    for kind, ckpt in (("vae", vae_dir / "best.pt"), ("ocl", ocl_dir / "best.pt")):
        target = args.work / f"{ckpt.parent.name}_val.json"
        if not target.exists():
            run([str(ROOT / "evaluate.py"), "--ckpt", str(ckpt), "--json", str(target)], log)
        scores[kind] = json.loads(target.read_text())
    import torch
    ckpt = torch.load(ocl_dir / "best.pt", map_location="cpu", weights_only=True)
    return {"variant": name, "decoder": decoder, "seed": seed, "about": VARIANTS[name][2],
            "vae_flags": vae_flags, "ocl_flags": ocl_flags, "vae_steps": args.vae_steps, "ocl_steps": args.ocl_steps,
            "best_step": ckpt["step"], "metrics": {k: v["mean"] for k, v in scores["ocl"]["metrics"].items()},
            "counts": {k: v["count"] for k, v in scores["ocl"]["metrics"].items()},
            "vae": {"reconstruction_mse": scores["vae"]["reconstruction_mse"],
                    "codebook_usage": scores["vae"]["codebook_usage"], "separability": scores["vae"]["separability"]},
            "minutes": {"vae": round(vae_time / 60, 2), "ocl": round(ocl_time / 60, 2)},
            "machine": f"{platform.node()} | {platform.processor() or platform.machine()} | {os.cpu_count()} cpus | "
                       f"torch {torch.__version__}",
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip()}


# -----------------------------------------------------------------------------
# The table


def mean_std(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def usage(vae):
    """Mean perplexity and the smallest share of codes used over the VAE's codebooks and scales."""
    u = vae["codebook_usage"]
    perp = [v for k, v in u.items() if k.startswith("perplexity")]
    used = [v for k, v in u.items() if k.startswith("used")]
    return statistics.mean(perp), min(used)


def table(results):
    """Markdown: one row per (variant, decoder), mean +- std over seeds (x100), the paired difference to the VQ-VAE
    row of the same decoder and seeds, the VAE's health (reconstruction, codebook use), separability (Tab. 4), the
    size split (Tab. 7) and the minutes per seed."""
    found = [json.loads(p.read_text()) for p in sorted(results.glob("*__*__s*.json"))]
    if not found:
        return "(no cells yet)\n"
    rows, order = {}, [n for n in VARIANTS]
    for c in found:
        rows.setdefault((c["decoder"], c["variant"]), {})[c["seed"]] = c
    lines = [f"| decoder | guidance | seeds | ARI | ARIfg | mIoU | mBO | ARIfg - {BASELINE} (paired) | recon (sum) | "
             "perplexity / used | inter / intra (Tab. 4) | mIoU S / M / L | min / seed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (decoder, name), by_seed in sorted(rows.items(), key=lambda kv: (kv[0][0] != "transformer",
                                                                         order.index(kv[0][1]))):
        seeds = sorted(by_seed)
        get = lambda k: [100 * by_seed[s]["metrics"][k] for s in seeds]  # noqa: E731
        base = rows.get((decoder, BASELINE), {})  # the same decoder and seeds on the baseline's guidance
        paired = [100 * (by_seed[s]["metrics"]["ari_fg"] - base[s]["metrics"]["ari_fg"]) for s in seeds if s in base]
        diff = "-" if name == BASELINE or not paired else mean_std(paired) + f" ({len(paired)})"
        recon = [sum(by_seed[s]["vae"]["reconstruction_mse"].values()) for s in seeds]
        perp, used = zip(*(usage(by_seed[s]["vae"]) for s in seeds))
        sep = [(by_seed[s]["vae"]["separability"]["inter_cluster"], by_seed[s]["vae"]["separability"]["intra_cluster"])
               for s in seeds]
        sizes = " / ".join(mean_std([100 * by_seed[s]["metrics"].get(f"miou_{k}", math.nan) for s in seeds])
                           for k in ("small", "medium", "large"))
        minutes = statistics.mean(by_seed[s]["minutes"]["vae"] + by_seed[s]["minutes"]["ocl"] for s in seeds)
        lines.append(f"| {decoder} | {name} | {len(seeds)} | {mean_std(get('ari'))} | {mean_std(get('ari_fg'))} | "
                     f"{mean_std(get('miou'))} | {mean_std(get('mbo'))} | {diff} | {statistics.mean(recon):.4f} | "
                     f"{statistics.mean(perp):.1f} / {min(used):.2f} | "
                     f"{statistics.mean(a for a, _ in sep):.3f} / {statistics.mean(b for _, b in sep):.3f} | "
                     f"{sizes} | {minutes:.1f} |")
    first = found[0]
    return ("\n".join(lines) + "\n\n"
            f"Budget: VAE {first['vae_steps']} steps, OCL {first['ocl_steps']} steps; best.pt chosen on `select`, scored "
            f"on all of `val`; x100, mean +- std over seeds. Machine: {first['machine']}.\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="shapes")
    p.add_argument("--data-root", type=Path, default=ROOT / "data")
    p.add_argument("--cells", default="main", help="main, ablations, all, or variant names separated by commas")
    p.add_argument("--decoders", default="transformer,diffusion", help="transformer and/or diffusion")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--ocl-steps", type=int, default=3200)
    p.add_argument("--results", type=Path, default=None, help="cells and table (default results/compare_<dataset>)")
    p.add_argument("--work", type=Path, default=None, help="training runs (default runs/compare_<dataset>)")
    p.add_argument("--table", action="store_true", help="only write the table from the cells on disk")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.decoders = args.decoders.split(",")
    args.results = args.results or ROOT / "results" / f"compare_{args.dataset}"
    args.work = args.work or ROOT / "runs" / f"compare_{args.dataset}"
    args.results.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.table:
        for name, decoder, seed in cells(args):
            path = args.results / f"{name}__{decoder}__s{seed}.json"
            if path.exists():
                continue
            print(f"cell {name} / {decoder} / seed {seed} ...", flush=True)
            cell = run_cell(args, name, decoder, seed)
            path.write_text(json.dumps(cell, indent=1))
            print(f"  ARIfg {100 * cell['metrics']['ari_fg']:.2f} -> {path}", flush=True)
            (args.results / "table.md").write_text(table(args.results))
    text = table(args.results)
    (args.results / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
