"""Evaluation: the segmentation metrics ARI, ARIfg, mIoU and mBO (pure functions on label maps), the paper's
analysis tools (Tab. 4's object separability of the VAE guidance, Tab. 7's mIoU by object size), the evaluation
loops both training scripts validate with, and the CLI that scores a checkpoint (figures: figures.py).

Paper: "Multi-Scale Fusion for Object Representation" (Zhao et al., ICLR 2025), Sect. 4.1 (metrics), Sect. 4.2
(Tab. 4 separability, Fig. 3), Fig. 2 (segmentations), A.2 (Tab. 7 mIoU by object size).

Run:  python evaluate.py                                   # the OCL checkpoint of the quick start
      python evaluate.py --ckpt runs/ocl_shapes_transformer_msf/best.pt --viz 8 --json metrics.json
      python evaluate.py --ckpt runs/vae_shapes_msf_c256/best.pt --viz 4   # a VAE checkpoint (with Tab. 4)
      python evaluate.py --images my_photos/                 # your own pictures, no ground truth needed

Metrics (docs/metrics.md: definitions with examples): `pred` and `true` are long label maps, (b, H, W) or, for
videos, (b, T, H, W) scored over all frames jointly; in `true` 0 = background, 1..K = objects, 255 = ignored (counts
in no metric). A sample where a metric is undefined gets NaN; dataset means skip it (`mean_and_count`).

Reading order: the metrics (contingency, ari, matched_ious, miou, mbo, video_metrics, miou_by_size,
masks_to_labels, perplexity, mean_and_count); Tab. 4's separability (kmeans, separability); the evaluation loops
(validate_vae, validate_ocl); the CLI (evaluate_vae, evaluate_ocl, segment_images, main). Imports data, msf and ocl
(a model from its checkpoint), checkpoints (reading one safely), train_common (the device), figures.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment

import checkpoints
import data
import figures
import msf
import ocl
import train_common

IGNORE = data.IGNORE
COCO_SMALL, COCO_LARGE = 32 ** 2, 96 ** 2  # COCO's area thresholds (pixels of the original image)
# "ours" (default): ignored pixels (255) count in no metric. "authors": the authors' code, which keeps predicted
# pixels without ground truth in the IoU's union and reads VOC's void boundary as background (docs/metrics.md).
PROTOCOLS = ("ours", "authors")

# -----------------------------------------------------------------------------
# Metrics: everything starts from the contingency table of (true, pred) label pairs


def contingency(pred, true, protocol="ours"):
    """counts (b, Kt, Kp) float64: n_ij = number of non-ignored pixels with true label t_i and predicted label p_j.

    pred, true: long (b, ...) of the same shape. Small non-negative labels (slot indices, dataset ids < 1024) are
    used as they are; any other labels are first compacted over the batch (torch.unique). Returns the counts, the
    true label value of each row (Kt,) (255 has no row; rows or columns of labels absent from a sample are 0), and
    the predicted segments' areas (b, Kp) for the IoU's union: over the non-ignored pixels ("ours"), or over all
    pixels, ignored ones included ("authors": the authors' code counts a prediction on unannotated pixels against
    it).
    """
    assert protocol in PROTOCOLS, f"protocol {protocol!r}: choose one of {PROTOCOLS}"
    assert pred.shape == true.shape, f"pred {tuple(pred.shape)} and true {tuple(true.shape)} differ"
    b = true.shape[0]
    pred, true = pred.reshape(b, -1), true.reshape(b, -1)  # (b, P): all frames of a video jointly
    t_lo, t_hi = torch.aminmax(true) if true.numel() else (0, 0)
    if t_lo < 0 or t_hi >= 1024:
        t_vals, true = torch.unique(true, return_inverse=True)  # (Kt',), (b, P)
    else:
        t_vals = torch.arange(int(t_hi) + 1, device=true.device)  # labels used as row indices directly
    p_lo, p_hi = torch.aminmax(pred) if pred.numel() else (0, 0)
    if p_lo < 0 or p_hi >= 1024:
        pred = torch.unique(pred, return_inverse=True)[1]
        p_hi = pred.max() if pred.numel() else 0
    kt, kp = len(t_vals), int(p_hi) + 1
    # the cell of each pixel in a flattened (b, Kt, Kp) table, int32 to halve the memory traffic when it fits
    dtype = torch.int32 if b * kt * kp < 2 ** 31 else torch.int64
    offset = (torch.arange(b, device=true.device, dtype=dtype) * (kt * kp))[:, None]  # (b, 1)
    flat = true.to(dtype) * kp + pred.to(dtype) + offset  # (b, P)
    counts = torch.bincount(flat.flatten(), minlength=b * kt * kp).view(b, kt, kp).double()  # (b, Kt', Kp)
    # ignored pixels all landed in the row of label 255: dropping that row removes them from every count
    keep = (t_vals != IGNORE) & (counts.sum((0, 2)) > 0)
    # ours: ignored pixels count in no metric (--protocol authors: the authors')
    pred_area = counts.sum(1) if protocol == "authors" else counts[:, keep].sum(1)  # (b, Kp)
    return counts[:, keep], t_vals[keep], pred_area


def ari_from_counts(n):
    """Adjusted Rand index from a contingency table n (b, Kt, Kp), in scikit-learn's pair-counting form:
    ARI = 2 (tp tn - fn fp) / ((tp + fn)(fn + tn) + (tp + fp)(fp + tn)), 1 when fn = fp = 0; NaN without pixels."""
    N = n.sum((1, 2))  # (b,)
    a, b_ = n.sum(2), n.sum(1)  # (b, Kt) true sizes, (b, Kp) predicted sizes
    ss = (n ** 2).sum((1, 2))
    tp = ss - N  # ordered pairs of pixels together in both
    fp = (n * b_[:, None, :]).sum((1, 2)) - ss  # together in pred, apart in true
    fn = (n * a[:, :, None]).sum((1, 2)) - ss  # together in true, apart in pred
    tn = N ** 2 - fp - fn - ss
    den = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
    ari = 2 * (tp * tn - fn * fp) / torch.where(den == 0, torch.ones_like(den), den)
    ari = torch.where((fn == 0) & (fp == 0), torch.ones_like(ari), ari)
    return torch.where(N == 0, torch.full_like(ari, math.nan), ari).float()


def ari(pred, true, foreground_only=False):
    """ARI (b,) over non-ignored pixels; ARIfg with foreground_only=True (pixels whose true label is an object)."""
    n, t_vals, _ = contingency(pred, true)
    if foreground_only:
        n = n[:, t_vals != 0]  # drop the background row: its pixels leave the table
    return ari_from_counts(n)


def iou_from_counts(n, pred_area):
    """IoU (b, Kt, Kp) = |t_i & p_j| / (|t_i| + |p_j| - |t_i & p_j|), 0 where the union is empty. |p_j| is
    pred_area (b, Kp) (contingency: over non-ignored pixels, or over all of them for the authors' protocol)."""
    union = n.sum(2, keepdim=True) + pred_area[:, None, :] - n
    return n / union.clamp(min=1)


def matched_from_counts(n, pred_area):
    """Per true segment, the IoU of its Hungarian-matched predicted segment (0 if unmatched), (b, Kt), NaN for
    segments absent from the sample. Matching: one-to-one, maximising the summed IoU (scipy)."""
    iou = iou_from_counts(n, pred_area).cpu().numpy()  # (b, Kt, Kp)
    present = (n.sum(2) > 0).cpu().numpy()  # (b, Kt)
    out = np.full(present.shape, np.nan)
    for i in range(len(iou)):  # one small assignment problem per sample (at most ~25 x 25)
        rows = np.flatnonzero(present[i])
        if len(rows) == 0:
            continue
        r, c = linear_sum_assignment(iou[i][rows], maximize=True)
        out[i, rows] = 0.0  # unmatched true segments (more segments than predictions) score 0
        out[i, rows[r]] = iou[i][rows[r], c]
    return torch.from_numpy(out).float()


def matched_ious(pred, true, protocol="ours"):
    """matched_from_counts for label maps; also returns the true label value of each column (Kt,)."""
    n, t_vals, pred_area = contingency(pred, true, protocol)
    return matched_from_counts(n, pred_area), t_vals


def _mean_present(m):
    """Mean over the non-NaN entries of each row of m (b, K); NaN for a row without any."""
    present = ~torch.isnan(m)
    count = present.sum(1)
    out = torch.where(present, m, torch.zeros_like(m)).sum(1) / count.clamp(min=1)
    return torch.where(count == 0, torch.full_like(out, math.nan), out)


def miou(pred, true, protocol="ours"):
    """mIoU (b,): sum of Hungarian-matched IoUs / number of non-empty true segments (background included)."""
    return _mean_present(matched_ious(pred, true, protocol)[0])


def mbo_from_counts(n, pred_area):
    if n.shape[2]:
        best = iou_from_counts(n, pred_area).amax(2)  # (b, Kt)
    else:
        best = torch.zeros(n.shape[:2], dtype=n.dtype)
    return _mean_present(torch.where(n.sum(2) > 0, best, torch.full_like(best, math.nan))).float()


def mbo(pred, true, protocol="ours"):
    """mBO (b,): for each non-empty true segment (background included) its best IoU over predicted segments, averaged."""
    n, _, pred_area = contingency(pred, true, protocol)
    return mbo_from_counts(n, pred_area)


def all_metrics(pred, true, protocol="ours"):
    """ARI, ARIfg, mIoU and mBO (each (b,)) from one contingency table: what the evaluation loops call."""
    n, t_vals, pred_area = contingency(pred, true, protocol)
    return {"ari": ari_from_counts(n), "ari_fg": ari_from_counts(n[:, t_vals != 0]),
            "miou": _mean_present(matched_from_counts(n, pred_area)), "mbo": mbo_from_counts(n, pred_area)}


def video_metrics(pred, true):
    """Two views of a clip's ARIfg beside the one over the whole clip, for pred and true (b, t, H, W):
    `ari_fg_frame`, ARIfg of each frame alone, averaged over the clip's frames (the gap to the clip's ARIfg is what
    slots that change objects between frames cost), and `ari_fg_later`, ARIfg over frames 1..t-1 jointly: the clip
    without the frame whose boxes a box-conditioned model is given (--box-prior hands each box slot its box on
    frame 0). Returns {name: (b,)}."""
    per_frame = ari(pred.flatten(0, 1), true.flatten(0, 1), foreground_only=True).view(len(pred), -1)  # (b, t)
    out = {"ari_fg_frame": per_frame.nanmean(1)}  # (b,)
    if pred.shape[1] > 1:
        out["ari_fg_later"] = ari(pred[:, 1:], true[:, 1:], foreground_only=True)  # (b,)
    return out


def authors_truth(segment, dataset):
    """The ground truth as the authors' evaluation reads it (--protocol authors): VOC's void label (255: object
    boundaries and difficult regions) is background there, not ignored; other datasets keep 255 as unannotated."""
    if dataset == "voc":
        return torch.where(segment == IGNORE, torch.zeros_like(segment), segment)
    return segment


def miou_by_size(pred, true, areas, thresholds=(COCO_SMALL, COCO_LARGE), protocol="ours"):
    """mIoU of small / medium / large objects (Tab. 7), with COCO's thresholds on the object's area in the
    original image: small < 32^2 <= medium < 96^2 <= large. areas: (b, K) float, areas[:, k-1] = area of object
    label k (NaN or 0 for absent labels). Matching is the same Hungarian matching as miou (background included);
    returns a dict of (b,) means over each sample's objects of that size (NaN if it has none)."""
    m, t_vals = matched_ious(pred, true, protocol)  # (b, Kt)
    out = {name: torch.full((m.shape[0],), math.nan) for name in ("small", "medium", "large")}
    for i in range(m.shape[0]):
        buckets = {"small": [], "medium": [], "large": []}
        for j, label in enumerate(t_vals.tolist()):
            if label == 0 or math.isnan(m[i, j]) or label > areas.shape[1]:
                continue
            area = float(areas[i, label - 1])
            name = "small" if area < thresholds[0] else "medium" if area < thresholds[1] else "large"
            buckets[name].append(float(m[i, j]))
        for name, v in buckets.items():
            if v:
                out[name][i] = sum(v) / len(v)
    return out


def upsample_masks(masks, size):
    """Soft masks (b, s, h, w) on the model's grid -> (b, s, H, W) at the ground-truth size, bilinear (the authors'
    convention; the figures show the masks the metrics score). Video masks (b, t, s, h, w) -> (b, t, s, H, W)."""
    flat = masks.flatten(0, -4).float()  # (b(*t), s, h, w)
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=False).view(*masks.shape[:-2], *size)


