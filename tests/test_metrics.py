"""evaluate.py metrics against independent oracles: scikit-learn's adjusted_rand_score (ARI, ARIfg), a brute-force
best permutation (mIoU), hand-computed cases (mBO, size split, NaN rules), k-means on points with a known answer,
and the figures (figures.py): the colour rule, the row labels, the curves.

Run: python -m pytest -q tests/test_metrics.py
"""
import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import adjusted_rand_score

import evaluate
import figures


def sk_ari(pred, true, fg=False):
    """scikit-learn on the same pixel subset, one sample at a time; NaN where the subset is empty."""
    out = []
    for p, t in zip(pred.reshape(len(pred), -1).numpy(), true.reshape(len(true), -1).numpy()):
        keep = (t != 255) & ((t != 0) if fg else True)
        out.append(adjusted_rand_score(t[keep], p[keep]) if keep.any() else math.nan)
    return np.array(out)


def random_case(rng, b, shape, k_true, k_pred, ignore_frac=0.0, blocky=False):
    if blocky:  # structured: segments are rectangles, predictions are shifted rectangles
        true = np.zeros((b,) + shape, np.int64)
        pred = np.zeros((b,) + shape, np.int64)
        for i in range(b):
            for k in range(1, k_true):
                y, x = rng.integers(0, shape[-2] - 2), rng.integers(0, shape[-1] - 2)
                true[i, ..., y:y + rng.integers(2, 6), x:x + rng.integers(2, 6)] = k
            for k in range(1, k_pred):
                y, x = rng.integers(0, shape[-2] - 2), rng.integers(0, shape[-1] - 2)
                pred[i, ..., y:y + rng.integers(2, 8), x:x + rng.integers(2, 8)] = k
    else:
        true = rng.integers(0, k_true, (b,) + shape)
        pred = rng.integers(0, k_pred, (b,) + shape)
    if ignore_frac:
        true[rng.random(true.shape) < ignore_frac] = 255
    return torch.from_numpy(pred), torch.from_numpy(true)


def test_ari_and_arifg_equal_scikit_learn_on_hundreds_of_cases():
    rng = np.random.default_rng(0)
    cases = 0
    for trial in range(60):
        for shape in [(12, 12), (3, 8, 8)]:  # image and video (all frames jointly)
            k_true, k_pred = int(rng.integers(1, 12)), int(rng.integers(1, 12))
            ignore = [0.0, 0.2][trial % 2]
            pred, true = random_case(rng, 4, shape, k_true, k_pred, ignore, blocky=trial % 3 == 0)
            pred = pred * int(rng.integers(1, 50)) + int(rng.integers(0, 1000))  # arbitrary label values
            for fg in (False, True):
                ours = evaluate.ari(pred, true, foreground_only=fg).numpy()
                ref = sk_ari(pred, true, fg)
                np.testing.assert_allclose(ours, ref, atol=1e-6, equal_nan=True)
                cases += len(ref)
    assert cases >= 900


def test_ari_special_cases_match_scikit_learn():
    one = torch.zeros(1, 4, 4, dtype=torch.long)
    many = torch.arange(16).view(1, 4, 4)
    for pred, true in [(one, one), (many, one), (one, many), (many, many), (one[:, :1, :1], one[:, :1, :1])]:
        assert evaluate.ari(pred, true).item() == pytest.approx(sk_ari(pred, true)[0], abs=1e-6)


def test_perfect_permuted_and_merged_predictions():
    rng = np.random.default_rng(1)
    true = torch.from_numpy(rng.integers(0, 5, (3, 16, 16)))
    true[:, :2] = 255
    perm = torch.tensor([3, 0, 4, 1, 2])
    pred = perm[true.clamp(max=4)]  # the same segments under other names
    pred[true == 255] = 7  # whatever is predicted on ignored pixels does not count
    for metric in (evaluate.ari, evaluate.miou, evaluate.mbo):
        assert torch.all(metric(true.clamp(max=4), true) == 1.0)
        assert torch.all(metric(pred, true) == 1.0)
    assert torch.all(evaluate.ari(pred, true, foreground_only=True) == 1.0)
    merged = torch.zeros_like(true)
    assert torch.allclose(evaluate.ari(merged, true), torch.zeros(3), atol=1e-7)


