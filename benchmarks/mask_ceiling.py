"""How much do coarse attention masks cost? The metrics of *perfect* masks at a given grid size: each true segment's
share of every grid cell (area averaging of the one-hot ground truth), then the same bilinear up-sampling and argmax
that evaluate.py applies to the slots' attention. This is the ceiling a Slot Attention model with that grid can reach
(Slot Attention's masks are the attention over the encoder's cells: 16x16 at stride 4, 32x32 at stride 2 on 64 px).

Run: python benchmarks/mask_ceiling.py [--dataset shapes] [--split val] [--grids 16,32]
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import evaluate  # noqa: E402


def ceiling(segment, grid):
    """segment (b, H, W) int with 255 = ignored -> metrics dict of perfect soft masks at grid x grid."""
    labels = segment.clone()
    labels[labels == data.IGNORE] = 0  # ignored pixels count in no metric; any label will do for the masks
    k = int(labels.max()) + 1
    one_hot = F.one_hot(labels, k).permute(0, 3, 1, 2).float()  # (b, k, H, W)
    masks = F.adaptive_avg_pool2d(one_hot, grid)  # (b, k, grid, grid): each segment's share of each cell
    pred = evaluate.masks_to_labels(masks, segment.shape[-2:])  # (b, H, W), as evaluate.py does with attention
    return evaluate.all_metrics(pred, segment)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="shapes")
    p.add_argument("--split", default="val")
    p.add_argument("--data-root", default="data")
    p.add_argument("--grids", default="16,32")
    args = p.parse_args()
    ds = data.load_dataset(args.dataset, args.split, args.data_root)
    segment = torch.stack([torch.as_tensor(ds[i]["segment"]).long() for i in range(len(ds))])  # (N, H, W)
    print(f"{args.dataset}/{args.split}: {len(ds)} images at {tuple(segment.shape[-2:])}; perfect masks at each grid (x100)")
    print("| grid | ARI | ARIfg | mIoU | mBO |\n|---|---|---|---|---|")
    for g in [int(x) for x in args.grids.split(",")]:
        m = ceiling(segment, g)
        row = [evaluate.mean_and_count(m[k])[0] * 100 for k in ("ari", "ari_fg", "miou", "mbo")]
        print(f"| {g}x{g} | " + " | ".join(f"{v:.2f}" for v in row) + " |")


if __name__ == "__main__":
    main()
