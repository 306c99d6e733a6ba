"""The comparisons the README's results section opens with, from the cells on disk: for each, the paired seeds, the
mean difference of ARIfg (x100), its 95% interval, how many seeds are ahead, and the verdict (benchmarks/stats.py);
then each row's binding rate. A recipe chosen on some seeds is reported on those seeds and, apart, on the seeds it was
not chosen with.

Run: python benchmarks/headline.py            # prints the table and writes results/headline.md
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import stats  # noqa: E402

R = ROOT / "results"
# (label, cell folder, decoder, A, B, seeds or None for all): A - B, paired by seed
COMPARISONS = [
    ("SLATE: MSF - stabilised VQ-VAE", "compare_shapes", "transformer", "msf", "vqvae+stab", None),
    ("SLATE: MSF - GDR (the fusion of scales)", "compare_shapes", "transformer", "msf", "gdr", None),
    ("SLATE: GDR - stabilised VQ-VAE", "compare_shapes", "transformer", "gdr", "vqvae+stab", None),
    ("SLATE: MSF - multiscale (the pyramid, no fusion)", "compare_shapes", "transformer", "msf", "multiscale", None),
    ("SLATE, seeds 3-9 alone (one CPU, one commit): MSF - stabilised VQ-VAE", "compare_shapes", "transformer", "msf",
     "vqvae+stab", range(3, 10)),
    ("SLATE, seeds 3-9 alone: MSF - GDR", "compare_shapes", "transformer", "msf", "gdr", range(3, 10)),
    ("SlotDiffusion, seeds 0-2 (chose the recipe): MSF - stabilised VQ-VAE", "slotdiffusion_shapes", "diffusion", "msf",
     "vqvae+stab", stats.CHOSEN),
    ("SlotDiffusion, seeds 0-2: MSF - GDR", "slotdiffusion_shapes", "diffusion", "msf", "gdr", stats.CHOSEN),
    ("SlotDiffusion, seeds 3-5 (the test): MSF - stabilised VQ-VAE", "slotdiffusion_shapes", "diffusion", "msf",
     "vqvae+stab", stats.TESTED),
    ("SlotDiffusion, seeds 3-5: MSF - GDR", "slotdiffusion_shapes", "diffusion", "msf", "gdr", stats.TESTED),
    ("SlotDiffusion, the smaller UNet of the cells of 2026-12-03: MSF - stabilised VQ-VAE", "compare_shapes",
     "diffusion", "msf", "vqvae+stab", None),
    ("SlotDiffusion, the smaller UNet: MSF - GDR", "compare_shapes", "diffusion", "msf", "gdr", None),
    ("SlotDiffusion's recipe (x0 + gate) - its published decoder", "slotdiffusion_shapes", "diffusion", "msf",
     "msf-plain", None),
    ("SlotDiffusion: x0 alone - published", "slotdiffusion_shapes", "diffusion", "msf-x0", "msf-plain", None),
    ("SlotDiffusion: the gate alone - published", "slotdiffusion_shapes", "diffusion", "msf-gate", "msf-plain", None),
    ("STEVE, seeds 0-2 (chose the recipe): MSF - stabilised VQ-VAE", "compare_shapes_video", "transformer", "msf",
     "vqvae+stab", stats.CHOSEN),
    ("STEVE, seeds 0-2: MSF - GDR", "compare_shapes_video", "transformer", "msf", "gdr", stats.CHOSEN),
    ("STEVE, seeds 0-2: GDR - stabilised VQ-VAE", "compare_shapes_video", "transformer", "gdr", "vqvae+stab",
     stats.CHOSEN),
    ("STEVE, seeds 3-5 (the test): MSF - GDR", "compare_shapes_video", "transformer", "msf", "gdr", stats.TESTED),
] + [(f"size spread {ratio}: MSF - {name}", f"size_spread/sides{sides}", "transformer", "msf", b, None)
     for ratio, sides in (("1x", "24-24"), ("8x", "6-48"), ("20x", "3-60"))
     for name, b in (("stabilised VQ-VAE", "vqvae+stab"), ("GDR", "gdr"))]
# (label, cell folder, decoder, variants, seeds or None for all): a recipe's choosing seeds apart from its test seeds
BOUND = [("SLATE", "compare_shapes", "transformer", ("vqvae+stab", "gdr", "msf"), None),
         ("SlotDiffusion, seeds 0-2", "slotdiffusion_shapes", "diffusion", ("vqvae+stab", "gdr", "msf", "msf-plain",
                                                                            "msf-x0", "msf-gate"), stats.CHOSEN),
         ("SlotDiffusion, seeds 3-5", "slotdiffusion_shapes", "diffusion", ("vqvae+stab", "gdr", "msf"), stats.TESTED),
         ("STEVE, seeds 0-2", "compare_shapes_video", "transformer", ("vqvae+stab", "gdr", "msf"), stats.CHOSEN),
         ("STEVE, seeds 3-5", "compare_shapes_video", "transformer", ("vqvae+stab", "gdr", "msf"), stats.TESTED)]


def ari_fg(folder, decoder, variant):
    """{seed: ARIfg x100} of a variant's cells in a folder, and the commits they ran at."""
    cells = [json.loads(p.read_text()) for p in sorted((R / folder).glob(f"{variant}__{decoder}__s*.json"))]
    return {c["seed"]: 100 * c["metrics"]["ari_fg"] for c in cells}, {c["commit"] for c in cells}


def table():
    lines = [stats.HEADER]
    commits = set()
    for label, folder, decoder, a, b, seeds in COMPARISONS:
        (va, ca), (vb, cb) = ari_fg(folder, decoder, a), ari_fg(folder, decoder, b)
        if seeds is not None:
            va, vb = ({s: v for s, v in x.items() if s in seeds} for x in (va, vb))
        result = stats.paired(va, vb)
        if result["n"]:
            lines.append(stats.row(label, result))
            commits |= ca | cb
    lines += ["", f"| binding (ARIfg >= {stats.THRESHOLD:g}) | seeds bound | their mean ARIfg |", "|---|---|---|"]
    for label, folder, decoder, variants, seeds in BOUND:
        for v in variants:
            values, _ = ari_fg(folder, decoder, v)
            values = {s: x for s, x in values.items() if seeds is None or s in seeds}
            if values:
                bound, n, mean = stats.binding(list(values.values()))
                lines.append(f"| {label}: {v} | {bound} of {n} | {mean:.2f} |" if bound else f"| {label}: {v} | 0 of {n} | - |")
    return "\n".join(lines) + f"\n\nCells of the commits {', '.join(sorted(commits))} (each cell names its own).\n"


def main():
    text = table()
    (R / "headline.md").write_text("# The comparisons, from the cells on disk (`python benchmarks/headline.py`)\n\n"
                                   + text)
    print(text)


if __name__ == "__main__":
    main()