def brute_force_miou(pred, true):
    t_labels = [v for v in np.unique(true) if v != 255]
    keep = true != 255
    p_labels = list(np.unique(pred[keep])) if keep.any() else []
    iou = np.zeros((len(t_labels), max(len(p_labels), 1)))
    for i, t in enumerate(t_labels):
        for j, p in enumerate(p_labels):
            inter = ((true == t) & (pred == p) & keep).sum()
            union = (((true == t) | (pred == p)) & keep).sum()
            iou[i, j] = inter / union if union else 0
    best = 0.0
    n_p = iou.shape[1]
    for perm in itertools.permutations(range(max(n_p, len(t_labels))), len(t_labels)):
        best = max(best, sum(iou[i, j] for i, j in enumerate(perm) if j < n_p))
    return best / len(t_labels) if t_labels else math.nan


def test_miou_equals_brute_force_best_permutation():
    rng = np.random.default_rng(2)
    for trial in range(60):
        k_true, k_pred = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        pred, true = random_case(rng, 2, (6, 6), k_true, k_pred, 0.15 * (trial % 2), blocky=trial % 2 == 0)
        ours = evaluate.miou(pred, true).numpy()
        for i in range(2):
            ref = brute_force_miou(pred[i].numpy(), true[i].numpy())
            assert ours[i] == pytest.approx(ref, abs=1e-6) or (math.isnan(ref) and math.isnan(ours[i]))


def test_mbo_and_miou_hand_computed():
    # true: background left half, object 1 top-right, object 2 bottom-right (4x4)
    true = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 2, 2]]])
    # pred: slot 5 = left half + top-right (merges bg and object 1), slot 6 = bottom-right
    pred = torch.tensor([[[5, 5, 5, 5], [5, 5, 5, 5], [5, 5, 6, 6], [5, 5, 6, 6]]])
    # IoUs: bg-slot5 = 8/12, obj1-slot5 = 4/12, obj2-slot6 = 1
    assert evaluate.mbo(pred, true).item() == pytest.approx((8 / 12 + 4 / 12 + 1) / 3)
    assert evaluate.miou(pred, true).item() == pytest.approx((8 / 12 + 0 + 1) / 3)  # obj1 unmatched: 0
    assert evaluate.ari(pred, true, foreground_only=True).item() == pytest.approx(1.0)  # fg split is exact


def test_undefined_samples_are_nan_and_skipped():
    true = torch.stack([torch.zeros(4, 4, dtype=torch.long), torch.full((4, 4), 255), torch.ones(4, 4, dtype=torch.long)])
    pred = torch.zeros(3, 4, 4, dtype=torch.long)
    fg = evaluate.ari(pred, true, foreground_only=True)
    assert math.isnan(fg[0]) and math.isnan(fg[1]) and fg[2] == 1.0  # no foreground / nothing annotated
    for metric in (evaluate.ari, evaluate.miou, evaluate.mbo):
        v = metric(pred, true)
        assert math.isnan(v[1]) and not math.isnan(v[0])
    assert evaluate.mean_and_count(fg) == (1.0, 1)


def test_miou_by_size_hand_computed():
    true = torch.zeros(1, 8, 8, dtype=torch.long)
    true[0, :2, :2] = 1  # small in the original image
    true[0, 4:, 4:] = 2  # large
    true[0, 0, 6:] = 3  # medium
    pred = true.clone()
    pred[0, 4:, 4:6] = 9  # half of object 2 goes to another slot
    areas = torch.tensor([[100.0, 96.0 ** 2, 40.0 ** 2]])  # original areas of labels 1, 2, 3
    out = evaluate.miou_by_size(pred, true, areas)
    assert out["small"].item() == pytest.approx(1.0)
    assert out["large"].item() == pytest.approx(0.5)  # 96^2 is large (>=), IoU 8/16
    assert out["medium"].item() == pytest.approx(1.0)
    none = evaluate.miou_by_size(pred, true, torch.tensor([[100.0, 200.0, 300.0]]))
    assert none["small"].item() == pytest.approx((1 + 0.5 + 1) / 3) and math.isnan(none["large"])


def test_masks_to_labels_upsamples_then_argmax():
    masks = torch.zeros(1, 2, 2, 2)
    masks[0, 0, :, 0] = 1  # slot 0 owns the left column, slot 1 the right
    masks[0, 1, :, 1] = 1
    labels = evaluate.masks_to_labels(masks, (4, 4))
    assert labels.shape == (1, 4, 4)
    assert (labels[0, :, :2] == 0).all() and (labels[0, :, 2:] == 1).all()
    video = torch.stack([masks, masks.flip(1)], 1)  # (1, 2 frames, 2 slots, 2, 2)
    assert evaluate.masks_to_labels(video, (4, 4)).shape == (1, 2, 4, 4)


