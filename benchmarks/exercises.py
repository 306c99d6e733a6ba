"""Runs every exercise of EXERCISES.md with the teacher's solution, for seeds 0, 1, 2, and writes the teacher's table.

A cell is one (exercise, seed): a scratch copy of the repository (its tracked files and the untracked ones git does
not ignore), the exercise's patch from exercises/solutions/ applied with `git apply`, the baseline's checkpoints of
that seed put where the exercise reads the shipped baseline (exercises/baseline/vae.pt and ocl.pt: seed 0 of the
class baseline ships there), then the exercise's commands exactly as EXERCISES.md prints them, with `--seed k` added
to the training commands and `--json` to the evaluate commands. Every cell is written to
results/exercises/<exercise>__s<seed>.json as it lands; a cell on disk is not run again, so a killed run continues
with the same command. The baseline's cells run first (the others read its checkpoints, kept under --work).

Run: python benchmarks/exercises.py                          # every exercise but 11 (video), seeds 0, 1, 2
     python benchmarks/exercises.py --only 11 --seeds 0       # some exercises, some seeds
     python benchmarks/exercises.py --table                   # the table from the cells on disk
     python benchmarks/exercises.py --ship                    # seed 0's baseline -> exercises/baseline/ (fp16)
     python benchmarks/exercises.py --pool class/             # a class's runs: class/<exercise>/*.json (evaluate.py --json)
Cells run side by side (--jobs, one torch thread each by default: the digits of a cell then do not depend on how busy
the machine is); minutes are the wall time of the exercise's commands as they ran.
"""
import argparse
import concurrent.futures
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import data  # noqa: E402  (one-line argument errors)
import stats  # noqa: E402  (paired intervals and verdicts)

SEEDS = (0, 1, 2)
# what answers each exercise's question with little noise, read off the cell: (label, where: "vae" / "ocl" / "loss",
# key); the four metrics are reported for every exercise beside it
OBSERVABLES = {
    "1": ("scale 1's own share of Eq. 4's winners (wins1_1)", "vae", "wins1_1"),
    "2": ("mIoU of small objects (mIoU_S)", "ocl", "miou_small"),
    "3": ("share of scale 1's super-pixels won by scale 4 (wins1_4)", "vae", "wins1_4"),
    "4": ("scale-1 reconstruction MSE x100 (recon1)", "vae", "recon1"),
    "5": ("ARIfg", "ocl", "ari_fg"),
    "6": ("ARI (the background in one slot or split)", "ocl", "ari"),
    "7": ("ARIfg on the same checkpoint", "ocl", "ari_fg"),
    "8": ("mBO (how tight the masks are)", "ocl", "mbo"),
    "9": ("final training loss (mean of the last 5 logged)", "loss", "loss"),
    "10": ("scale-invariant codebook perplexity at scale 1 (of 64)", "vae", "perplexity1_0"),
    "11": ("ARIfg over whole clips", "ocl", "ari_fg"),
}
BASELINE_READS = {"exercises/baseline/vae.pt": "runs/class/vae/best.pt", "exercises/baseline/ocl.pt": "runs/class/ocl/best.pt"}


def exercises(text):
    """{"baseline", "1", "2", ...: {"title", "commands"}} from EXERCISES.md: each `## N. Title` section (and `## The
    baseline`) with the `python ...` lines of its code blocks, in order."""
    out = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0]
        m = re.match(r"(\d+)\. (.*)", title)
        key = m.group(1) if m else "baseline" if title.lower().startswith("the baseline") else None
        if key:
            blocks = re.findall(r"```\n(.*?)```", section, flags=re.S)
            out[key] = {"title": m.group(2) if m else "the baseline",
                        "commands": [line for b in blocks for line in b.splitlines() if line.startswith("python ")]}
    return out


def patch_of(key):
    """exercises/solutions/<NN>-<tag>.patch of exercise `key`, or None (exercises that only change a flag)."""
    found = sorted((ROOT / "exercises" / "solutions").glob(f"{int(key):02d}-*.patch")) if key.isdigit() else []
    return found[0] if found else None


def copy_repository(dst):
    """The repository as a clone would have it, plus untracked files git does not ignore (the working tree)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)


def reads_baseline(spec):
    """Whether an exercise's commands read the shipped baseline (exercises/baseline/): those that change stage 2 only."""
    return any(shipped in c for c in spec["commands"] for shipped in BASELINE_READS)