def masks_to_labels(masks, size):
    """Soft masks (b, s, h, w) -> labels (b, H, W): up-sampled to the ground-truth size (upsample_masks), then argmax
    over slots (the authors' convention). Video masks (b, t, s, h, w) -> (b, t, H, W)."""
    return upsample_masks(masks, size).argmax(-3)  # (b, H, W) or (b, t, H, W)


def perplexity(idx, num_codes):
    """Codebook usage: exp(entropy) of the code histogram of idx (any shape), num_codes if all codes are used
    equally, 1 if one code is. How many codes are in effective use (validate_vae reports it per codebook)."""
    p = torch.bincount(idx.flatten(), minlength=num_codes).float()
    p = p / p.sum()
    return math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())


def mean_and_count(values):
    """Dataset mean of per-sample values skipping NaN, and how many samples counted."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    ok = ~torch.isnan(v)
    return (v[ok].mean().item() if ok.any() else math.nan), int(ok.sum())


# -----------------------------------------------------------------------------
# Object separability of the VAE guidance (Tab. 4)


def kmeans(x, k, iters=100, seed=0):
    """Lloyd's k-means with k-means++ seeding from a seeded generator. x (n, d) -> centers (k, d), assign (n,)."""
    g = torch.Generator().manual_seed(seed)
    x = x.float().cpu()
    n, k = len(x), min(k, len(x))
    first = int(torch.randint(n, (1,), generator=g))
    centers = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)  # (n,) squared distance to the nearest chosen center
    for _ in range(1, k):  # k-means++: the next center is drawn with probability proportional to d2
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n)
        i = int(torch.multinomial(p, 1, generator=g))
        centers.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    centers = torch.stack(centers)  # (k, d)
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(1)  # (n,)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)  # (k, d)
        counts = torch.bincount(assign, minlength=k).float()[:, None]  # (k, 1)
        new = torch.where(counts > 0, sums / counts.clamp(min=1), centers)  # an empty cluster keeps its center
        if torch.allclose(new, centers):
            break
        centers = new
    return centers, torch.cdist(x, centers).argmin(1)


