"""Figures, written as PNG with Pillow: the paper's Fig. 2 (image, ground truth, prediction, one column per slot) and
Fig. 3 (the codes of every scale before and after inter-scale fusion, coloured by a PCA), reconstructions row by
row, and every run's curves.png (its metrics.jsonl, one panel per quantity with its scales as coloured lines).

Reading order: palette, to_uint8, save_rows_png / save_grid (every figure is a grid of tiles), fig2, fig2_files,
diffusion_recon, pca_colours, fig3, vae_fig3, curves. evaluate.py --viz draws Fig. 2 (and SlotDiffusion's sampled
reconstructions) or Fig. 3 for a checkpoint, the model handed in; the training scripts draw masks.png, recon.png and
curves.png at each validation. Imports data (its IGNORE label) and nothing else of the project.
"""
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

import data

def palette(n=64):
    """n distinct colours (uint8 (n, 3)); colour i always belongs to slot / label i, in every row and figure."""
    i = np.arange(n)
    hue = (i * 0.618033988749895) % 1.0  # golden-ratio hue steps keep neighbours apart
    sat, val = 0.65 + 0.35 * (i % 2), 0.95 - 0.3 * ((i // 2) % 2)
    k = (hue[:, None] * 6 + np.array([5, 3, 1])) % 6  # HSV -> RGB
    rgb = val[:, None] * (1 - sat[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1))
    return (rgb * 255).astype(np.uint8)


def to_uint8(images):
    """Images (..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8 numpy, the inverse of the dataset's normalisation."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().movedim(-3, -1).cpu().numpy()


def save_rows_png(path, rows, scale=2, labels=None):
    """A grid of images, e.g. inputs and reconstructions: rows is a list of (b, 3, H_r, W_r) batches in [-1, 1],
    each resized (nearest) to the first row's size; one image per column; `labels`: one name per row."""
    size = rows[0].shape[-2:]
    save_grid(path, [list(to_uint8(F.interpolate(r.float(), size=size))) for r in rows], scale, labels)


def save_grid(path, rows, scale=2, labels=None):
    """rows: lists of tiles (H, W_i, 3) uint8, the tiles of a row of one height -> a PNG with 2 white pixels between
    tiles and rows, enlarged `scale` times (nearest); `labels`: one text per row, written on a margin at its left."""
    sep = [np.full((t[0].shape[0], 2, 3), 255, np.uint8) for t in rows]  # (H_r, 2, 3) per row
    strips = [np.concatenate([c for tile in tiles for c in (tile, s)], axis=1) for tiles, s in zip(rows, sep)]
    width = max(r.shape[1] for r in strips)
    strips = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in strips]
    img = Image.fromarray(np.concatenate(strips))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if labels:  # text at the final scale: sharp whatever `scale` is
        draw = ImageDraw.Draw(img)
        margin = 8 + max(int(draw.textlength(t)) for t in labels)
        img, top = ImageOps.expand(img, (margin, 0, 0, 0), fill="white"), 0
        draw = ImageDraw.Draw(img)
        for text, strip in zip(labels, strips):
            draw.text((4, top + scale * strip.shape[0] // 2), text, fill="black", anchor="lm")
            top += scale * strip.shape[0]
    img.save(path)


def _colour_labels(image, labels, alpha=0.6):
    """Blend the colour of each label over the image; ignored pixels (255) are white."""
    pal = palette(256)
    pal[data.IGNORE] = 255  # ignored pixels are white
    col = pal[labels.cpu().numpy().astype(np.int64) % 256]
    return (alpha * col + (1 - alpha) * image).astype(np.uint8)


def fig2(path, images, true, pred, masks, scale=2):
    """Fig. 2 style: one row per sample, columns image | ground truth | predicted segmentation | one column per
    slot (the image where the slot's mask is high, white elsewhere, under a bar of the slot's colour).
    images (b, 3, H, W) in [-1, 1]; true, pred (b, H, W); masks (b, s, H, W) soft masks summing to 1 over slots, at
    the image's size (evaluate.upsample_masks: the masks the metrics score). true None: no ground-truth column."""
    pal = palette(256)
    rows = []
    for i in range(len(images)):
        img = to_uint8(images[i])  # (H, W, 3)
        cols = [img, *([] if true is None else [_colour_labels(img, true[i])]), _colour_labels(img, pred[i])]
        for s in range(masks.shape[1]):
            m = masks[i, s].detach().float().cpu().numpy()[..., None]  # (H, W, 1)
            tile = (m * img + (1 - m) * 255).astype(np.uint8)
            tile[: max(2, img.shape[0] // 16)] = pal[s]  # the slot's colour, as in the segmentation column
            cols.append(tile)
        rows.append(cols)
    save_grid(path, rows, scale)


def fig2_files(out_dir, images, true, pred, masks):
    """evaluate.py --viz: fig2.png for a batch of images, or one strip clip_NNN.png per clip (rows: frames; a slot
    keeps its colour in every row): images (v(, t), 3, H, W); true, pred (v(, t), H, W); masks (v(, t), s, H, W)."""
    if images.dim() == 5:
        for i in range(len(images)):
            fig2(out_dir / f"clip_{i:03d}.png", images[i], true[i], pred[i], masks[i])
        print(f"wrote {len(images)} clip strips clip_NNN.png to {out_dir} (rows: frames; columns: image | ground "
              f"truth | prediction | one column per slot)")
    else:
        fig2(out_dir / "fig2.png", images, true, pred, masks)
        print(f"wrote {out_dir / 'fig2.png'} (image | ground truth | prediction | one column per slot)")


@torch.no_grad()
def diffusion_recon(path, model, image, slots, generator, masks=None):
    """SlotDiffusion's reconstructions through its sampler: rows image | the VAE's decoding of the diffused latent
    (X, or Z_1 with --diffusion-target z) | the VAE's decoding of the latent DDIM samples from the slots (25 steps).
    `model` is ocl.OCL; image (v, 3, H, W); slots (v, s, d); masks (v, s, h, w), which a --mask-gate decoder reads."""
    target = model.targets(image)[1][0]  # what it diffuses, (v, c, h, w)
    sampled = model.decoder.sample(model.context(slots), target.shape, steps=25, generator=generator,
                                   masks=masks)  # (v, c, h, w)
    name = "Z_1" if model.diffuses_z else "X"
    save_rows_png(path, [image, model.vae.decoder(target), model.vae.decoder(sampled)],
                  labels=["image", f"VAE decoding of {name}", f"VAE decoding of the sampled {name}'"])
    print(f"wrote {path} (rows: image, VAE decoding of {name}, of the sampled {name}')")


def pca_colours(maps):
    """Colour token maps by a 3-component PCA fitted jointly on all of them, so one colour means one direction
    in every map passed together. maps: list of (c, h, w) -> list of (h, w, 3) uint8."""
    tokens = torch.cat([m.detach().float().cpu().flatten(1).t() for m in maps])  # (sum h*w, c)
    centred = tokens - tokens.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)  # rows of v: principal directions
    proj = centred @ v[:3].t()  # (sum h*w, <=3)
    if proj.shape[1] < 3:
        proj = F.pad(proj, (0, 3 - proj.shape[1]))
    lo, hi = proj.min(0).values, proj.max(0).values
    rgb = ((proj - lo) / (hi - lo).clamp(min=1e-8) * 255).round().byte().numpy()
    out, start = [], 0
    for m in maps:
        h, w = m.shape[-2:]
        out.append(rgb[start:start + h * w].reshape(h, w, 3))
        start += h * w
    return out


def fig3(path, image, columns, scale=2):
    """Fig. 3 style, one row per scale: the image at that scale, then each column of `columns` (a dict name ->
    list over scales of (c, h_n, w_n) token maps, e.g. scale-invariant before / after inter-scale fusion,
    scale-variant, fused), each coloured by a PCA fitted over all scales of that column, up-sampled to the image."""
    H = image.shape[-1]
    colours = {name: pca_colours(maps) for name, maps in columns.items()}
    pyramid = [image]
    rows = []
    for n in range(len(next(iter(columns.values())))):
        if n:
            pyramid.append(F.avg_pool2d(pyramid[-1][None], 2)[0])
        tiles = [np.asarray(Image.fromarray(to_uint8(pyramid[n])).resize((H, H), Image.NEAREST))]
        tiles += [np.asarray(Image.fromarray(colours[name][n]).resize((H, H), Image.NEAREST)) for name in columns]
        rows.append(tiles)
    save_grid(path, rows, scale, [f"scale {n + 1}" for n in range(len(rows))])
    return list(columns)


@torch.no_grad()
def vae_fig3(out_dir, model, images):
    """evaluate.py --viz on a VAE: fig3_NNN.png per image of images (v, 3, H, W), one row per scale; MSF shows its
    codes before / after inter-scale fusion, the scale-variant codes and the fused X, other VAEs their X."""
    out = model(images)
    parts, xs = out["parts"], out["xs"]  # per scale: the quantiser's parts, X_n (v, c, h_n, w_n)
    for i in range(len(images)):
        if "q_si_own" in parts[0] and len(parts[0]["q"]) == 2:
            columns = {"si before inter-scale fusion": [p["q_si_own"][i] for p in parts],
                       "si after inter-scale fusion": [p["q"][0][i] for p in parts],
                       "scale-variant": [p["q"][1][i] for p in parts], "fused X": [x[i] for x in xs]}
        else:
            columns = {"X": [x[i] for x in xs]}
        fig3(out_dir / f"fig3_{i:03d}.png", images[i], columns)
    print(f"wrote {len(images)} Fig. 3 style PNGs to {out_dir} (columns: image, {', '.join(columns)}; one row per scale)")


# curves.png: one panel per quantity, the scales or codebooks of a quantity as coloured lines in that panel.
# (title, pattern of the logged names, the label of a line from the pattern's groups); the first panel that matches a
# name takes it; a logged series that no panel names gets a panel of its own, and constant series (e.g. W's singular
# values, kept at 1) are left out.
PANELS = [
    ("training loss", r"loss", lambda: "loss"),
    ("reconstruction MSE (val)", r"val_recon(\d+)", lambda n: f"scale {n}"),
    # codebook k of a scale: MSF's 0 scale-invariant, 1 scale-variant; GDR's two groups; the VQ-VAE's one codebook
    ("codebook perplexity (val)", r"val_perplexity(\d+)_(\d+)", lambda n, k: f"scale {n} book {k}"),
    ("share of codes used (val)", r"val_used(\d+)_(\d+)", lambda n, k: f"scale {n} book {k}"),
    ("Eq. 4: scale 1's super-pixels won by", r"val_wins1_(\d+)", lambda j: f"scale {j}"),
    ("segmentation (val, x100)", r"val_(ari|ari_fg|miou|mbo)", lambda m: {"ari": "ARI", "ari_fg": "ARIfg", "miou": "mIoU",
                                                                       "mbo": "mBO"}[m]),
    ("mIoU by object size (val, x100)", r"val_miou_(small|medium|large)", lambda k: k),
    ("video ARIfg (val, x100)", r"val_ari_fg_(t|later)", lambda k: {"t": "per frame", "later": "frames 1+"}[k]),
]
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def curves(jsonl, path, columns=3, size=(330, 220)):
    """curves.png of a run, from its metrics.jsonl (the training scripts redraw it at every validation): one panel per
    quantity (PANELS), its scales or codebooks as coloured lines with a legend, value ticks on both axes, the training
    loss on a log axis when it spans a decade or more; segmentation metrics x100."""
    series = {}  # name -> [(step, value)], in the order of the log
    for line in Path(jsonl).read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        for name, value in record.items():
            if (name == "loss" or name.startswith("val_")) and isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(name, []).append((record["step"], value))
    series = {k: v for k, v in series.items() if max(p[1] for p in v) > min(p[1] for p in v) or len(v) == 1}
    panels = {}  # title -> {label: points}
    for name, points in series.items():
        for title, pattern, label in PANELS + [(name, re.escape(name), lambda *a: name)]:
            m = re.fullmatch(pattern, name)
            if m:
                scale = 100 if title.endswith("x100)") else 1
                panels.setdefault(title, {})[label(*m.groups())] = [(s, scale * v) for s, v in points]
                break
    if not panels:
        return
    w, h = size
    rows = -(-len(panels) // columns)  # ceil
    steps = [s for lines in panels.values() for points in lines.values() for s, _ in points]
    first, last = min(steps), max(steps)  # one step axis for every panel
    img = Image.new("RGB", (columns * w, rows * h), "white")
    draw = ImageDraw.Draw(img)
    for i, (title, lines) in enumerate(panels.items()):
        x0, y0 = (i % columns) * w + 52, (i // columns) * h + 22  # the plot area: (x0, y0) to (x0 + pw, y0 + ph)
        pw, ph = w - 64, h - 76
        values = [v for points in lines.values() for _, v in points]
        lo, hi = min(values), max(values)
        log = title == "training loss" and lo > 0 and hi / lo >= 10  # a loss over decades reads on a log axis
        f = (lambda v: math.log10(v)) if log else (lambda v: v)
        flo, fhi = f(lo), f(hi)
        fhi = fhi if fhi > flo else flo + 1
        X = lambda s: x0 + pw * (s - first) / max(1, last - first)  # noqa: E731
        Y = lambda v: y0 + ph * (1 - (f(v) - flo) / (fhi - flo))  # noqa: E731
        draw.rectangle((x0, y0, x0 + pw, y0 + ph), outline=(180, 180, 180))
        for k in range(3):  # value ticks: bottom, middle, top
            v = 10 ** (flo + k * (fhi - flo) / 2) if log else lo + k * (hi - lo) / 2
            draw.line((x0 - 3, Y(v), x0, Y(v)), fill="gray")
            draw.text((x0 - 5, Y(v)), f"{v:.3g}", fill="gray", anchor="rm")
        for k in range(3):  # step ticks
            s = first + k * (last - first) // 2
            draw.line((X(s), y0 + ph, X(s), y0 + ph + 3), fill="gray")
            draw.text((X(s), y0 + ph + 5), f"{s}", fill="gray", anchor="mt")
        draw.text((x0, y0 - 5), title + (" (log)" if log else ""), fill="black", anchor="lb")
        for j, (label, points) in enumerate(lines.items()):
            colour = COLOURS[j % len(COLOURS)]
            xy = [(X(s), Y(v)) for s, v in points]
            draw.line(xy, fill=colour, width=2) if len(xy) > 1 else draw.ellipse(
                (xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2), fill=colour)
            lx, ly = x0 + (j % 3) * (pw // 3), y0 + ph + 20 + (j // 3) * 12  # the legend, 3 entries a row
            draw.line((lx, ly + 5, lx + 10, ly + 5), fill=colour, width=3)
            draw.text((lx + 13, ly), f"{label} {points[-1][1]:.3g}"[:18], fill="black")
    img.save(path)
