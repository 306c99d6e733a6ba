"""The built-in datasets `shapes` and `shapes_video`: renderers of synthetic scenes with exact instance masks, numpy
only. This is the file a class changes to ask a question of the data ("smaller objects: does MSF help more?"):
data.write_shapes / data.write_shapes_video store what these functions draw in the LMDB format every script reads.

Paper: MSF exists because "objects can vary in pixel sizes while models typically excel at specific pattern scales"
(Sect. 1, 3.2); `shapes` spreads object sizes 8x on purpose, and stores each object's visible area so that evaluate.py
can split mIoU by object size as Tab. 7 does.

Reading order: the shapes and textures (_shape_mask, _texture, _background), render_shapes_sample (one image),
shapes_samples (a split, one seeded generator per sample), SHAPES_SPLITS and SHAPES_SIZES; then the video dataset:
render_shapes_video (one clip), shapes_video_samples, SHAPES_VIDEO_SPLITS, SHAPES_VIDEO_FRAMES.
Imports nothing of the project.
"""
import numpy as np

# The built-in dataset `shapes`: 2-6 textured objects on a textured background, sizes spread 8x.
# MSF exists for objects of different scales, so the side length of an object spans [3/32, 3/4] of the image
# side (6 to 48 px at 64x64, SHAPES_SIDES): the largest is 8x the smallest.
# Objects are drawn back to front, largest first, so small ones occlude large ones and stay visible.

SHAPE_KINDS = ("ellipse", "rectangle", "triangle", "diamond", "hexagon", "star")
TEXTURES = ("solid", "solid", "stripes", "checker", "dots")  # solid twice: half the objects are plain


def _shape_mask(kind, cx, cy, size, angle, xx, yy):
    """Boolean mask of one shape, sampled at pixel centres (xx, yy). `size` is the bounding side length."""
    # rotate the pixel grid into the shape's frame; u, v in units of half the size
    c, s = np.cos(angle), np.sin(angle)
    u = (c * (xx - cx) + s * (yy - cy)) / (size / 2)
    v = (-s * (xx - cx) + c * (yy - cy)) / (size / 2)
    if kind == "ellipse":  # aspect ratio fixed per kind so a shape's size is its visual size
        return u ** 2 + (v / 0.7) ** 2 <= 1.0
    if kind == "rectangle":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.65)
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    # regular polygons: inside = on the inner side of every edge (convex), star = union of two triangles
    n = {"triangle": 3, "hexagon": 6, "star": 3}[kind]
    inside = _regular_polygon(u, v, n, 0.0)
    if kind == "star":
        inside |= _regular_polygon(u, v, 3, np.pi)
    return inside


def _regular_polygon(u, v, n, phase):
    inside = np.ones(u.shape, dtype=bool)
    apothem = np.cos(np.pi / n)  # circumradius 1
    for k in range(n):
        a = phase + 2 * np.pi * (k + 0.5) / n  # outward normal of edge k
        inside &= u * np.cos(a) + v * np.sin(a) <= apothem
    return inside


def _random_colour(rng, avoid=None):
    """A saturated RGB colour (floats in 0..255), at least some distance from `avoid`."""
    for _ in range(100):
        hue = rng.uniform(0, 6)
        sat, val = rng.uniform(0.55, 1.0), rng.uniform(0.5, 1.0)
        x = val * sat * (1 - abs(hue % 2 - 1))
        rgb = [(val * sat, x, 0), (x, val * sat, 0), (0, val * sat, x),
               (0, x, val * sat), (x, 0, val * sat), (val * sat, 0, x)][int(hue)]
        rgb = (np.array(rgb) + val * (1 - sat)) * 255
        if avoid is None or np.abs(rgb - avoid).sum() > 120:
            return rgb
    return rgb