def separability(tokens, k, seed=0):
    """Tab. 4 on one set of tokens (n, d): k-means into k clusters, then
    inter = mean distance between the k cluster centers (all pairs; larger = clusters further apart) and
    intra = mean distance of a token to its own cluster's center (smaller = tighter clusters)."""
    centers, assign = kmeans(tokens, k, seed=seed)
    k = len(centers)
    pair = torch.cdist(centers, centers)  # (k, k)
    inter = pair[torch.triu_indices(k, k, 1).unbind()].mean().item() if k > 1 else math.nan
    intra = (tokens.float().cpu() - centers[assign]).norm(dim=1).mean().item()
    return inter, intra


def guidance_separability(x, k, seed=0):
    """Mean (inter, intra) over the images of a batch of guidance X (b, c, h, w), one k-means per image on its
    h*w tokens, after scaling every token to unit length (so VAEs with c = 256 and c = 4, or differently scaled
    codes, are compared on the geometry of directions)."""
    results = []
    for img in x:
        # ours: unit-length tokens before Tab. 4's k-means
        tokens = F.normalize(img.flatten(1).t().float(), dim=1)  # (h*w, c)
        results.append(separability(tokens, k, seed))
    inter, intra = zip(*results)
    return float(np.nanmean(inter)), float(np.mean(intra))