def run_cell(args, key, spec, seed):
    """Run one (exercise, seed) in its scratch folder; returns the cell's dict."""
    work = args.work / f"{key}__s{seed}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    copy_repository(work)
    (work / "data").symlink_to(args.data_root.resolve())
    patch = patch_of(key)
    if patch:
        subprocess.run(["git", "apply", str(patch)], cwd=work, check=True)
    if reads_baseline(spec):  # the baseline of this seed stands where the exercise reads the shipped one
        for shipped, made in BASELINE_READS.items():
            (work / shipped).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(args.work / f"baseline__s{seed}" / made, work / shipped)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cell = {"exercise": key, "title": spec["title"], "seed": seed, "patch": patch.name if patch else None,
            "commands": [], "vae": [], "ocl": [], "loss": []}
    start = time.time()
    for i, line in enumerate(spec["commands"]):
        argv = shlex.split(line)[1:]
        if argv[0] in ("train_vae.py", "train_ocl.py"):
            argv += ["--seed", str(seed)]
        if argv[0] == "evaluate.py":
            argv += ["--json", str(work / f"eval_{i}.json")]
        t = time.time()
        with open(work / f"log_{i}.txt", "w") as log:
            done = subprocess.run([sys.executable, *argv], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise RuntimeError(f"{key} seed {seed}: `{' '.join(argv)}` failed, see {work / f'log_{i}.txt'}")
        cell["commands"].append({"command": " ".join(argv), "minutes": round((time.time() - t) / 60, 2)})
        if argv[0] == "evaluate.py":
            result = json.loads((work / f"eval_{i}.json").read_text())
            if result["kind"] == "vae":
                flat = {k: v for group in ("reconstruction_mse", "codebook_usage", "scale_wins") for k, v in
                        result[group].items()}
                cell["vae"].append({"ckpt": result["ckpt"], **flat, "inter_cluster": result["separability"]
                                    ["inter_cluster"], "intra_cluster": result["separability"]["intra_cluster"]})
            else:
                cell["ocl"].append({"ckpt": result["ckpt"], **{k: v["mean"] for k, v in result["metrics"].items()}})
        if argv[0] == "train_ocl.py":  # the end of the training loss, from the run's log
            out = Path(argv[argv.index("--out") + 1])
            losses = [r["loss"] for r in map(json.loads, (work / out / "metrics.jsonl").read_text().splitlines())
                      if "loss" in r]
            cell["loss"].append({"out": str(out), "loss": statistics.mean(losses[-5:])})
    cell["minutes"] = round((time.time() - start) / 60, 2)
    cell["ran_on"] = f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s), {args.jobs} " \
                     f"cell(s) side by side"
    cell["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip()
    return cell


def value(cell, where, key, which=-1):
    """One number of a cell: the last VAE / OCL evaluation's `key` (x100 for metrics and reconstruction MSE), or the
    final training loss; `which` picks among several OCL evaluations (exercise 11 scores two runs)."""
    if not cell[where]:  # a pooled cell without that evaluation (exercise 9's loss is not in evaluate.py's JSON)
        return float("nan")
    if where == "loss":
        return cell["loss"][which]["loss"]
    entry = cell[where][which]
    scale = 100 if where == "ocl" or key.startswith("recon") else 1
    return scale * entry[key] if key in entry else float("nan")  # e.g. the share of a 4th scale the baseline lacks


def pool(folder):
    """A class's runs as cells: <folder>/<exercise>/*.json, each the `evaluate.py --json` of one student's run
    (`baseline`, `1`, `2`, ... as folder names; the seed is the run's --seed, recorded in the JSON), merged per
    (exercise, seed) as run_cell records them (a VAE and an OCL evaluation of one seed go into one cell; files in
    name order). Observables the JSON files do not hold (exercise 9's training loss) show as "-"."""
    titles = {k: v["title"] for k, v in exercises((ROOT / "EXERCISES.md").read_text()).items()}
    cells = {}
    for path in sorted(Path(folder).glob("*/*.json")):
        key = path.parent.name
        if key not in titles:
            sys.exit(f"--pool {folder}: {path.parent.name}/ is not an exercise; name the folders baseline, 1, 2, ... 11")
        result = json.loads(path.read_text())
        if result.get("seed") is None or result.get("kind") not in ("vae", "ocl"):
            sys.exit(f"--pool {folder}: {path} is not the --json of `evaluate.py --ckpt ...` on a training run")
        cell = cells.setdefault((key, result["seed"]), {"exercise": key, "title": titles[key], "seed": result["seed"],
                                                        "minutes": float("nan"), "ran_on": f"pooled from {folder}",
                                                        "loss": [], "vae": [], "ocl": []})
        if result["kind"] == "vae":
            cell["vae"].append({k: v for group in ("reconstruction_mse", "codebook_usage", "scale_wins")
                                for k, v in result[group].items()})
        else:
            cell["ocl"].append({k: v["mean"] for k, v in result["metrics"].items()})
    return list(cells.values())


def fmt(values, digits=2):
    """mean +- std (stats.mean_std), "-" where the quantity does not exist (NaN anywhere)."""
    return "-" if any(v != v for v in values) else stats.mean_std(values, digits)


def table(results):
    """The teacher's table (markdown) from every cell on disk (or a list of cells: pool): per exercise the observable as mean +- std over its
    seeds beside the baseline's on the same seeds, their paired difference with its 95% interval and verdict
    (benchmarks/stats.py: higher, lower or not settled), how many seeds (students) show the effect (the sign of the
    mean), the seeds at which it would settle, and the four metrics with those whose paired difference settles."""
    cells = {}
    found = results if isinstance(results, list) else [json.loads(p.read_text()) for p in sorted(results.glob("*__s*.json"))]
    for cell in found:
        cells.setdefault(cell["exercise"], []).append(cell)
    if "baseline" not in cells:
        return "no baseline cells yet\n"
    base = cells["baseline"]
    lines = ["| exercise | seeds | minutes | observable | exercise | baseline | paired difference [95% interval] | "
             "verdict | seeds showing it | seeds to settle it | ARI | ARIfg | mIoU | mBO | metrics that settle |",
             "|" + "---|" * 15]
    metrics = ("ari", "ari_fg", "miou", "mbo")
    lines.append(f"| the baseline | {len(base)} | {fmt([c['minutes'] for c in base], 1)} | | | | | | | | " +
                 " | ".join(fmt([value(c, 'ocl', k) for c in base]) for k in metrics) + " | |")
    words = {"ahead": "higher", "behind": "lower", "not settled": "not settled"}
    for key in sorted((k for k in cells if k != "baseline"), key=int):
        mine = sorted(cells[key], key=lambda c: c["seed"])
        label, where, obs = OBSERVABLES[key]
        # exercise 11 holds its own baseline (the recipe with the box prior, its first OCL run) beside its change
        ref = [(c, 0) for c in mine] if key == "11" else [(b, -1) for b in base]
        by_seed = {c["seed"]: (c, w) for c, w in ref}
        mine = [c for c in mine if c["seed"] in by_seed]
        pairs = {c["seed"]: (c, *by_seed[c["seed"]]) for c in mine}  # seed k of the exercise, of the baseline

        def compare(where_, key_):  # the exercise minus the baseline over the paired seeds (stats.paired)
            return stats.paired({s: value(c, where_, key_) for s, (c, _, _) in pairs.items()},
                                {s: value(r, where_, key_, w) for s, (_, r, w) in pairs.items()})
        r = compare(where, obs)
        digits = 3 if where == "loss" or obs.startswith("wins") else 2
        known = r["n"] and r["mean"] == r["mean"]  # NaN: the quantity does not exist for the baseline
        shown = sum(d != 0 and (d > 0) == (r["mean"] > 0) for d in r["diffs"]) if known else 0
        showing = f"{shown} of {r['n']}" if known else "-"
        settled = [f"{name} {m['mean']:+.1f}" for k, name in zip(metrics, ("ARI", "ARIfg", "mIoU", "mBO"))
                   if (m := compare("ocl", k))["verdict"] != "not settled"]
        lines.append(f"| {key}. {mine[0]['title']} | {len(mine)} | {fmt([c['minutes'] for c in mine], 1)} | {label} | "
                     f"{fmt([value(c, where, obs) for c in mine], digits)} | "
                     f"{fmt([value(b, where, obs, w) for _, b, w in pairs.values()], digits)} | "
                     f"{stats.interval(r, digits) if known else '-'} | {words[r['verdict']] if known else '-'} | "
                     f"{showing} | {(stats.seeds_to_settle(r) if known else None) or '-'} | " +
                     " | ".join(fmt([value(c, 'ocl', k) for c, _, _ in pairs.values()]) for k in metrics) +
                     f" | {', '.join(settled) or ('none' if len(mine) > 1 else '-')} |")
    ran = sorted({c["ran_on"] for group in cells.values() for c in group})
    return "\n".join(lines) + (
        "\n\nx100 (the loss and the shares as they are); mean +- std over the seeds listed, each on all 500 `val` "
        "images (exercise 11: 200 clips, its baseline the recipe with the box prior). Paired difference: seed k of "
        "the exercise minus seed k of the baseline, mean and 95% t interval; verdict: higher or lower where the "
        "interval is clear of 0, else not settled (benchmarks/stats.py). Seeds showing it: the seeds (in a class, the "
        "students) whose own difference has the mean's sign. Seeds to settle it: the fewest at which that interval "
        "would clear 0 if the mean and std held (the seeds listed, where it already does). Metrics that settle: the "
        "same test for each of the four metrics. Ran on: " + "; ".join(ran) + ".\n")


def ship(args):
    """Seed 0's class baseline into exercises/baseline/: its VAE and OCL checkpoints with fp16 floats, and the digits
    they score on the first 64 val images (expected.json, which tests/test_exercises.py checks)."""
    import torch
    src = args.work / "baseline__s0"
    dst = ROOT / "exercises" / "baseline"
    dst.mkdir(parents=True, exist_ok=True)
    for name, made in (("vae.pt", BASELINE_READS["exercises/baseline/vae.pt"]),
                       ("ocl.pt", BASELINE_READS["exercises/baseline/ocl.pt"])):
        ckpt = torch.load(src / made, map_location="cpu", weights_only=True)
        ckpt["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
        torch.save(ckpt, dst / name)
    import evaluate
    with __import__("tempfile").TemporaryDirectory() as tmp:
        data.write_shapes(tmp, 64, counts={"train": 2, "val": 64}, quiet=True)  # val's first 64 images, as in data/
        expected = {}
        for name in ("vae.pt", "ocl.pt"):
            expected[name] = evaluate.main(["--ckpt", str(dst / name), "--data-root", tmp, "--limit", "64"])
    (dst / "expected.json").write_text(json.dumps(expected, indent=1))
    print(f"wrote {dst}: vae.pt, ocl.pt ({sum((dst / n).stat().st_size for n in ('vae.pt', 'ocl.pt')) / 2 ** 20:.1f} "
          f"MiB) and expected.json")


def parse_args(argv=None):
    p = data.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="exercise numbers, e.g. 1,2,5 (default: all but 11; the baseline "
                                                "always runs first where its cells are missing)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--results", type=Path, default=ROOT / "results" / "exercises")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "exercises", help="the cells' scratch copies")
    p.add_argument("--data-root", type=Path, default=ROOT / "data", help="the built-in datasets every cell reads")
    p.add_argument("--jobs", type=int, default=2, help="cells side by side (keep jobs x threads <= cores)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per command")
    p.add_argument("--exercises", type=Path, default=ROOT / "EXERCISES.md", help="where the commands are read from")
    p.add_argument("--table", action="store_true", help="only write the table from the cells on disk")
    p.add_argument("--ship", action="store_true", help="write seed 0's baseline into exercises/baseline/")
    p.add_argument("--pool", type=Path, default=None,
                   help="a class's runs: FOLDER/<exercise>/*.json, each a student's `evaluate.py --json`; prints "
                        "their table (seeds paired across exercises) and writes nothing")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.pool:
        if not args.pool.is_dir():
            sys.exit(f"--pool {args.pool}: no such folder (one subfolder per exercise: baseline, 1, 2, ...)")
        text = table(pool(args.pool))
        print(text)
        return text
    args.results.mkdir(parents=True, exist_ok=True)
    if args.ship:
        return ship(args)
    specs = exercises(args.exercises.read_text())
    wanted = args.only.split(",") if args.only else [k for k in specs if k not in ("baseline", "11")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.table:  # the datasets every cell reads, written once before the cells start (never by two at once)
        for name in ("shapes", "shapes_video"):
            if name == "shapes" or "11" in wanted:
                data.load_dataset(name, "val", args.data_root)

        def run(key, seed):
            path = args.results / f"{key}__s{seed}.json"
            cell = run_cell(args, key, specs[key], seed)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cell, indent=1))
            os.replace(tmp, path)
            (args.results / "table.md").write_text(table(args.results))
            print(f"{key} seed {seed}: {cell['minutes']} min -> {path}", flush=True)

        needs_runs = any(reads_baseline(specs[k]) for k in wanted)  # the baseline's checkpoints, not only its cells

        def missing(key):
            return [s for s in seeds if not (args.results / f"{key}__s{s}.json").exists() or
                    (key == "baseline" and needs_runs and not (args.work / f"baseline__s{s}" / "runs").exists())]
        failed = []
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as executor:
            for todo in ([("baseline", s) for s in missing("baseline")],  # first: the others read its checkpoints
                         [(k, s) for k in wanted for s in missing(k)]):
                running = {executor.submit(run, k, s): (k, s) for k, s in todo}
                for f in concurrent.futures.as_completed(running):
                    try:
                        f.result()
                    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:  # the others go on
                        print(f"cell {running[f]}: {e}", flush=True)
                        failed.append(running[f])
    text = table(args.results)
    (args.results / "table.md").write_text(text)
    print(text)
    if not args.table and failed:
        sys.exit(f"{len(failed)} cell(s) failed (named above); the same command runs them again")


if __name__ == "__main__":
    main()
