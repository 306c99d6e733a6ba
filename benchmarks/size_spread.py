"""Does MSF's gain grow with the spread of object sizes? The paper's reason for MSF is objects of different sizes
(Sect. 1, 3.2; Tab. 7 splits mIoU by size). This measures MSF - stabilised VQ-VAE (SLATE, paired seeds) on three
built-in datasets that differ only in the range of object sides, and plots the paired gain against that range.

Run:  python benchmarks/size_spread.py                  # the three datasets, every missing cell (hours on 2 cores)
      python benchmarks/size_spread.py --seeds 0        # seed 0 of each dataset first
      python benchmarks/size_spread.py --table          # only the table and the figure from the cells on disk

The datasets (`python data.py shapes --object-sides LO,HI`, seed 0, 8,000 + 500 images at 64 px) and the budget
(the quick start's: VAE 400 steps, SLATE 3,200 steps) were fixed before the first cell ran
(results/2026-12-02-size-spread-plan.md): one size (24,24: 1x), the default `shapes` (6,48: 8x) and the widest that
still renders (3,60: 20x). Each dataset's cells are compare_guidance.py cells (one JSON file per variant and seed in
<results>/sides<LO>-<HI>/, resumable, committed as they land); this script runs them seed-major (seed 0 of every
dataset before seed 1) and writes <results>/table.md and <results>/gain.png.
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare_guidance  # noqa: E402  (the cells, their runner and mean_std)

SPREADS = [(24, 24), (6, 48), (3, 60)]  # object sides at 64 px, smallest to widest spread (the plan)
CELLS = ("vqvae+stab", "msf")  # the strongest honest baseline and MSF, both under SLATE


def folder(sides):
    return f"sides{sides[0]}-{sides[1]}"


def build_dataset(data_root, sides):
    """The dataset of one spread, written once (data.py's own command; it refuses to overwrite)."""
    root = data_root / folder(sides)
    if not (root / "shapes" / "train").exists():
        subprocess.run([sys.executable, str(ROOT / "data.py"), "shapes", "--root", str(root),
                        "--object-sides", f"{sides[0]},{sides[1]}"], check=True)
    return root


def run(args):
    """Seed-major over the datasets: a partial run has every spread of seed 0 before any of seed 1."""
    for seed in args.seeds:
        for sides in SPREADS:
            root = build_dataset(args.data_root, sides)
            compare_guidance.main(["--cells", ",".join(CELLS), "--decoders", "transformer", "--seeds", str(seed),
                                   "--jobs", str(args.jobs), "--threads", str(args.threads), "--data-root", str(root),
                                   "--results", str(args.results / folder(sides)),
                                   "--work", str(args.work / folder(sides))])


def gather(results):
    """Per spread: {variant: {seed: cell}} from the cells on disk (spreads without cells are left out)."""
    out = {}
    for sides in SPREADS:
        for path in sorted((results / folder(sides)).glob("*__transformer__s*.json")):
            cell = json.loads(path.read_text())
            if cell["variant"] in CELLS:
                out.setdefault(sides, {}).setdefault(cell["variant"], {})[cell["seed"]] = cell
    return out


def gains(by_variant):
    """MSF - vqvae+stab ARIfg (x100) seed by seed, over the seeds both have: {seed: gain}."""
    base, msf = by_variant.get(CELLS[0], {}), by_variant.get(CELLS[1], {})
    return {s: 100 * (msf[s]["metrics"]["ari_fg"] - base[s]["metrics"]["ari_fg"]) for s in sorted(msf) if s in base}


def table(found):
    """Markdown: one row per spread; ARIfg of both variants, the paired gain (mean +- std and per seed), mIoU of
    small / medium / large objects (Tab. 7's split, the same thresholds on every dataset)."""
    if not found:
        return "(no cells yet)\n"
    ms = compare_guidance.mean_std
    lines = ["| object sides (px at 64) | spread | seeds | ARIfg vqvae+stab | ARIfg msf | MSF - vqvae+stab (paired) | "
             "per seed | mIoU S / M / L vqvae+stab | mIoU S / M / L msf |", "|---|---|---|---|---|---|---|---|---|"]
    waiting = []  # cells whose pair has not landed yet: named under the table, left out of every column
    for sides, by_variant in found.items():
        g = gains(by_variant)  # {seed: gain} over the seeds both variants have
        waiting += [f"{folder(sides)} {v} seed {s}" for v in CELLS for s in sorted(by_variant.get(v, {})) if s not in g]
        if not g:
            continue

        def col(variant, key):  # over the paired seeds only, so both columns and the gain share their seeds
            return ms([100 * by_variant[variant][s]["metrics"].get(key, math.nan) for s in g])

        sizes = {v: " / ".join(col(v, f"miou_{k}") for k in ("small", "medium", "large")) for v in CELLS}
        lines.append(f"| {sides[0]} to {sides[1]} | {sides[1] / sides[0]:.0f}x | {', '.join(map(str, g))} | "
                     f"{col(CELLS[0], 'ari_fg')} | {col(CELLS[1], 'ari_fg')} | "
                     f"{ms(list(g.values()))} ({len(g)}) | "
                     f"{', '.join(f'{v:+.2f}' for v in g.values())} | {sizes[CELLS[0]]} | {sizes[CELLS[1]]} |")
    cells = [c for by_variant in found.values() for by_seed in by_variant.values() for c in by_seed.values()]
    machines = sorted({f"{c.get('ran_on', 'CPU')}, {c.get('jobs', 1)} cell(s) side by side, commit {c['commit']}"
                       for c in cells})
    return ("\n".join(lines) + "\n\nSLATE, VAE " f"{cells[0]['vae_steps']} steps, OCL {cells[0]['ocl_steps']} steps; best.pt "
            "chosen on `select`, scored on all of `val`; x100, mean +- std over the paired seeds. "
            + (f"Waiting for their pair (not in the table): {', '.join(waiting)}. " if waiting else "")
            + "Ran on:\n" + "".join(f"- {m}\n" for m in machines))


def figure(found, path, size=(420, 280)):
    """gain.png: the paired gain (y, ARIfg x100) against the spread of sides (x, log scale); one dot per seed, the
    mean with +- one std as a bar, the zero line dashed (PIL only)."""
    from PIL import Image, ImageDraw
    points = {sides[1] / sides[0]: list(gains(by_variant).values()) for sides, by_variant in found.items()}
    points = {k: v for k, v in points.items() if v}
    w, h = size
    x0, y0, pw, ph = 56, 24, w - 80, h - 64  # the plot area
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    values = [v for vs in points.values() for v in vs] or [0.0]
    lo, hi = min(min(values), 0.0) - 1, max(max(values), 0.0) + 1
    spreads = [s[1] / s[0] for s in SPREADS]
    xmin, xmax = math.log(min(spreads)), math.log(max(spreads))

    def xy(ratio, value):
        inset = 24  # the outermost spreads stay off the frame
        return (x0 + inset + (pw - 2 * inset) * (math.log(ratio) - xmin) / (xmax - xmin),
                y0 + ph * (1 - (value - lo) / (hi - lo)))

    draw.rectangle((x0, y0, x0 + pw, y0 + ph), outline=(180, 180, 180))
    zero = xy(1, 0)[1]
    for x in range(x0, x0 + pw, 8):  # the zero line, dashed
        draw.line((x, zero, x + 4, zero), fill=(120, 120, 120))
    draw.text((x0 - 4, zero), "0", fill="gray", anchor="rm")
    for ratio in spreads:
        draw.text((xy(ratio, 0)[0], y0 + ph + 4), f"{ratio:.0f}x", fill="black", anchor="mt")
    for ratio, vs in points.items():
        for v in vs:
            x, y = xy(ratio, v)
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), outline=(31, 119, 180))
        mean = statistics.mean(vs)
        std = statistics.stdev(vs) if len(vs) > 1 else 0.0
        x, y = xy(ratio, mean)
        draw.line((x, xy(ratio, mean - std)[1], x, xy(ratio, mean + std)[1]), fill=(214, 39, 40), width=2)
        draw.line((x - 8, y, x + 8, y), fill=(214, 39, 40), width=2)
    draw.text((x0, y0 - 4), "ARIfg: MSF - VQ-VAE (stabilised), paired", fill="black", anchor="lb")
    draw.text((x0 - 4, y0), f"{hi:+.1f}", fill="gray", anchor="rt")
    draw.text((x0 - 4, y0 + ph), f"{lo:+.1f}", fill="gray", anchor="rb")
    draw.text((x0 + pw / 2, h - 6), "largest / smallest object side", fill="black", anchor="mb")
    img.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--data-root", type=Path, default=ROOT / "data" / "size_spread")
    p.add_argument("--results", type=Path, default=ROOT / "results" / "size_spread")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "size_spread")
    p.add_argument("--jobs", type=int, default=1, help="cells side by side (compare_guidance.py --jobs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (compare_guidance.py --threads)")
    p.add_argument("--table", action="store_true", help="only the table and the figure from the cells on disk")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: give seeds as integers separated by commas, e.g. 0,1,2")
    if not args.table:
        run(args)
    found = gather(args.results)
    args.results.mkdir(parents=True, exist_ok=True)
    text = table(found)
    compare_guidance.write_atomic(args.results / "table.md", text)
    if any(gains(v) for v in found.values()):
        figure(found, args.results / "gain.png")
    print(text)


if __name__ == "__main__":
    main()