# -----------------------------------------------------------------------------
# Evaluation loops of both stages: what train_vae.py / train_ocl.py validate with and what the CLI reports


@torch.no_grad()
def validate_vae(model, dataset, device, batch_size, max_batches=0, clusters=0, seed=0):
    """Stage 1 on the first `max_batches` batches of `dataset` (0 = all of it): the reconstruction MSE per scale
    (`recon<n>`), the usage of every codebook k at every scale n (`perplexity<n>_<k>`, and `used<n>_<k>` = the share
    of its codes used), the singular values of W where there is one (`w_sigma_max`, `w_sigma_min`; 1 and 1 for
    orthonormal columns) and the raw W's scale (`w_raw_scale`), for multi-scale VAEs the share of scale n's
    super-pixels whose code scale j won in Eq. 4 (`wins<n>_<j>`), and with clusters = k > 0 Tab. 4's separability of
    the scale-1 guidance (one k-means per image). Videos are scored on every frame. Returns a dict of floats; the
    model's train/eval mode is kept."""
    was_training = model.training
    model.eval()
    sums, count, all_idx, inter, intra, wins = {}, 0, [], [], [], 0
    for i, batch in enumerate(_loader(dataset, batch_size)):
        if max_batches and i == max_batches:
            break
        image = data.video_frames(batch["image"]).to(device)  # (b, 3, H, W); videos: every frame of b clips
        out = model(image)
        for k, v in out["logs"].items():
            if k.startswith("recon"):  # the batch mean, weighted by the batch size: the mean over all images
                sums[k] = sums.get(k, 0.0) + v.item() * len(image)
        count += len(image)
        all_idx.append([idx.cpu() for idx in out["indices"]])  # per scale (b, g, h, w)
        if "wins" in out["parts"][0]:  # (N, N): row n, how many of scale n's super-pixels each scale won (Eq. 4)
            wins = wins + torch.stack([p["wins"].cpu() for p in out["parts"]])
        for x in out["xs"][0] if clusters else []:  # x (c, h, w): one image's scale-1 guidance
            e, a = guidance_separability(x[None], clusters, seed=seed)
            inter.append(e)
            intra.append(a)
    metrics = {k: v / count for k, v in sums.items()}
    for n in range(len(all_idx[0])):  # per scale, per index group
        idx = torch.cat([a[n] for a in all_idx])  # (B, g, h, w)
        for k in range(idx.shape[1]):
            m = model.vocab[k]
            metrics[f"perplexity{n + 1}_{k}"] = perplexity(idx[:, k], m)
            metrics[f"used{n + 1}_{k}"] = len(idx[:, k].unique()) / m
    for n, row in enumerate(wins / wins.sum(1, keepdim=True) if torch.is_tensor(wins) else []):  # shares per row
        metrics.update({f"wins{n + 1}_{j + 1}": share.item() for j, share in enumerate(row)})
    if getattr(model, "weight", None) is not None:  # W of Eq. 3/5 (gdr, msf): its conditioning, and how far Adam
        sigma = torch.linalg.svdvals(model.projection().detach().float())  # moved the raw W's scale (1 at init)
        metrics["w_sigma_max"], metrics["w_sigma_min"] = sigma.max().item(), sigma.min().item()
        metrics["w_raw_scale"] = (model.weight.detach().float().norm() / model.weight.shape[1] ** 0.5).item()
    if clusters:
        metrics["inter_cluster"], metrics["intra_cluster"] = float(np.nanmean(inter)), float(np.mean(intra))
    model.train(was_training)
    return metrics


