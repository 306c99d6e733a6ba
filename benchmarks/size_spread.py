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
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare_guidance  # noqa: E402  (the cells and their runner)
import data  # noqa: E402  (one-line argument errors)
import stats  # noqa: E402  (paired intervals and verdicts)

SPREADS = [(24, 24), (6, 48), (3, 60)]  # object sides at 64 px, smallest to widest spread (the plan)
# the stabilised VQ-VAE (the strongest honest baseline), GDR (MSF's two codebooks of 64 at one scale: MSF - GDR is
# what the fusion of scales adds) and MSF, all under SLATE
CELLS = ("vqvae+stab", "gdr", "msf")
PAIRS = (("msf", "vqvae+stab"), ("msf", "gdr"), ("gdr", "vqvae+stab"))  # the comparisons of the table and figure
COLOURS = {("msf", "vqvae+stab"): (31, 119, 180), ("msf", "gdr"): (255, 127, 14)}  # the figure's two gains


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
            compare_guidance.main(["--cells", ",".join(args.cells), "--decoders", "transformer", "--seeds", str(seed),
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


def ari_fg(by_variant, variant):
    """{seed: ARIfg x100} of one variant of one spread."""
    return {s: 100 * c["metrics"]["ari_fg"] for s, c in by_variant.get(variant, {}).items()}


def gains(by_variant, pair=PAIRS[0]):
    """The paired difference (stats.paired) of `pair`, e.g. MSF - vqvae+stab ARIfg x100, over the seeds both have."""
    return stats.paired(ari_fg(by_variant, pair[0]), ari_fg(by_variant, pair[1]))


def table(found):
    """Markdown: per spread the ARIfg of each variant and mIoU of small / medium / large objects (Tab. 7's split, the
    same thresholds on every dataset), then the comparisons table: each pair's paired difference per spread with
    its 95% interval, sign count and verdict (benchmarks/stats.py)."""
    if not found:
        return "(no cells yet)\n"
    ms = stats.mean_std
    lines = ["| object sides (px at 64) | spread | " + " | ".join(f"ARIfg {v} (seeds)" for v in CELLS) + " | " +
             " | ".join(f"mIoU S / M / L {v}" for v in CELLS) + " |", "|---|---|" + "---|" * (2 * len(CELLS))]
    compared = [stats.HEADER]
    for sides, by_variant in found.items():
        spread = f"{sides[0]} to {sides[1]} | {sides[1] / sides[0]:.0f}x"
        columns = [f"{ms(list(ari_fg(by_variant, v).values()))} ({len(by_variant.get(v, {}))})" for v in CELLS]
        sizes = [" / ".join(ms([100 * c["metrics"].get(f"miou_{k}", math.nan) for c in by_variant.get(v, {}).values()])
                            for k in ("small", "medium", "large")) for v in CELLS]
        lines.append(f"| {spread} | " + " | ".join(columns + sizes) + " |")
        for a, b in PAIRS:
            result = gains(by_variant, (a, b))
            if result["n"]:
                compared.append(stats.row(f"{sides[1] / sides[0]:.0f}x: {a} - {b}", result))
    cells = [c for by_variant in found.values() for by_seed in by_variant.values() for c in by_seed.values()]
    machines = sorted({f"{c.get('ran_on', 'CPU')}, {c.get('jobs', 1)} cell(s) side by side, commit {c['commit']}"
                       for c in cells})
    return ("\n".join(lines) + "\n\n" + "\n".join(compared) + "\n\nSLATE, VAE " f"{cells[0]['vae_steps']} steps, OCL "
            f"{cells[0]['ocl_steps']} steps; best.pt chosen on `select`, scored on all of `val`; x100, mean +- std over "
            "seeds; a comparison pairs the seeds both rows have, mean and 95% t interval (benchmarks/stats.py). "
            "Ran on:\n" + "".join(f"- {m}\n" for m in machines))


def figure(found, path, size=(460, 300)):
    """gain.png: the paired ARIfg differences (y, x100) against the spread of sides (x, log scale): MSF - vqvae+stab
    (blue) and MSF - GDR (orange), one dot per seed, the mean with its 95% interval as a bar, the zero line dashed
    (PIL only)."""
    from PIL import Image, ImageDraw
    points = {pair: {sides[1] / sides[0]: gains(v, pair) for sides, v in found.items()} for pair in COLOURS}
    w, h = size
    x0, y0, pw, ph = 56, 36, w - 80, h - 76  # the plot area
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    values = [d for by_spread in points.values() for r in by_spread.values() for d in r["diffs"]] or [0.0]
    lows = [r["low"] for by_spread in points.values() for r in by_spread.values() if r["n"] > 1]
    highs = [r["high"] for by_spread in points.values() for r in by_spread.values() if r["n"] > 1]
    lo, hi = min(values + lows + [0.0]) - 1, max(values + highs + [0.0]) + 1
    spreads = [s[1] / s[0] for s in SPREADS]
    xmin, xmax = math.log(min(spreads)), math.log(max(spreads))

    def xy(ratio, value, shift=0):
        inset = 28  # the outermost spreads stay off the frame
        return (x0 + inset + shift + (pw - 2 * inset) * (math.log(ratio) - xmin) / (xmax - xmin),
                y0 + ph * (1 - (value - lo) / (hi - lo)))

    draw.rectangle((x0, y0, x0 + pw, y0 + ph), outline=(180, 180, 180))
    zero = xy(1, 0)[1]
    for x in range(x0, x0 + pw, 8):  # the zero line, dashed
        draw.line((x, zero, x + 4, zero), fill=(120, 120, 120))
    draw.text((x0 - 4, zero), "0", fill="gray", anchor="rm")
    for ratio in spreads:
        draw.text((xy(ratio, 0)[0], y0 + ph + 4), f"{ratio:.0f}x", fill="black", anchor="mt")
    for k, (pair, by_spread) in enumerate(points.items()):
        colour, shift = COLOURS[pair], (-6, 6)[k]  # the two gains side by side at each spread
        for ratio, r in by_spread.items():
            for d in r["diffs"]:
                x, y = xy(ratio, d, shift)
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), outline=colour)
            if r["n"] > 1:
                x, y = xy(ratio, r["mean"], shift)
                draw.line((x, xy(ratio, r["low"])[1], x, xy(ratio, r["high"])[1]), fill=colour, width=2)
                draw.line((x - 6, y, x + 6, y), fill=colour, width=2)
        draw.text((x0 + 4 + 150 * k, 6), f"{pair[0]} - {pair[1]}", fill=colour, anchor="lt")
    draw.text((x0, y0 - 6), "ARIfg, paired by seed: mean and 95% interval", fill="black", anchor="lb")
    draw.text((x0 - 4, y0), f"{hi:+.1f}", fill="gray", anchor="rt")
    draw.text((x0 - 4, y0 + ph), f"{lo:+.1f}", fill="gray", anchor="rb")
    draw.text((x0 + pw / 2, h - 6), "largest / smallest object side", fill="black", anchor="mb")
    img.save(path)


def main(argv=None):
    p = data.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--cells", default=",".join(CELLS), help="variants to run (compare_guidance.py names)")
    p.add_argument("--data-root", type=Path, default=ROOT / "data" / "size_spread")
    p.add_argument("--results", type=Path, default=ROOT / "results" / "size_spread")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "size_spread")
    p.add_argument("--jobs", type=int, default=1, help="cells side by side (compare_guidance.py --jobs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (compare_guidance.py --threads)")
    p.add_argument("--table", action="store_true", help="only the table and the figure from the cells on disk")
    args = p.parse_args(argv)
    args.cells = args.cells.split(",")
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
    if any(gains(v)["n"] for v in found.values()):
        figure(found, args.results / "gain.png")
    print(text)


if __name__ == "__main__":
    main()
