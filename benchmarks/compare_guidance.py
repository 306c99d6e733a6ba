"""Does MSF help? The paper's comparison of guidances (Tab. 1-2), its ablations (Tab. 5-6) and its size split
(Tab. 7) in miniature, over seeds: every VAE variant is trained, an OCL model is trained on its guidance, best.pt
(chosen on the `select` split) is scored on `val`, and the cells are gathered into one Markdown table.

Run:  python benchmarks/compare_guidance.py                        # the main table: 3 seeds (hours on a 2-core CPU)
      python benchmarks/compare_guidance.py --cells ablations --seeds 0,1
      python benchmarks/compare_guidance.py --cells msf,vqvae --decoders transformer --seeds 0   # a few cells
      python benchmarks/compare_guidance.py --cells all --device cuda --jobs 15   # on one GPU: 15 cells side by side
      python benchmarks/compare_guidance.py --cells plain --decoders diffusion   # SlotDiffusion's published decoder
      python benchmarks/compare_guidance.py --table                # only rebuild the table from the cells on disk
      python benchmarks/compare_guidance.py --dataset clevrtex --data-root data --vae-steps 30000 --ocl-steps 50000
      python benchmarks/compare_guidance.py --dataset shapes_video --cells vqvae+stab,msf --decoders transformer   # STEVE

Resumable and incremental: each finished (variant, decoder, seed) cell is one JSON file in --results (never
recomputed; delete it to recompute); an interrupted training run is continued with --resume. Stopped and restarted
any number of times, it ends in the same table. The runs themselves go to --work (not committed), each with its log
beside it (<run>.log). A cell that fails is named with its log, the others go on, and the next invocation retries it.
Each cell records where it ran (the GPU's name or the CPU, and how many cells ran side by side); the table says it
per row, because a GPU (AMP, other kernels) gives other digits than a CPU for the same seed.

Pairing: seed k of every variant uses --seed k in both stages, so all see the same data order, and the OCL model's
encoder, queries and Slot Attention start from the same weights (train_ocl seeds again after loading the VAE).
Budget: each decoder's recipe (shapes: the quick start's, VAE 400 steps, OCL 3,200 steps at batch 16, SlotDiffusion
4,800; shapes_video: the video preset, STEVE for 6,000 steps) unless --vae-steps / --ocl-steps say otherwise;
SlotDiffusion is the recipe's (shapes: x0 prediction and the mask gate, ours), the -plain rows its authors' decoder. Video cells add ARIfg_1+
(ARIfg over the frames after the first, whose boxes the model is given) to the table. A recipe chosen on seeds 0-2
(stats.CHOSEN_ON) keeps its other seeds apart: rows and comparisons named "(test)".
"""
import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import data  # noqa: E402  (one-line argument errors)
import stats  # noqa: E402  (benchmarks/stats.py: paired intervals, verdicts, binding)

AUTHORS_SD = ["--diffusion-prediction", "eps", "--no-mask-gate"]  # SlotDiffusion's own decoder (train_ocl.py flags)
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
    # the reference methods as their authors publish them, on MSF's guidance
    "msf-sysbinder": ([], ["--slot-attention", "sysbinder"], "MSF guidance, SysBinder instead of Slot Attention"),
    # SlotDiffusion's decoder as its authors publish it (the noise predicted, every position reading every slot);
    # the recipe's on shapes predicts x0 through Slot Attention's masks (train_ocl.RECIPES, --mask-gate: ours)
    "vqvae+stab-plain": (["--vae", "vqvae", "--stabilisers", "on"], AUTHORS_SD,
                         "stabilised VQ-VAE guidance, SlotDiffusion's decoder as published (eps, no mask gate)"),
    "gdr-plain": (["--vae", "gdr"], AUTHORS_SD, "GDR guidance, SlotDiffusion's decoder as published (eps, no mask gate)"),
    "msf-plain": ([], AUTHORS_SD, "MSF guidance, SlotDiffusion's decoder as published (eps, no mask gate)"),
    # the recipe's two departures one at a time (msf: both; msf-plain: neither)
    "msf-x0": ([], ["--diffusion-prediction", "x0", "--no-mask-gate"], "MSF guidance, SlotDiffusion predicting x0, no gate"),
    "msf-gate": ([], ["--diffusion-prediction", "eps", "--mask-gate"], "MSF guidance, SlotDiffusion's eps with the mask gate"),
    "msf-z": ([], ["--diffusion-target", "z", *AUTHORS_SD], "MSF's encoder, SlotDiffusion diffusing Z_1 (the authors' code)"),
    "msf-scale1": ([], ["--latent-scale", "1", *AUTHORS_SD], "MSF guidance, SlotDiffusion on X unscaled (the originals' scale)"),
    "msf-z-scale1": ([], ["--diffusion-target", "z", "--latent-scale", "1", *AUTHORS_SD],
                     "MSF's encoder, SlotDiffusion on Z_1 unscaled: the authors' SlotDiffusion"),
}
MAIN = ["vqvae", "vqvae+stab", "gdr", "multiscale", "msf"]
ABLATIONS = ["msf-nointer", "msf-nointra", "msf-svshared", "msf-N2", "msf-N4", "msf-g12", "msf-g2", "msf-concat",
             "msf-sum"]