@torch.no_grad()
def validate_ocl(model, dataset, device, batch_size, max_batches=0, size_split=True, protocol="ours", name="",
                 thresholds=(COCO_SMALL, COCO_LARGE)):
    """Stage 2 on the first `max_batches` batches of `dataset` (0 = all of it): the slots' masks (model.segment: no
    decoder, no noise) -> labels at the ground-truth resolution -> ARI, ARIfg, mIoU, mBO per sample (video: per
    whole clip, all frames jointly, plus `video_metrics`: ARIfg per frame, and without frame 0); datasets that
    store object areas (COCO, Open Images, shapes) add the size split of Tab. 7 (`size_split`; `thresholds` of
    area: COCO's, or the dataset's meta record's `size_thresholds`, see size_thresholds). `protocol`: "ours" or
    "authors" (PROTOCOLS; `name` = the dataset's, for authors_truth). Returns ({metric: (N,) values}, the last
    batch's (image, segment, pred, masks) for figures); the model's mode and every random generator are kept."""
    was_training = model.training
    model.eval()
    values = {k: [] for k in ("ari", "ari_fg", "miou", "mbo")}
    last = None
    for i, batch in enumerate(_loader(dataset, batch_size)):
        if max_batches and i == max_batches:
            break
        image, segment = batch["image"].to(device), batch["segment"]  # (b, 3, H, W), (b, H, W); video: (b, t, ...)
        bbox = batch["bbox"].to(device) if "bbox" in batch else None  # video (b, t, K, 4): box queries
        if protocol == "authors":
            segment = authors_truth(segment, name)
        masks = model.segment(image, bbox)["masks"]  # (b, s, h, w), video (b, t, s, h, w): whole clips
        pred = masks_to_labels(masks, segment.shape[-2:]).cpu()  # (b, H, W), video (b, t, H, W)
        for k, v in all_metrics(pred, segment, protocol).items():  # video: all frames of a clip jointly
            values[k].append(v)
        if pred.dim() == 4:  # video: ARIfg frame by frame, and over the clip without its first frame
            for k, v in video_metrics(pred, segment).items():
                values.setdefault(k, []).append(v)
        if "areas" in batch and size_split:  # areas[:, k-1] = original area of object k
            for k, v in miou_by_size(pred, segment, batch["areas"], thresholds, protocol).items():
                values.setdefault(f"miou_{k}", []).append(v)
        last = (image, segment, pred, masks)
    model.train(was_training)
    return {k: torch.cat(v) for k, v in values.items()}, last


def size_thresholds(dataset):
    """The (small, large) area thresholds of Tab. 7 for a dataset (or a Subset of one): its meta record's
    `size_thresholds` where it has them (shapes), else COCO's 32^2 and 96^2."""
    meta = getattr(dataset, "meta", None) or getattr(getattr(dataset, "dataset", None), "meta", {})
    return tuple(meta.get("size_thresholds", (COCO_SMALL, COCO_LARGE)))


def summary(values):
    """{metric: (dataset mean skipping NaN, samples counted)} of validate_ocl's per-sample values."""
    return {k: mean_and_count(v) for k, v in values.items()}


# -----------------------------------------------------------------------------
# Command line: score a checkpoint of either stage


