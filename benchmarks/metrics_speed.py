"""Our batched metrics vs a per-image loop over scikit-learn's adjusted_rand_score plus scipy matching, side by side
in one run, on 128x128 batches with 11 predicted and up to 11 true segments. Target: at least 50x faster, identical values.

Run: python benchmarks/metrics_speed.py [--batch-size 64] [--repeats 5]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402


def make_batch(rng, b, size=128, n_pred=11, max_true=11):
    """Blobby segmentations: true = up to 11 random rectangles on background with a few ignored pixels;
    pred = 11 slots, a noisy version of the truth."""
    true = np.zeros((b, size, size), np.int64)
    for i in range(b):
        for k in range(1, int(rng.integers(2, max_true + 1))):
            y, x, h, w = rng.integers(0, size - 8, 2).tolist() + rng.integers(8, 48, 2).tolist()
            true[i, y:y + h, x:x + w] = k
    pred = (true + (rng.random(true.shape) < 0.1) * rng.integers(0, n_pred, true.shape)) % n_pred
    true[rng.random(true.shape) < 0.02] = 255
    return torch.from_numpy(pred), torch.from_numpy(true)


def loop_reference(pred, true):
    """What a peer codebase does: one image at a time, scikit-learn ARI and a numpy IoU matrix + scipy matching."""
    out = {"ari": [], "ari_fg": [], "miou": [], "mbo": []}
    for p, t in zip(pred.numpy(), true.numpy()):
        p, t = p.ravel(), t.ravel()
        keep = t != 255
        out["ari"].append(adjusted_rand_score(t[keep], p[keep]))
        fg = keep & (t != 0)
        out["ari_fg"].append(adjusted_rand_score(t[fg], p[fg]) if fg.any() else np.nan)
        t_labels, p_labels = np.unique(t[keep]), np.unique(p[keep])
        iou = np.zeros((len(t_labels), len(p_labels)))
        for i, a in enumerate(t_labels):
            ta = (t == a) & keep
            for j, c in enumerate(p_labels):
                pc = (p == c) & keep
                iou[i, j] = (ta & pc).sum() / (ta | pc).sum()
        r, c = linear_sum_assignment(iou, maximize=True)
        out["miou"].append(iou[r, c].sum() / len(t_labels))
        out["mbo"].append(iou.max(1).mean())
    return {k: np.array(v) for k, v in out.items()}


def ours(pred, true):
    return {k: v.numpy() for k, v in evaluate.all_metrics(pred, true).items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions of each (interleaved)")
    args = p.parse_args()
    pred, true = make_batch(np.random.default_rng(0), args.batch_size)
    ref, mine = loop_reference(pred, true), ours(pred, true)
    worst = max(np.nanmax(np.abs(ref[k] - mine[k])) for k in ref)
    t_ref, t_ours = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        loop_reference(pred, true)
        t_ref.append(time.perf_counter() - start)
        start = time.perf_counter()
        ours(pred, true)
        t_ours.append(time.perf_counter() - start)
    a, b = statistics.median(t_ref), statistics.median(t_ours)
    print(f"batch {args.batch_size} x 128x128, 11 predicted / up to 11 true segments, {args.repeats} runs each")
    print(f"per-image loop (scikit-learn + numpy + scipy): {a * 1000:8.1f} ms")
    print(f"batched evaluate.py (ARI, ARIfg, mIoU, mBO):   {b * 1000:8.1f} ms")
    print(f"speed-up {a / b:.0f}x | largest difference between the two over all metrics and images: {worst:.2e}")


if __name__ == "__main__":
    main()