def _texture(rng, kind, base, xx, yy, res):
    """Per-pixel colour (H, W, 3) of a texture with base colour `base`."""
    other = np.clip(base * rng.uniform(0.45, 0.7), 0, 255)  # a darker shade of the same colour
    if kind == "solid":
        return np.broadcast_to(base, xx.shape + (3,))
    period = rng.uniform(res / 16, res / 8)
    angle = rng.uniform(0, np.pi)
    u = np.cos(angle) * xx + np.sin(angle) * yy
    v = -np.sin(angle) * xx + np.cos(angle) * yy
    if kind == "stripes":
        on = (u / period) % 1.0 < 0.5
    elif kind == "checker":
        on = ((u // period) + (v // period)) % 2 == 0
    else:  # dots
        on = ((u / period) % 1.0 - 0.5) ** 2 + ((v / period) % 1.0 - 0.5) ** 2 < 0.09
    return np.where(on[..., None], base, other)


def _background(rng, xx, yy, res):
    """(res, res, 3) float: one colour shaded by a smooth gradient, with faint low-frequency waves (the texture)."""
    bg_a = _random_colour(rng) * 0.5
    bg_b = bg_a * rng.uniform(0.55, 0.8)  # a darker shade of the same colour: shading, not a second region
    g_angle = rng.uniform(0, 2 * np.pi)
    t = ((np.cos(g_angle) * xx + np.sin(g_angle) * yy) / res)[..., None]  # (res, res, 1)
    t = np.clip(t - t.min(), 0, 1)
    waves = 6 * np.sin(2 * np.pi * (xx * rng.uniform(1, 3) + yy * rng.uniform(1, 3)) / res)[..., None]
    return bg_a * (1 - t) + bg_b * t + waves


def render_shapes_sample(rng, res=64, min_objects=2, max_objects=6, return_objects=False, sides=None):
    """One `shapes` scene: image (res, res, 3) uint8 and exact instance masks segment (res, res) uint8. sides: the
    smallest and the largest object side in pixels at 64 px (default SHAPES_SIDES, 6 and 48: 8x apart).

    Object k (1-based, in drawing order) owns exactly the pixels whose centre lies inside its shape and
    inside no later shape: the image is painted with the same boolean masks, so the segment is exact.
    """
    yy, xx = np.mgrid[0:res, 0:res] + 0.5  # pixel centres, (res, res) each
    background = _background(rng, xx, yy, res)  # (res, res, 3) float
    for _ in range(100):  # resample until every object keeps enough visible pixels
        image = background.copy()  # (res, res, 3) float
        segment = np.zeros((res, res), dtype=np.uint8)
        n = int(rng.integers(min_objects, max_objects + 1))
        # side = smallest * (largest / smallest)^(u^0.6), u uniform: every size in between occurs (by default 6 to
        # 48 px), skewed towards larger objects (median 23 px by default) so that objects, not the background, hold
        # most of the pixels a slot must explain
        lo, hi = (s * res / 64 for s in (sides or SHAPES_SIDES))
        sizes = np.sort(lo * (hi / lo) ** (rng.uniform(size=n) ** 0.6))[::-1]
        objects, full_areas = [], []
        for k, size in enumerate(sizes, start=1):
            kind = SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
            half = size / 2
            cx, cy = rng.uniform(half, res - half), rng.uniform(half, res - half)
            angle = rng.uniform(0, 2 * np.pi)
            # work inside the shape's bounding window only (every shape lies within 1.2 * size/2 of its centre)
            r = 0.6 * size + 1
            win = (slice(max(0, int(cy - r)), min(res, int(cy + r) + 1)),
                   slice(max(0, int(cx - r)), min(res, int(cx + r) + 1)))
            mask = _shape_mask(kind, cx, cy, size, angle, xx[win], yy[win])  # (h_win, w_win) bool
            colour = _random_colour(rng, avoid=image[int(cy), int(cx)])
            texture = TEXTURES[rng.integers(len(TEXTURES))]
            image[win] = np.where(mask[..., None], _texture(rng, texture, colour, xx[win], yy[win], res), image[win])
            segment[win][mask] = k
            objects.append(dict(kind=kind, cx=cx, cy=cy, size=size, angle=angle, texture=texture))
            full_areas.append(mask.sum())
        visible = np.bincount(segment.ravel(), minlength=n + 1)[1:]
        if all(v >= max(6, 0.35 * a) for v, a in zip(visible, full_areas)):
            break
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    if return_objects:
        return image, segment, objects
    return image, segment


def shapes_samples(seed, split_id, count, res, sides=None):
    """The samples of one split: dicts of image (res, res, 3), segment (res, res) and each object's visible area."""
    for i in range(count):
        # one generator per sample: sample i is the same whatever the count or the order of generation
        rng = np.random.default_rng([seed, split_id, i])
        image, segment = render_shapes_sample(rng, res, sides=sides)
        # each object's visible area in pixels (COCO's "area"), for the size split of Tab. 7 (evaluate.miou_by_size)
        areas = np.bincount(segment.ravel(), minlength=segment.max() + 1)[1:].astype(np.float32)  # (K,)
        yield {"image": image, "segment": segment, "areas": areas}


SHAPES_SPLITS = {"train": (0, 8000), "val": (1, 500)}  # split -> (id used in the seed, default count)
# The smallest and the largest object side at 64 px (scaled with the resolution): 8x apart. `python data.py shapes
# --object-sides 24,24` (all objects alike) or `3,60` (20x: tiny to large) asks whether MSF's gain follows the spread.
SHAPES_SIDES = (6, 48)


def parse_sides(text):
    """`--object-sides lo,hi` -> (lo, hi) px at 64 px; a ValueError that names the fix where it cannot render."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{text}: give two numbers, smallest,largest (e.g. 6,48)") from None
    if not 3 <= lo <= hi <= 60:
        raise ValueError(f"{text}: need 3 <= smallest <= largest <= 60 (px at 64 px; smaller objects do not render, "
                         f"larger ones do not fit)")
    return lo, hi
# Tab. 7's size split on shapes: small < 12^2 <= medium < 20^2 <= large visible pixels at 64x64 (about the
# terciles of the objects: 36% / 38% / 26%), scaled with the image area at other resolutions. COCO's thresholds
# (32^2, 96^2 of the original image) do not fit 64 px images.
SHAPES_SIZES = (12 ** 2, 20 ** 2)


# -----------------------------------------------------------------------------
# The built-in video dataset `shapes_video`: `shapes` objects that move, turn, approach or recede (their size changes
# over a clip) and occlude each other; some enter or leave the frame. Records have MOVi's layout (image (T, H, W, 3),
# segment (T, H, W), bbox (T, K, 4)): object k keeps label k in every frame, so a slot must keep its object.

def render_shapes_video(rng, res=64, frames=12, min_objects=2, max_objects=5):
    """One clip: image (T, res, res, 3) uint8, exact instance masks segment (T, res, res) uint8 (label k = object k
    in every frame), boxes bbox (T, K, 4) float32 of each object's visible pixels, normalised (x0, y0, x1, y1), zeros
    in the frames where it is not visible (MOVi's convention).

    Object k has a depth z_t (linear in t): its side is size / z_t, and objects are drawn far to near, so the drawing
    order, hence who occludes whom, can change within a clip. Positions move with a constant velocity (0.5-2 px per
    frame at 64 px); about one object in five starts outside the frame and enters, and fast ones leave. Textures are
    painted in the object's own frame, so they move and turn with it."""
    yy, xx = np.mgrid[0:res, 0:res] + 0.5  # pixel centres, (res, res) each
    background = _background(rng, xx, yy, res)  # (res, res, 3) float, static over the clip
    for _ in range(100):  # resample until every object is seen well in some frames, and one in the first
        n = int(rng.integers(min_objects, max_objects + 1))
        objects = []
        for k in range(n):
            # side at depth 1: 6 to 48 px at 64 px, skewed towards larger objects as in `shapes` (median 23 px), so
            # that objects, not the background, hold much of what a slot must explain
            size = res * 3 / 32 * 8 ** (rng.uniform() ** 0.6)
            z0 = rng.uniform(0.8, 1.25)
            z1 = z0 * rng.uniform(0.7, 1.4)  # depth at the last frame: the side changes by up to 1.4x
            speed, heading = rng.uniform(0.5, 2.0) * res / 64, rng.uniform(0, 2 * np.pi)
            vx, vy = speed * np.cos(heading), speed * np.sin(heading)
            if rng.uniform() < 0.2:  # enters: starts outside, a few frames before the border, moving inwards
                side = size / z0 / 2 + rng.uniform(0, 3) * speed
                cx, cy = rng.choice([-side, res + side]), rng.uniform(0, res)
                vx = abs(vx) * (1 if cx < 0 else -1)
            else:
                cx, cy = rng.uniform(0.15 * res, 0.85 * res), rng.uniform(0.15 * res, 0.85 * res)
            colour = _random_colour(rng, avoid=background[int(min(max(cy, 0), res - 1)), int(min(max(cx, 0), res - 1))])
            objects.append(dict(kind=SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))], size=size, z0=z0, z1=z1,
                                cx=cx, cy=cy, vx=vx, vy=vy, angle=rng.uniform(0, 2 * np.pi),
                                spin=rng.uniform(-0.08, 0.08), colour=colour,
                                texture=TEXTURES[rng.integers(len(TEXTURES))], texture_seed=int(rng.integers(2 ** 31))))
        image = np.empty((frames, res, res, 3), np.float64)
        segment = np.zeros((frames, res, res), np.uint8)
        for t in range(frames):
            image[t] = background
            u = t / max(1, frames - 1)
            depth = [o["z0"] + (o["z1"] - o["z0"]) * u for o in objects]
            for k in sorted(range(n), key=lambda j: -depth[j]):  # far to near: the nearer occludes
                o = objects[k]
                side, cx, cy = o["size"] / depth[k], o["cx"] + o["vx"] * t, o["cy"] + o["vy"] * t
                angle = o["angle"] + o["spin"] * t
                r = 0.6 * side + 1
                win = (slice(max(0, int(cy - r)), max(0, min(res, int(cy + r) + 1))),
                       slice(max(0, int(cx - r)), max(0, min(res, int(cx + r) + 1))))
                mask = _shape_mask(o["kind"], cx, cy, side, angle, xx[win], yy[win])  # (h_win, w_win) bool
                if not mask.any():
                    continue
                c, s = np.cos(angle), np.sin(angle)  # the texture in the object's frame: it moves and turns along
                scale = o["size"] / side
                u_obj = (c * (xx[win] - cx) + s * (yy[win] - cy)) * scale
                v_obj = (-s * (xx[win] - cx) + c * (yy[win] - cy)) * scale
                paint = _texture(np.random.default_rng(o["texture_seed"]), o["texture"], o["colour"], u_obj, v_obj, res)
                image[t][win] = np.where(mask[..., None], paint, image[t][win])
                segment[t][win][mask] = k + 1
        visible = np.stack([np.bincount(s.ravel(), minlength=n + 1)[1:] for s in segment])  # (T, n) pixels
        if (visible[0] >= 6).any() and ((visible >= 6).sum(0) >= 3).all():
            break
    bbox = np.zeros((frames, n, 4), np.float32)
    for t in range(frames):
        for k in range(n):
            ys, xs = np.nonzero(segment[t] == k + 1)
            if len(ys):  # (x0, y0, x1, y1) of the visible pixels, normalised by the frame size
                bbox[t, k] = (xs.min() / res, ys.min() / res, (xs.max() + 1) / res, (ys.max() + 1) / res)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), segment, bbox


def shapes_video_samples(seed, split_id, count, res, frames):
    """The clips of one split: dicts of image (T, res, res, 3), segment (T, res, res) and bbox (T, K, 4)."""
    for i in range(count):
        rng = np.random.default_rng([seed, split_id, i, 1])  # one generator per clip (the 1: not a `shapes` stream)
        image, segment, bbox = render_shapes_video(rng, res, frames)
        yield {"image": image, "segment": segment, "bbox": bbox}


SHAPES_VIDEO_SPLITS = {"train": (0, 2000), "val": (1, 200)}  # split -> (id used in the seed, default count)
SHAPES_VIDEO_FRAMES = 12  # frames per clip (MOVi: 24); stage 2 trains on strided crops of them (train_common.crop_clips)