def evaluate_vae(ckpt, args, device):
    """A VAE checkpoint: reconstruction error per scale, codebook usage and Tab. 4's separability of the scale-1
    guidance; --viz N writes Fig. 3 style PNGs."""
    model = msf.load_vae(ckpt, device)
    a = ckpt["args"]
    dataset = data.load_dataset(a["dataset"], args.split, args.data_root or a["data_root"], a["resolution"])
    dataset = _first(dataset, args.limit)
    k = args.clusters or data.DATASETS[a["dataset"]]["num_slots"]
    m = validate_vae(model, dataset, device, args.batch_size or 32, clusters=k, seed=args.seed)
    first = dataset[0]["image"]  # (3, H, W), or (T, 3, H, W) for a video: every frame was scored
    count = len(dataset) * (len(first) if first.dim() == 4 else 1)
    result = {"ckpt": str(args.ckpt), "kind": "vae", "seed": a.get("seed"), "split": args.split, "samples": count,
              "separability": {"inter_cluster": m["inter_cluster"], "intra_cluster": m["intra_cluster"], "clusters": k},
              "reconstruction_mse": {n: v for n, v in m.items() if n.startswith("recon")},
              "codebook_usage": {n: v for n, v in m.items() if n.startswith(("perplexity", "used"))},
              "projection": {n: v for n, v in m.items() if n.startswith("w_")},
              "scale_wins": {n: v for n, v in m.items() if n.startswith("wins")}}
    print(f"{Path(args.ckpt)}: VAE {ckpt['model_args']['kind']} c={ckpt['model_args']['code_dim']} on "
          f"{a['dataset']}/{args.split} ({count} images)")
    print(f"  separability of scale-1 guidance (Tab. 4, k = {k}): inter-cluster {m['inter_cluster']:.3f}"
          f" | intra-cluster {m['intra_cluster']:.3f}")
    print("  reconstruction MSE: " + " | ".join(f"scale {n[5:]} {v:.4f}" for n, v in result["reconstruction_mse"].items()))
    print("  codebook perplexity: " + " | ".join(f"{n[10:]} {v:.1f}" for n, v in result["codebook_usage"].items()
                                                 if n.startswith("perplexity")))
    if result["scale_wins"]:  # row n: of scale n's super-pixels, the share whose code scale j won (Eq. 4)
        print("  Eq. 4, share won by each scale: " + " | ".join(f"scale {n[4]} <- {n[6:]} {v:.2f}"
                                                              for n, v in result["scale_wins"].items()))
    if args.viz:  # Fig. 3: per scale, the codes before / after inter-scale fusion, the scale-variant codes, X
        image = data.video_frames(next(iter(_loader(dataset, args.viz)))["image"])[:args.viz]  # (v, 3, H, W)
        figures.vae_fig3(_figure_dir(args), model, image.to(device))
    return result


@torch.no_grad()
def evaluate_ocl(ckpt, args, device):
    """An OCL checkpoint on a split: the metrics table (x100, two decimals, as in the paper), the size split where
    the dataset stores object areas, and --viz figures (Fig. 2; diffusion: reconstructions through the sampler)."""
    model, ckpt = ocl.load_ocl(ckpt, device, args.dino_weights)
    # EXERCISE: test-iters (EXERCISES.md 7): model.slot_attention.iters = 5 (trained with 3) before scoring
    a = ckpt["args"]
    dataset = data.load_dataset(a["dataset"], args.split, args.data_root or a["data_root"], semantic=args.semantic)
    dataset = _first(dataset, args.limit)
    batch_size = args.batch_size or (a.get("val_batch_size", 4) if model.video else 32)
    values, _ = validate_ocl(model, dataset, device, batch_size, size_split=not args.semantic,
                             protocol=args.protocol, name=a["dataset"], thresholds=size_thresholds(dataset))
    stats = summary(values)
    encoder = {"cnn": "", "dino": ", DINO big-little encoder"}[ckpt["model_args"]["encoder"]]
    encoder += " (RANDOM DINO weights: a smoke run)" if a.get("dino_weights") == "random" else ""
    target = f"{msf.vae_name(ckpt['vae']['model_args'])} VAE" if ckpt["vae"] else "DINO's features (DINOSAUR)"
    print(f"{args.ckpt}: {a['decoder']} + {target}{encoder}, step {ckpt['step']}, "
          f"{a['dataset']}/{args.split}" + (", the authors' metric protocol" if args.protocol == "authors" else ""))
    columns = [("ARI", "ari"), ("ARIfg", "ari_fg"), ("mIoU", "miou"), ("mBO", "mbo")]
    if "ari_fg_frame" in stats:  # video: the metrics are over whole clips; ARIfg frame by frame beside them
        print(f"  video: metrics over whole clips ({len(dataset[0]['image'])} frames jointly); ARIfg_t = ARIfg of "
              f"each frame alone, averaged (ARIfg_t - ARIfg: what slots changing objects between frames cost); "
              f"ARIfg_1+ = ARIfg over frames 1.. jointly (the clip without the frame whose boxes the model is given)")
        columns[4:4] = [("ARIfg_t", "ari_fg_frame"), ("ARIfg_1+", "ari_fg_later")]
    if "miou_small" in stats:  # Tab. 7: mIoU of small / medium / large objects (size_thresholds)
        columns += [("mIoU_S", "miou_small"), ("mIoU_M", "miou_medium"), ("mIoU_L", "miou_large")]
    first = 6 if "ari_fg_frame" in stats else 4  # the first row: ARI .. mBO (and ARIfg_t, _1+), then the size split
    for row in (columns[:first], columns[first:]):
        if row:
            print(f"{'':>8} " + " ".join(f"{name:>7}" for name, _ in row))
            print(f"{'x100':>8} " + " ".join(f"{100 * stats[k][0]:7.2f}" for _, k in row))
            print(f"{'samples':>8} " + " ".join(f"{stats[k][1]:7d}" for _, k in row))
    if args.viz:  # Fig. 2 (video: a strip per clip); SlotDiffusion on images: its sampler's reconstructions too
        out_dir, batch = _figure_dir(args), next(iter(_loader(dataset, args.viz)))
        image, segment = batch["image"].to(device), batch["segment"]  # (v, 3, H, W), (v, H, W); video (v, t, ...)
        out = model.segment(image, batch["bbox"].to(device) if "bbox" in batch else None)  # masks (v(, t), s, h, w)
        masks = upsample_masks(out["masks"], segment.shape[-2:]).cpu()  # (v(, t), s, H, W): what the metrics score
        figures.fig2_files(out_dir, image.cpu(), segment, masks.argmax(-3), masks)  # labels as masks_to_labels
        if model.decoder_kind == "diffusion" and not model.video:  # slots -> X' (DDIM) -> pixels (VAE decoder)
            gen = torch.Generator(device=device).manual_seed(args.seed)
            figures.diffusion_recon(out_dir / "diffusion_recon.png", model, image, out["slots"], gen, out["masks"])
    return {"ckpt": str(args.ckpt), "kind": "ocl", "seed": a.get("seed"), "split": args.split, "decoder": a["decoder"],
            "step": ckpt["step"],
            "protocol": args.protocol, "metrics": {k: {"mean": m, "count": c} for k, (m, c) in stats.items()}}