DIFFUSION = ["vqvae+stab", "gdr", "msf"]  # SlotDiffusion on VQ-VAE (the healthy row), GDR and MSF (Tab. 1-2)
PLAIN = [f"{n}-plain" for n in DIFFUSION]  # the same with the authors' decoder: `--cells plain --decoders diffusion`
# The baseline of the paired differences, fixed before any cell ran: the VQ-VAE with the same stabilisers as MSF
# (the paper's recipe collapses at CPU budgets; a comparison against a collapsed codebook says nothing about MSF).
BASELINE = "vqvae+stab"
DIFFUSION_ONLY = {"--diffusion-target", "--latent-scale", "--diffusion-prediction", "--mask-gate",
                  "--no-mask-gate"}  # train_ocl.py flags that only the diffusion decoder reads
METRICS = ("ari", "ari_fg", "miou", "mbo")
# A cell of a seed its recipe was not chosen on (stats.CHOSEN_ON) tests the recipe, so the table gives it rows and
# comparisons of its own ("msf (test)") instead of averaging it in with the seeds that chose.
TEST = " (test)"  # the row-name suffix of a recipe's test seeds


def cells(args):
    """(variant, decoder, seed) of the cells asked for, in the order they start: the main table before the ablations
    (`--cells all`), each seed-major, so a partial run has every variant of seed 0 first."""
    groups = {"main": [MAIN], "ablations": [ABLATIONS], "all": [MAIN, ABLATIONS], "plain": [PLAIN]}.get(args.cells)
    if groups is None:
        groups = [args.cells.split(",")]
    unknown = [n for names in groups for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    out = []
    for names in groups:
        for seed in args.seeds:
            for decoder in args.decoders:
                for name in names:
                    if args.cells in ("main", "ablations", "all") and decoder == "diffusion" and name not in DIFFUSION:
                        continue  # the diffusion rows are those of the paper (Tab. 1-2); ablations use SLATE (Tab. 5-6)
                    if decoder != "diffusion" and set(VARIANTS[name][1]) & DIFFUSION_ONLY:
                        continue  # a variant of SlotDiffusion's target or scale: no cell under another decoder
                    out.append((name, decoder, seed))
    return out


class Failed(Exception):
    """A run of a project script ended with an error; the cell is left for the next invocation."""


def run(cmd, log, threads):
    """A script of the project in its own process, its output appended to `log`; a failure raises `Failed`.
    `threads`: torch's CPU threads (OMP_NUM_THREADS), fixed because the digits depend on it (results/2026-11-26-machines.md)."""
    with open(log, "a") as f:
        f.write(f"$ OMP_NUM_THREADS={threads} {' '.join(cmd)}\n")
        f.flush()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise Failed(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")


def train(script, out, flags, steps, threads):
    """Train into `out` unless it already finished there; continue it (--resume) if it was interrupted, or start it
    over (--overwrite) if it stopped before its first checkpoint. Its output goes to `out`.log (one log per run, so
    that runs side by side do not interleave).
    Returns the seconds it trained: this process's wall time plus what the earlier processes of an interrupted run
    logged; 0 for a run an earlier cell or invocation finished (a VAE that cells share counts once)."""
    import torch
    last, earlier = out / "last.pt", 0.0
    if last.exists():
        if torch.load(last, map_location="cpu", weights_only=True)["step"] >= steps:
            return 0.0
        flags, earlier = [*flags, "--resume"], logged_seconds(out / "metrics.jsonl")
    elif (out / "metrics.jsonl").exists():
        # interrupted before its first checkpoint: nothing to continue, and the folder is this runner's own
        flags = [*flags, "--overwrite"]
    start = time.time()
    run([str(ROOT / script), *flags, "--out", str(out)], out.with_suffix(".log"), threads)
    return earlier + time.time() - start


def logged_seconds(path):
    """The training seconds in a run's metrics.jsonl: each process logs "time" from its own start, so a resumed run's
    log restarts at 0; the sum of each process's last "time" (a process's start-up and its last few steps after
    its last log line are not in it)."""
    total = last = 0.0
    for line in path.read_text().splitlines() if path.exists() else []:
        t = json.loads(line)["time"]
        if t < last:  # a new process
            total += last
        last = t
    return total + last


_vae_locks, _locks_lock = {}, threading.Lock()


def vae_lock(folder):
    """One lock per VAE run: cells that share a VAE (msf, msf-g12, msf-g2) and run side by side (--jobs) wait for the
    one that trains it instead of training it twice into the same folder."""
    with _locks_lock:
        return _vae_locks.setdefault(folder, threading.Lock())


def cpu_model():
    """The CPU's model name as Linux reports it (platform.processor() is empty there), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def where(device):
    """What the runs of this invocation run on, for the cell's record and the table: the GPU's name or the CPU."""
    import torch
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return f"CPU ({cpu_model()}, {platform.machine()}, {os.cpu_count()} cores)"
    return torch.cuda.get_device_name(torch.device(device if device != "auto" else "cuda"))


def run_cell(args, name, decoder, seed):
    vae_flags, ocl_flags, _ = VARIANTS[name]
    code = 4 if decoder == "diffusion" else 256
    common = ["--dataset", args.dataset, "--data-root", str(args.data_root), "--seed", str(seed),
              "--device", args.device, "--workers", str(args.workers)]
    vae_key = "_".join(vae_flags).replace("-", "") or "msf"
    vae_dir = args.work / f"vae_{vae_key}_c{code}_s{seed}"
    ocl_dir = args.work / f"ocl_{name}_{decoder}_s{seed}"
    with vae_lock(vae_dir):
        vae_time = train("train_vae.py", vae_dir, [*common, *vae_flags, "--code-dim", str(code), "--steps",
                                                   str(args.vae_steps), "--log-every", "100"], args.vae_steps,
                         args.threads)
    ocl_time = train("train_ocl.py", ocl_dir, [*common, *ocl_flags, "--decoder", decoder, "--vae-ckpt",
                                               str(vae_dir / "best.pt"), "--steps", str(args.ocl_steps[decoder]),
                                               "--log-every", "200"], args.ocl_steps[decoder], args.threads)
    scores = {}
    for kind, ckpt, lock in (("vae", vae_dir / "best.pt", vae_lock(vae_dir)), ("ocl", ocl_dir / "best.pt", None)):
        target = args.work / f"{ckpt.parent.name}_val.json"
        with lock or contextlib.nullcontext():
            if not target.exists():
                run([str(ROOT / "evaluate.py"), "--ckpt", str(ckpt), "--device", args.device, "--json", str(target)],
                    ckpt.parent.with_suffix(".log"), args.threads)
        scores[kind] = json.loads(target.read_text())
    import torch
    ckpt = torch.load(ocl_dir / "best.pt", map_location="cpu", weights_only=True)
    return {"variant": name, "decoder": decoder, "seed": seed, "dataset": args.dataset, "about": VARIANTS[name][2],
            "vae_flags": vae_flags, "ocl_flags": ocl_flags, "vae_steps": args.vae_steps, "ocl_steps": args.ocl_steps[decoder],
            "best_step": ckpt["step"], "metrics": {k: v["mean"] for k, v in scores["ocl"]["metrics"].items()},
            "counts": {k: v["count"] for k, v in scores["ocl"]["metrics"].items()},
            "vae": {"reconstruction_mse": scores["vae"]["reconstruction_mse"],
                    "codebook_usage": scores["vae"]["codebook_usage"], "separability": scores["vae"]["separability"]},
            "minutes": {"vae": round(vae_time / 60, 2), "ocl": round(ocl_time / 60, 2)}, "threads": args.threads,
            "jobs": args.jobs, "ran_on": args.ran_on,
            "machine": f"{platform.node()} | {platform.processor() or platform.machine()} | {os.cpu_count()} cpus | "
                       f"torch {torch.__version__}",
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip()}


def write_atomic(path, text):
    """Write a file whole or not at all (a cell copied or committed mid-write must never be half a JSON)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# The table


mean_std = stats.mean_std


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
        rows.setdefault((c["decoder"], c["variant"] + part(c)), {})[c["seed"]] = c
    video = any("ari_fg_later" in c["metrics"] for c in found)  # clips: ARIfg_1+ beside ARIfg over whole clips
    lines = [f"| decoder | guidance | seeds | ARI | ARIfg | bound (ARIfg >= {stats.THRESHOLD:g}): k of n, their mean |"
             f"{' ARIfg_1+ |' if video else ''} mIoU | mBO | ARIfg - {BASELINE}: mean [95% interval] | ARIfg - msf | "
             "recon MSE (scale 1) | perplexity / used | inter / intra (Tab. 4) | mIoU S / M / L | min / seed | ran on |",
             "|---|---|---|---|---|---|" + "---|" * video + "---|---|---|---|---|---|---|---|---|---|"]
    comparisons = []
    place = lambda name: order.index(name) if name in order else len(order)  # noqa: E731  (a variant since renamed: last)
    # transformer rows first; a recipe's test rows after the rows of the seeds that chose it
    for (decoder, name), by_seed in sorted(rows.items(), key=lambda kv: (kv[0][0] != "transformer",
                                                                         kv[0][1].endswith(TEST),
                                                                         place(kv[0][1].removesuffix(TEST)),
                                                                         kv[0][1])):
        seeds = sorted(by_seed)
        get = lambda k: [100 * by_seed[s]["metrics"][k] for s in seeds]  # noqa: E731
        diff, diff_msf = (paired_difference(rows, decoder, name, by_seed, against) for against in against_rows(name))
        comparisons += comparison_rows(rows, decoder, name)
        bound, n, bound_mean = stats.binding(get("ari_fg"))
        recon = [by_seed[s]["vae"]["reconstruction_mse"]["recon1"] for s in seeds]  # scale 1: the same image for all
        perp, used = zip(*(usage(by_seed[s]["vae"]) for s in seeds))
        sep = [(by_seed[s]["vae"]["separability"]["inter_cluster"], by_seed[s]["vae"]["separability"]["intra_cluster"])
               for s in seeds]
        sizes = " / ".join(mean_std([100 * by_seed[s]["metrics"].get(f"miou_{k}", math.nan) for s in seeds])
                           for k in ("small", "medium", "large"))
        minutes = statistics.mean(by_seed[s]["minutes"]["vae"] + by_seed[s]["minutes"]["ocl"] for s in seeds)
        later = f" {mean_std([100 * by_seed[s]['metrics'].get('ari_fg_later', math.nan) for s in seeds])} |"
        lines.append(f"| {decoder} | {name} | {len(seeds)} | {mean_std(get('ari'))} | {mean_std(get('ari_fg'))} | "
                     f"{bound} of {n}" + (f", {bound_mean:.2f}" if bound else "") + " |"
                     f"{later if video else ''} {mean_std(get('miou'))} | {mean_std(get('mbo'))} | {diff} | {diff_msf} | {statistics.mean(recon):.4f} | "
                     f"{statistics.mean(perp):.1f} / {min(used):.2f} | "
                     f"{statistics.mean(a for a, _ in sep):.3f} / {statistics.mean(b for _, b in sep):.3f} | "
                     f"{sizes} | {minutes:.1f} | {', '.join(sorted({short(by_seed[s]) for s in seeds}))} |")
    first = found[0]
    machines = sorted({f"{short(c)}: {c.get('ran_on', 'CPU')} on {c['machine']}, {c.get('jobs', 1)} cell(s) side by "
                       f"side, {c.get('threads', 1)} torch thread(s) per run, commit {c['commit']}" for c in found})
    return ("\n".join(lines) + "\n\n"
            f"Budget: VAE {first['vae_steps']} steps, OCL {ocl_budget(found)}; best.pt chosen on `select`, scored "
            f"on all of `val`; x100, mean +- std over seeds; paired differences: mean over the seeds both rows have "
            f"and its 95% t interval (benchmarks/stats.py); rows of SlotDiffusion's published decoder (-plain, "
            f"msf-z, ...) are paired against {BASELINE}-plain and msf-plain; minutes are wall time with the cells "
            f"side by side as stated." + (f" Rows named{TEST} hold the seeds a recipe was not chosen on (seeds "
            f"{', '.join(sorted({str(c['seed']) for c in found if part(c)}))}), paired only with each other."
            if any(part(c) for c in found) else "") + "\n\n" + stats.HEADER + "\n" + "\n".join(dict.fromkeys(comparisons)) +
            "\n\nWhere the cells "
            f"ran (commit: the code each cell ran):\n" + "".join(f"- {m}\n" for m in machines))


def part(cell):
    """TEST if the cell's seed tests a recipe chosen on other seeds (stats.CHOSEN_ON), else "". Cells from before cells
    recorded their dataset are `shapes`, or `shapes_video` where they score clips (ARIfg_1+)."""
    dataset = cell.get("dataset") or ("shapes_video" if "ari_fg_later" in cell["metrics"] else "shapes")
    chosen = stats.CHOSEN_ON.get((dataset, cell["decoder"]))
    return TEST if chosen is not None and cell["seed"] not in chosen else ""


def ocl_budget(found):
    """The OCL steps of the cells, per decoder where they differ (shapes: SlotDiffusion trains longer)."""
    steps = {}
    for c in found:
        steps.setdefault(c["decoder"], set()).add(c["ocl_steps"])
    if len({n for s in steps.values() for n in s}) == 1:
        return f"{found[0]['ocl_steps']} steps"
    return ", ".join(f"{d} {' / '.join(map(str, sorted(s)))} steps" for d, s in sorted(steps.items()))


def against_rows(name):
    """The rows a variant's paired differences are taken against: the stabilised VQ-VAE and MSF with the same
    SlotDiffusion decoder (a row of the published decoder, -plain, msf-z, ..., against vqvae+stab-plain and
    msf-plain), so that the columns isolate the guidance or the change the variant names."""
    variant, test = (name.removesuffix(TEST), TEST) if name.endswith(TEST) else (name, "")  # a test row: test rows
    published = variant in VARIANTS and set(AUTHORS_SD) <= set(VARIANTS[variant][1])
    return tuple(n + test for n in ((BASELINE + "-plain", "msf-plain") if published else (BASELINE, "msf")))


def ari_fg(rows, decoder, name):
    """{seed: ARIfg x100} of a row (empty if there is no such row)."""
    return {s: 100 * c["metrics"]["ari_fg"] for s, c in rows.get((decoder, name), {}).items()}


def paired_difference(rows, decoder, name, by_seed, against):
    """ARIfg of this row minus that of row `against` (same decoder), seed by seed over the seeds both have (x100):
    "mean [95% interval] (pairs)" (stats.paired). Pairing removes what the seed does to both (data order, initial
    queries)."""
    result = stats.paired(ari_fg(rows, decoder, name), ari_fg(rows, decoder, against))
    return "-" if name == against or not result["n"] else f"{stats.interval(result)} ({result['n']})"


def comparison_rows(rows, decoder, name):
    """The lines of the comparisons table that a row asks for: MSF (msf, or msf-plain for SlotDiffusion's published
    decoder) minus the row, and the row minus the stabilised VQ-VAE (the same decoder's)."""
    base, msf = against_rows(name)
    out = []
    for a, b in ((msf, name), (name, base)):
        result = stats.paired(ari_fg(rows, decoder, a), ari_fg(rows, decoder, b))
        if a != b and name != base and result["n"]:  # the baseline's own row asks nothing new
            out.append(stats.row(f"{decoder}: {a} - {b}", result))
    return out


def short(cell):
    """The table's 'ran on' column: CPU, or the GPU's name without the vendor."""
    ran_on = cell.get("ran_on", "CPU")
    return "CPU" if ran_on.startswith("CPU") else ran_on.replace("NVIDIA ", "")


def main(argv=None):
    p = data.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="shapes")
    p.add_argument("--data-root", type=Path, default=ROOT / "data")
    p.add_argument("--cells", default="main", help="main, ablations, all, or variant names separated by commas")
    p.add_argument("--decoders", default="transformer,diffusion", help="transformer, diffusion and/or mlp")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--vae-steps", type=int, default=None, help="default: the dataset's recipe (shapes: 400)")
    p.add_argument("--ocl-steps", type=int, default=None,
                   help="default: the recipe of the dataset and decoder (shapes: 3,200, SlotDiffusion 4,800; "
                        "shapes_video: 6,000, the video preset)")
    p.add_argument("--results", type=Path, default=None, help="cells and table (default results/compare_<dataset>)")
    p.add_argument("--work", type=Path, default=None, help="training runs (default runs/compare_<dataset>)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda: where every run of this invocation runs")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells run side by side (one process each). A GPU is mostly idle under one small CPU-size "
                        "run, so there 8-14 fill it; on a CPU keep jobs x threads <= cores")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per run (1: two cells may run side by side on 2 cores, and the digits of "
                        "a cell do not depend on how busy the machine was)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader workers per run (shapes at 64 px decodes >20,000 samples/s in the main process)")
    p.add_argument("--table", action="store_true", help="only write the table from the cells on disk")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.decoders = args.decoders.split(",")
    if not args.table:  # the budget: the training scripts' own recipe tables (the table itself needs none)
        import ocl
        import train_ocl
        import train_vae
        if args.dataset not in train_ocl.RECIPES:
            sys.exit(f"--dataset {args.dataset}: unknown; one of {', '.join(train_ocl.RECIPES)}")
        unknown = [d for d in args.decoders if d not in ocl.DECODERS]
        if unknown:
            sys.exit(f"--decoders {','.join(unknown)}: unknown; one or more of {', '.join(ocl.DECODERS)}")
        args.vae_steps = train_vae.RECIPES[args.dataset]["steps"] if args.vae_steps is None else args.vae_steps
        args.ocl_steps = {d: train_ocl.recipe_of(args.dataset, d)["steps"] if args.ocl_steps is None else args.ocl_steps
                          for d in args.decoders}  # each decoder's recipe (shapes: diffusion 4,800)
    args.results = args.results or ROOT / "results" / f"compare_{args.dataset}"
    args.work = args.work or ROOT / "runs" / f"compare_{args.dataset}"
    args.results.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.table:
        todo = [c for c in cells(args) if not (args.results / f"{c[0]}__{c[1]}__s{c[2]}.json").exists()]
        args.ran_on = where(args.device)
        print(f"{len(todo)} cells to run on {args.ran_on}, {args.jobs} at a time", flush=True)
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            running = {pool.submit(run_cell, args, *c): c for c in todo}  # started in this order
            for done in concurrent.futures.as_completed(running):
                name, decoder, seed = running[done]
                try:
                    cell = done.result()
                except Failed as e:  # the other cells go on; this one is left for the next invocation
                    print(f"cell {name} / {decoder} / seed {seed}: {e}", flush=True)
                    failed.append(running[done])
                    continue
                path = args.results / f"{name}__{decoder}__s{seed}.json"
                write_atomic(path, json.dumps(cell, indent=1))
                write_atomic(args.results / "table.md", table(args.results))
                print(f"cell {name} / {decoder} / seed {seed}: ARIfg {100 * cell['metrics']['ari_fg']:.2f} -> {path}",
                      flush=True)
    text = table(args.results)
    write_atomic(args.results / "table.md", text)
    print(text)
    if failed:
        sys.exit(f"{len(failed)} cell(s) failed (their logs are named above); run the same command again to retry them")


if __name__ == "__main__":
    main()