def test_kmeans_separability_known_answer():
    # three tight clusters at the corners of an equilateral triangle of side 10, radius 1 around each
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [5.0, 5.0 * 3 ** 0.5]])
    angles = torch.arange(8) * (2 * math.pi / 8)
    ring = torch.stack([angles.cos(), angles.sin()], 1)  # 8 points at distance 1
    points = torch.cat([c + ring for c in centres])
    inter, intra = evaluate.separability(points, 3, seed=0)
    assert inter == pytest.approx(10.0, abs=1e-4) and intra == pytest.approx(1.0, abs=1e-4)
    centers, assign = evaluate.kmeans(points, 3, seed=5)
    assert len(set(assign[:8].tolist())) == 1 and len(set(assign.tolist())) == 3


def test_fig2_colours_are_stable_across_rows(tmp_path):
    b, s, H = 3, 4, 8
    images = torch.zeros(b, 3, H, H)
    true = torch.zeros(b, H, H, dtype=torch.long)
    pred = torch.randint(0, s, (b, H, H))
    masks = torch.softmax(torch.randn(b, s, H, H), 1)
    figures.fig2(tmp_path / "f.png", images, true, pred, masks, scale=1)
    img = np.asarray(Image.open(tmp_path / "f.png"))
    assert img.shape == ((H + 2) * b, (H + 2) * (3 + s), 3)
    pal = figures.palette()
    for row in range(b):
        for slot in range(s):
            x0 = (3 + slot) * (H + 2)
            assert (img[row * (H + 2), x0] == pal[slot]).all()  # the slot's bar has the slot's colour in every row
    assert len({tuple(c) for c in figures.palette(32)}) == 32


def test_pca_colours_shared_across_maps():
    a = torch.zeros(3, 2, 2)
    a[:, 0, 0] = torch.tensor([1.0, 0, 0])
    b = a.clone()
    cols = figures.pca_colours([a, b])
    assert (cols[0] == cols[1]).all()  # the same vector gets the same colour in both maps
    assert not (cols[0][0, 0] == cols[0][1, 1]).all()


def test_rows_are_labelled_on_a_margin_at_their_left(tmp_path):
    """recon.png names its rows (scale n: input / reconstruction): the labels sit on a white margin, each beside
    its own row, and the images are unchanged to the right of it."""
    rows = [torch.full((3, 3, 8, 8), v) for v in (-1.0, 0.0)]  # a black row, a grey row
    figures.save_rows_png(tmp_path / "plain.png", rows, scale=2)
    figures.save_rows_png(tmp_path / "named.png", rows, scale=2, labels=["scale 1: input", "scale 1: reconstruction"])
    plain, named = np.asarray(Image.open(tmp_path / "plain.png")), np.asarray(Image.open(tmp_path / "named.png"))
    margin = named.shape[1] - plain.shape[1]
    assert margin > 40 and named.shape[0] == plain.shape[0] and (named[:, margin:] == plain).all()
    band = plain.shape[0] // 2  # each row (with its 2-pixel gap) is half the height
    for r in range(2):  # dark text pixels in the margin, within the row's own band
        assert (named[r * band:(r + 1) * band, :margin].min(axis=2) < 128).any()