def segment_images(ckpt, args, device):
    """--images FOLDER: every picture in a folder, read upright (16-bit scaled, transparency composited on the
    dataset's background: data.read_picture), prepared as the datasets' images (data.square_image: centre square,
    resized to the model's resolution) and segmented without ground truth: one Fig. 2 row per picture (image |
    prediction | one column per slot) in <out>/<name>.png and its label map <name>_labels.png (slot k = value k), by
    default out = RUN/images_<folder>. One line of warning for each picture changed on the way (16-bit, transparent,
    thin: only its centre square, small: blown up); pictures under 8 px a side are skipped."""
    model, ckpt = ocl.load_ocl(ckpt, device, args.dino_weights)
    folder, res = Path(args.images), ckpt["model_args"]["resolution"]
    out_dir = Path(args.out or Path(args.ckpt).parent / f"images_{folder.resolve().name}")  # never the run's files
    if model.video or out_dir.resolve() == folder.resolve():
        raise ValueError(f"--images: {args.ckpt} is a video model; score it on clips (--split)" if model.video else
                         f"--out {args.out} is the --images folder: the figures would replace your pictures; give another")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    written, skipped, background = [], [], dataset_background(ckpt, args)
    for path in files:
        try:
            rgb, notes = data.read_picture(path, background)  # (h, w, 3) uint8, upright; 16-bit and alpha handled
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # not a picture PIL reads (safely)
            skipped.append(f"{path.name} ({type(e).__name__})")
            continue
        (h, w), side = rgb.shape[:2], min(rgb.shape[:2])
        if side < 8:  # a few pixels a side hold nothing to segment
            skipped.append(f"{path.name} ({w}x{h} px: too small, at least 8 px a side)")
            continue
        if max(h, w) > 3 * side:
            notes.append(f"{w}x{h} px: only its centre square, 1/{max(h, w) / side:.0f} of it, is segmented")
        if side < res / 2:
            notes.append(f"{w}x{h} px: its centre square blown up {res / side:.0f}x to {res} px")
        for note in notes:
            print(f"warning: {path.name}: {note}")
        image = torch.from_numpy(data.square_image(rgb, res)).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, H, W)
        masks = model.segment(image.to(device))["masks"]  # (1, s, h, w): what validation scores
        name = path.stem if [p.stem for p in files].count(path.stem) == 1 else path.name.replace(".", "_")  # a.jpg, a.png
        name = name if f"{name}.png" not in written else f"{name}_{len(written)}"  # never two pictures on one file
        out_dir.mkdir(parents=True, exist_ok=True)
        labels = masks_to_labels(masks, (res, res)).cpu()  # (1, H, W): slot k = value k
        figures.fig2(out_dir / f"{name}.png", image, None, labels, upsample_masks(masks, (res, res)).cpu())
        Image.fromarray(labels[0].numpy().astype(np.uint8), "L").save(out_dir / f"{name}_labels.png")
        written.append(f"{name}.png")
    if not written:
        raise ValueError(f"--images {folder}: no picture to segment ({'; '.join(skipped) or 'the folder is empty'}); "
                         f"put .jpg or .png files in it")
    print(f"wrote {len(written)} figure{'s' * (len(written) != 1)} to {out_dir} (image | prediction | one column per slot)"
          + (f"; skipped what is not a picture: {', '.join(skipped)}" if skipped else ""))
    return {"ckpt": str(args.ckpt), "kind": "images", "out": str(out_dir), "figures": written, "skipped": skipped}