def test_curves_draw_every_quantity_against_one_step_axis(tmp_path):
    """curves.png from a metrics.jsonl: one panel per quantity (the training loss, the segmentation metrics, a VAE's
    reconstruction with one coloured line per scale; not the lr, not a constant series), y up, every panel on the same
    step axis: a falling loss runs from the plot's top left to its bottom right, a rising metric logged from step 100
    on starts a quarter of the way in, at the bottom; a loss that falls from 100 to 1 is drawn on a log axis, where it
    is a straight line through 10 at half the height."""
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 401):
            f.write(json.dumps({"step": step, "time": 0.0, "loss": 5 - step / 100, "lr": 1e-3}) + "\n")
            if step % 100 == 0:
                f.write(json.dumps({"step": step, "time": 0.0, "val_ari": step / 400, "val_mbo": 0.5,
                                    "val_recon1": 1 / step, "val_recon2": 2 / step, "val_w_sigma_max": 1.0}) + "\n")
    figures.curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    img = np.asarray(Image.open(tmp_path / "curves.png")).astype(int)
    assert img.shape == (220, 3 * 330, 3)  # 3 panels on a row: loss, segmentation (ARI), reconstruction (2 scales)
    blue, orange = figures.COLOURS[0], figures.COLOURS[1]

    def curve_near(x, y, colour=blue):  # the colour within 3 pixels of (x, y)
        window = img[y - 3:y + 4, x - 3:x + 4]
        return (np.abs(window - colour).sum(axis=2) < 60).any()
    x0, y0, pw, ph = 52, 22, 330 - 64, 220 - 76  # the first panel's plot area
    assert curve_near(x0, y0) and curve_near(x0 + pw, y0 + ph) and not curve_near(x0, y0 + ph)
    x1 = 330 + x0 + round(pw * 99 / 399)  # ARI (x100): 25 at step 100, the lowest, at the bottom: a quarter in
    assert curve_near(x1, y0 + ph) and curve_near(330 + x0 + pw, y0)
    x2 = 2 * 330 + x0 + round(pw * 99 / 399)  # reconstruction from step 100: scale 2 at 0.02 (the top), scale 1 at
    assert curve_near(x2, y0, orange)  # 0.01, (0.01 - 0.0025) / (0.02 - 0.0025) of the way up
    assert curve_near(x2, y0 + round(ph * (1 - 0.0075 / 0.0175)), blue)
    with open(tmp_path / "decades.jsonl", "w") as f:
        for step in range(1, 401):
            f.write(json.dumps({"step": step, "loss": 100 * 0.01 ** ((step - 1) / 399)}) + "\n")
    figures.curves(tmp_path / "decades.jsonl", tmp_path / "decades.png")
    img = np.asarray(Image.open(tmp_path / "decades.png")).astype(int)
    assert curve_near(x0 + pw // 2, y0 + ph // 2)  # 10 at half the steps, half the height: a log axis

def test_perplexity_of_codebook_usage():
    """exp(entropy): 8 codes used equally -> 8, one code -> 1, two codes at 3:1 -> exp(H) by hand."""
    assert evaluate.perplexity(torch.arange(8), 8) == pytest.approx(8)
    assert evaluate.perplexity(torch.zeros(10, dtype=torch.long), 8) == pytest.approx(1)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert evaluate.perplexity(torch.tensor([0, 0, 0, 5]), 8) == pytest.approx(math.exp(h))


def test_authors_protocol_counts_predictions_on_unannotated_pixels_hand_computed():
    """One 1x6 image: true = [0, 0, 1, 1, 255, 255], pred = [0, 0, 1, 1, 1, 1] (the prediction runs on into the
    unannotated pixels). Ours: the 255 pixels leave both maps, every segment is perfect. The authors' protocol
    counts them in the predicted area: IoU(object, pred 1) = 2 / 4; mBO = mIoU = (1 + 0.5) / 2. ARI and ARIfg
    ignore them under both (the authors' ARI drops pixels without ground truth too)."""
    true = torch.tensor([[[0, 0, 1, 1, 255, 255]]])
    pred = torch.tensor([[[0, 0, 1, 1, 1, 1]]])
    ours = evaluate.all_metrics(pred, true)
    theirs = evaluate.all_metrics(pred, true, protocol="authors")
    assert ours["miou"].item() == ours["mbo"].item() == 1.0
    assert theirs["miou"].item() == pytest.approx(0.75) and theirs["mbo"].item() == pytest.approx(0.75)
    assert ours["ari"].item() == theirs["ari"].item() == 1.0 and ours["ari_fg"].item() == theirs["ari_fg"].item()
    assert evaluate.miou(pred, true, "authors").item() == pytest.approx(0.75)
    assert evaluate.mbo(pred, true, "authors").item() == pytest.approx(0.75)


def test_authors_protocol_reads_voc_void_as_background():
    """VOC's void label (object boundaries) is background in the authors' evaluation, unannotated elsewhere: a
    prediction that gives the boundary to the background then scores perfectly under their protocol."""
    true = torch.tensor([[[0, 255, 1, 1]]])
    pred = torch.tensor([[[0, 0, 1, 1]]])
    voc = evaluate.authors_truth(true, "voc")
    assert voc.tolist() == [[[0, 0, 1, 1]]] and torch.equal(evaluate.authors_truth(true, "coco"), true)
    assert evaluate.all_metrics(pred, voc, "authors")["miou"].item() == 1.0
    # counted in the union but not as background (COCO's unannotated pixels), the same prediction loses 1/3
    assert evaluate.all_metrics(pred, true, "authors")["miou"].item() == pytest.approx((0.5 + 1) / 2)