def dataset_background(ckpt, args, count=256):
    """What transparent pictures are composited on: the mean background colour (segment 0) of the first `count`
    training images of the model's dataset, mid-grey where it is not on disk."""
    a = ckpt["args"]
    try:
        dataset = data.load_dataset(a["dataset"], "train", args.data_root or a["data_root"],
                                    ckpt["model_args"]["resolution"])
    except (data.DatasetMissing, ValueError):  # the checkpoint travelled without its dataset
        return (128, 128, 128)
    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    pixels = torch.cat([s["image"].movedim(0, -1)[s["segment"] == 0] for s in samples])  # (n, 3) in [-1, 1]
    mean = pixels.mean(0) if len(pixels) else torch.zeros(3)  # (3,)
    return tuple(int(v) for v in ((mean + 1) * 127.5).round())


def _loader(dataset, batch_size):
    """The dataset in order, in batches. Its own generator: even an unshuffled DataLoader draws a seed, which would
    otherwise come from the global stream and make a validation change the noise of the training after it."""
    return torch.utils.data.DataLoader(dataset, batch_size, shuffle=False, generator=torch.Generator())


def _first(dataset, limit):  # --limit N: the first N samples of the split (0 = all)
    return torch.utils.data.Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset


def _figure_dir(args):  # --viz: the figures go beside the checkpoint, or to --out
    (out_dir := Path(args.out or Path(args.ckpt).parent)).mkdir(parents=True, exist_ok=True)
    return out_dir


def parse_args(argv=None):
    p = data.ArgumentParser(description="Evaluate an OCL checkpoint (ARI, ARIfg, mIoU, mBO) or a VAE checkpoint "
                                            "(separability).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="runs/ocl_shapes_transformer_msf/best.pt",
                   help="best.pt or last.pt of train_ocl.py or train_vae.py (default: the quick start's OCL run)")
    p.add_argument("--split", default="val",
                   help="dataset split to score: val (what tables report), select (what training picked best.pt on), "
                        "train, test, ClevrTex variants (outd, camo, ...)")
    p.add_argument("--protocol", default="ours", choices=PROTOCOLS,
                   help="ours: ignored (255) pixels count in no metric; authors: as the authors' code, predicted pixels "
                        "without ground truth count in the IoU's union and VOC's void boundary is background")
    p.add_argument("--semantic", action="store_true",
                   help="score against object classes instead of instances (VOC, COCO, Open Images conversions)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the one the checkpoint was trained with)")
    p.add_argument("--batch-size", type=data.number(int, 1), default=None,
                   help="images or clips per batch (default: 32 images; for a video OCL run, its validation batch)")
    p.add_argument("--limit", type=data.number(int, 0), default=0, help="score only the first N samples (0 = all)")
    p.add_argument("--viz", type=data.number(int, 0), default=0,
                   help="write figures for the first N samples (Fig. 2 for OCL, Fig. 3 for VAE)")
    p.add_argument("--images", default=None,
                   help="an OCL checkpoint on your own pictures: segment every picture in this folder, no ground truth "
                        "needed (figures go to --out, default RUN/images_<folder>)")
    p.add_argument("--out", default=None, help="folder for figures (default: the checkpoint's folder)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--clusters", type=data.number(int, 0), default=0,
                   help="k of the separability k-means (0: the dataset's slots)")
    p.add_argument("--seed", type=data.number(int, 0), default=0, help="seed of k-means and of any sampling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--dino-weights", default=None,
                   help="big-little OCL checkpoints: DINO's weights file (default: where the run took them); "
                        "weights other than the run's are refused")
    return p.parse_args(argv)


def main(argv=None):
    """The command line: score a checkpoint of either stage; errors a user can fix are one-line messages."""
    args = parse_args(argv)
    device = train_common.pick_device(args.device)
    if (args.viz or args.images) and args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        sys.exit(f"--out {args.out} is a file; {'--images' if args.images else '--viz'} writes its figures into a "
                 f"folder: give a folder")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        sys.exit(f"--json {args.json}: the folder {Path(args.json).parent} does not exist; create it or give another path")
    if not Path(args.ckpt).exists():
        sys.exit(f"no checkpoint at {args.ckpt}: train one first (python train_vae.py && python train_ocl.py) "
                 f"or pass --ckpt PATH")
    try:
        ckpt = checkpoints.load_checkpoint(args.ckpt)
        if args.images and (ckpt["kind"] != "ocl" or not Path(args.images).is_dir()):
            sys.exit(f"--images {args.images}: " + ("not a folder; give a folder of pictures" if ckpt["kind"] == "ocl"
                     else f"{args.ckpt} is a VAE checkpoint; --images takes an OCL one (train_ocl.py's best.pt)"))
        run = segment_images if args.images else evaluate_vae if ckpt["kind"] == "vae" else evaluate_ocl
        result = run(ckpt, args, device)
    except (ValueError, FileNotFoundError, data.DatasetMissing) as e:  # DatasetMissing is a FileNotFoundError
        sys.exit(str(e))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
