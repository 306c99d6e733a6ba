"""Video OCL (STEVE, video SlotDiffusion): the built-in `shapes_video` clips against their own masks, the strided
temporal crop, the recurrence's causality, box-conditioned queries, the video metrics on a hand-computed identity
swap, short real runs of both decoders on shapes_video, and the exact resume / DDP / non-finite checks of the image
runs (tests/test_run.py) on video runs. A converted MOVi download trains and scores in the paper chain's test
(tests/test_convert.py).

Run: python -m pytest -q tests/test_video.py
"""
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import adjusted_rand_score

import data
import shapes
import evaluate
import ocl
import train_common
import train_ocl
from slot_attention import BoxQueries, Predictor

from conftest import TINY_OCL, refused
from test_run import assert_same_weights, command, interrupt, losses, poison_third_training_loss, run


def video_args(root, vaes, out, decoder="transformer", *extra):
    return train_ocl.parse_args(["--dataset", "shapes_video", "--data-root", str(root), "--decoder", decoder,
                                 "--vae-ckpt", str(vaes[4 if decoder == "diffusion" else 256]), "--out", str(out),
                                 *TINY_OCL, "--batch-size", "2", "--clip-frames", "4", *extra])


# ----------------------------------------------------------------------------- the built-in clips


def test_shapes_video_boxes_are_the_masks_and_clips_move_scale_occlude_enter():
    """Boxes recomputed independently from the masks (np.argwhere); over 40 clips: objects move, change size by
    >= 15% within a clip, enter or leave (visible in some frames only), and who occludes whom changes."""
    moved = scaled = entered = 0
    for i in range(40):
        image, segment, bbox = shapes.render_shapes_video(np.random.default_rng([7, i]), res=64, frames=12)
        assert image.shape == (12, 64, 64, 3) and segment.shape == (12, 64, 64) and image.dtype == np.uint8
        k = bbox.shape[1]
        assert 2 <= k <= 5 and segment.max() <= k
        for t in range(12):
            for j in range(k):
                pts = np.argwhere(segment[t] == j + 1)  # (P, 2) rows, cols
                if len(pts) == 0:
                    assert (bbox[t, j] == 0).all()
                else:
                    (y0, x0), (y1, x1) = pts.min(0), pts.max(0) + 1
                    assert np.allclose(bbox[t, j], [x0 / 64, y0 / 64, x1 / 64, y1 / 64])
        area = np.stack([(segment == j + 1).sum((1, 2)) for j in range(k)], 1)  # (T, K) visible pixels
        assert (area[0] > 0).any()  # the first frame has an object to condition on
        centre = (bbox[..., :2] + bbox[..., 2:]) / 2  # (T, K, 2)
        seen = area > 0
        moved += any(np.abs(centre[seen[:, j], j][-1] - centre[seen[:, j], j][0]).max() > 4 / 64 for j in range(k))
        w = bbox[..., 2] - bbox[..., 0]  # (T, K) box widths, a proxy of size
        scaled += any(w[seen[:, j], j].max() > 1.15 * w[seen[:, j], j].min() for j in range(k) if seen[:, j].all())
        entered += (seen.any(0) & ~seen.all(0)).any()
    assert moved >= 30 and scaled >= 10 and entered >= 8


def test_shapes_video_is_deterministic_and_loads_as_clips(tmp_path):
    a = data.write_shapes_video(tmp_path / "a", 64, seed=3, counts={"train": 3, "val": 2}, frames=6, quiet=True)
    b = data.write_shapes_video(tmp_path / "b", 64, seed=3, counts={"train": 5, "val": 2}, frames=6, quiet=True)
    c = data.write_shapes_video(tmp_path / "c", 64, seed=4, counts={"train": 3, "val": 2}, frames=6, quiet=True)
    da, db, dc = (data.LMDBDataset(p / "train") for p in (a, b, c))
    for i in range(3):  # clip i depends on the seed, not on the count
        assert data.encode_record(da.record(i)) == data.encode_record(db.record(i))
        assert not np.array_equal(da.record(i)["image"], dc.record(i)["image"])
    ds = data.load_dataset("shapes_video", "val", tmp_path / "a")
    s = ds[1]
    assert s["image"].shape == (6, 3, 64, 64) and s["segment"].shape == (6, 64, 64) and s["bbox"].shape == (6, 5, 4)
    assert ds.meta["frames"] == 6 and data.DATASETS["shapes_video"]["video"]


def test_clip_starts_are_the_authors_strided_windows():
    g = torch.Generator().manual_seed(0)
    assert set(train_common.clip_starts(24, 6, 400, g).tolist()) == {0, 6, 12, 18}  # MOVi: the authors' four windows
    assert set(train_common.clip_starts(12, 6, 100, g).tolist()) == {0, 6}  # shapes_video
    assert set(train_common.clip_starts(8, 6, 100, g).tolist()) == {0}  # one window fits
    assert train_common.clip_starts(6, 8, 3, g).tolist() == [0, 0, 0]  # window longer than the clip: the whole clip


def test_crop_is_the_same_for_one_process_and_for_two():
    """The global batch's crop is a function of (seed, step): 2 processes x 2 clips crop as 1 process x 4 clips."""
    clips = torch.arange(4 * 12).float().view(4, 12, 1, 1, 1).expand(4, 12, 3, 2, 2)  # frame value = its number
    boxes = torch.rand(4, 12, 3, 4)
    one = train_common.crop_clips(clips, boxes, list(range(4)), 6, 0, 5)  # one process
    for rank in (0, 1):
        part = slice(2 * rank, 2 * rank + 2)
        mine = train_common.crop_clips(clips[part], boxes[part], list(range(4))[part], 6, 0, 5, rank, 2)
        assert torch.equal(mine[0], one[0][part]) and torch.equal(mine[1], one[1][part])
        assert mine[2] == one[2][12 * rank:12 * rank + 12]
    image, bbox, keys = one
    assert image.shape == (4, 6, 3, 2, 2) and bbox.shape == (4, 6, 3, 4)
    first = image[:, 0, 0, 0, 0] - torch.arange(4) * 12  # the first frame number of each crop
    assert set(first.tolist()) <= {0.0, 6.0} and keys[:6] == [(0, int(first[0]) + f) for f in range(6)]


# ----------------------------------------------------------------------------- the model


def tiny_video_model(vae_ckpt, decoder="transformer", queries="box", box_prior=False):
    import msf
    torch.manual_seed(0)
    vae = msf.load_vae(torch.load(vae_ckpt, weights_only=True))
    return ocl.OCL(vae, decoder, num_slots=4, resolution=64, iters=2, slot_dim=32, enc_channels=16,
                         enc_stride=4, dec_dim=32, dec_layers=1, unet_base=16, unet_layers=1, video=True,
                         queries=queries, box_prior=box_prior).eval()


def test_the_recurrence_is_causal_in_time(tiny_video_vaes):
    """Frame t's slots and masks do not change when frames after t change; they do change after the change."""
    model = tiny_video_model(tiny_video_vaes[256])
    clip, bbox = torch.rand(2, 5, 3, 64, 64) * 2 - 1, torch.rand(2, 5, 3, 4).sort(-1).values
    later = clip.clone()
    later[:, 3:] = torch.rand(2, 2, 3, 64, 64) * 2 - 1  # frames 3 and 4 replaced
    a, b = model.segment(clip, bbox), model.segment(later, bbox)
    assert torch.allclose(a["slots"][:, :3], b["slots"][:, :3], atol=1e-6, rtol=0)
    assert torch.allclose(a["masks"][:, :3], b["masks"][:, :3], atol=1e-6, rtol=0)
    assert not torch.allclose(a["slots"][:, 3:], b["slots"][:, 3:], atol=1e-3)


@pytest.mark.parametrize("box_prior", [False, True])
def test_permuting_the_boxes_permutes_the_slots_in_every_frame(box_prior, tiny_video_vaes):
    model = tiny_video_model(tiny_video_vaes[256], box_prior=box_prior)
    clip = torch.rand(2, 4, 3, 64, 64) * 2 - 1
    bbox = torch.zeros(2, 4, 3, 4)
    bbox[:, 0] = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.6], [0.2, 0.6, 0.5, 0.95]])
    perm = torch.tensor([2, 0, 1])
    a, b = model.segment(clip, bbox), model.segment(clip, bbox[:, :, perm])
    # slots 0-2 follow their boxes; slot 3 has no box (zero box) in both
    order = torch.cat([perm, torch.tensor([3])])
    assert torch.allclose(b["slots"], a["slots"][:, :, order], atol=1e-5)
    assert torch.allclose(b["masks"], a["masks"][:, :, order], atol=1e-5)


def test_box_queries_compact_visible_boxes_keep_the_largest_and_give_the_rest_learned_queries():
    q = BoxQueries(num_slots=3, dim=8)
    big, mid, small, none = [0, 0, 0.5, 0.5], [0.5, 0.5, 0.8, 0.8], [0.9, 0.9, 0.95, 0.95], [0, 0, 0, 0]
    free = q.free.mu[0]  # (s, d) the learned queries of slots without a box
    mlp = lambda boxes: q.mlp(2 * torch.tensor(boxes) - 1)  # boxes go in as [-1, 1] coordinates
    # 3 visible objects, 3 slots: the 2 largest keep their record order, the last slot starts free
    out = q(torch.tensor([[small, big, mid]]))[0]
    assert torch.allclose(out[:2], mlp([big, mid])) and torch.allclose(out[2], free[2])
    # an object not visible in the first frame (zero box) gets no box query; visible boxes move to the front
    out = q(torch.tensor([[none, mid]]))[0]
    assert torch.allclose(out[0], mlp(mid)) and torch.allclose(out[1:], free[1:])
    # the free slots are distinct (the authors' zero boxes would make them identical); the training noise sigma
    # reaches the free slots only, never a box's query
    assert not torch.allclose(out[1], out[2])
    noisy = q(torch.tensor([[none, mid]]), sigma=1.0)[0]
    assert torch.equal(noisy[0], out[0]) and not torch.allclose(noisy[1:], out[1:])


def test_the_box_prior_lets_a_box_slot_take_only_the_cells_its_box_overlaps():
    """On a 4x4 grid, cell (i, j) covers [j/4, (j+1)/4] x [i/4, (i+1)/4]. Worked by hand: the box (0.1, 0.1, 0.3, 0.2)
    overlaps cells (0, 0) and (0, 1); (0.25, 0, 0.5, 0.25) only touches cells 0 and 2 along its edges and overlaps
    cell (0, 1) alone; (0.5, 0.5, 1, 1) the bottom-right 2x2. The slot without a box may take every cell."""
    q = BoxQueries(num_slots=4, dim=8)
    none, a, b, c = [0, 0, 0, 0], [0.1, 0.1, 0.3, 0.2], [0.25, 0, 0.5, 0.25], [0.5, 0.5, 1.0, 1.0]
    prior = q.prior(torch.tensor([[none, a, b, c]]), (4, 4))[0].view(4, 4, 4)  # (s, h, w); visible boxes first
    allowed = torch.zeros(4, 4, 4, dtype=torch.bool)
    allowed[0, 0, :2] = True  # slot 0: box a
    allowed[1, 0, 1] = True  # slot 1: box b
    allowed[2, 2:, 2:] = True  # slot 2: box c
    allowed[3] = True  # slot 3: no box (the invisible record has none either)
    assert torch.equal(prior == 0, allowed) and torch.all(prior[~allowed] == -1e4)


def test_with_the_box_prior_frame_0_box_slots_attend_inside_their_boxes_only(tiny_video_vaes):
    """--box-prior: on frame 0 a box slot's attention outside the cells its box overlaps is exactly 0 (exp(-1e4)
    underflows); later frames are not restricted, and without the prior frame 0 is not either."""
    clip = torch.rand(2, 3, 3, 64, 64) * 2 - 1
    bbox = torch.zeros(2, 3, 3, 4)
    bbox[:, 0] = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.6], [0.0, 0.0, 0.0, 0.0]])  # 2 visible
    outside = torch.ones(2, 16, 16, dtype=torch.bool)  # the tiny model's 16x16 attention grid (stride 4)
    outside[0, 1:8, 1:7] = False  # cells 1.6..6.4 x 1.6..8: rows 1-7, columns 1-6
    outside[1, 3:10, 8:15] = False  # cells 8..14.4 x 3.2..9.6: columns 8-14, rows 3-9
    masks = tiny_video_model(tiny_video_vaes[256], box_prior=True).segment(clip, bbox)["masks"]  # (b, t, s, h, w)
    assert masks.shape[-2:] == (16, 16)
    assert torch.all(masks[:, 0, :2][:, outside] == 0)  # frame 0: nothing outside the boxes
    assert masks[:, 0, 2:].sum() > 0 and masks[:, 1:, :2][:, :, outside].sum() > 0  # the free slots; later frames
    plain = tiny_video_model(tiny_video_vaes[256]).segment(clip, bbox)["masks"]
    assert plain[:, 0, :2][:, outside].sum() > 0


def test_an_untrained_predictor_hands_each_slot_on_unchanged():
    """The predictor's residual branches start at zero: frame t+1's queries are frame t's slots, bit for bit, in
    training (dropout on) and evaluation, until training changes them."""
    torch.manual_seed(0)
    predictor, slots = Predictor(dim=16), torch.randn(3, 5, 16)
    assert torch.equal(predictor.train()(slots), slots) and torch.equal(predictor.eval()(slots), slots)
    with torch.no_grad():
        predictor.layer.linear2.bias.fill_(0.1)  # one trained-looking change, and the slots do change
    assert not torch.allclose(predictor(slots), slots)


def test_the_authors_box_queries_give_every_boxless_slot_the_mlp_of_the_zero_box():
    """--boxless zero (the MOVi recipes, as the authors): every box enters the MLP as it is, a slot without a box
    gets the MLP of the zero box, so all such slots start identical; no noise reaches any of them."""
    q = BoxQueries(num_slots=4, dim=8, boxless="zero")
    mid, none = [0.5, 0.5, 0.8, 0.8], [0, 0, 0, 0]
    out = q(torch.tensor([[none, mid]]), sigma=1.0)[0]  # (4, 8)
    assert q.free is None and torch.allclose(out[0], q.mlp(torch.tensor(mid)))  # the box as it is, not 2 box - 1
    assert all(torch.allclose(out[k], q.mlp(torch.zeros(4))) for k in (1, 2, 3))


def test_the_three_predictors(capsys):
    """--predictor authors: torch's layer post-norm without biases (the authors' transit); steve: STEVE's layer,
    which normalises its input first (a per-slot affine change of the input changes nothing) and ends with a
    LayerNorm; ours: pre-norm, starting as the identity (the test above). Refused on images; named in run folders
    where they differ from the dataset's recipe."""
    torch.manual_seed(0)
    authors = Predictor(16, kind="authors").layer
    assert not authors.norm_first and all(m.bias is None for m in authors.modules() if isinstance(m, torch.nn.Linear))
    steve, slots = Predictor(16, kind="steve", dropout=0.0).eval(), torch.randn(3, 5, 16)
    out = steve(slots)
    torch.testing.assert_close(steve(3 * slots + 2), out)  # the input is normalised per slot first
    torch.testing.assert_close(out.mean(-1), torch.zeros(3, 5), atol=1e-5, rtol=0)  # the final LayerNorm
    movi, video = train_ocl.parse_args(["--dataset", "movi_c"]), train_ocl.parse_args(["--dataset", "shapes_video"])
    assert (movi.predictor, movi.boxless, video.predictor, video.boxless) == ("authors", "zero", "ours", "gaussian")
    with refused(capsys, "--predictor steve sets the video model; shapes is an image dataset"):  # no predictor there
        train_ocl.parse_args(["--predictor", "steve"])
    vae_args = {"kind": "msf"}
    assert train_ocl.run_folder(video, vae_args) == "runs/ocl_shapes_video_transformer-boxprior_msf"
    other = train_ocl.parse_args(["--dataset", "shapes_video", "--predictor", "steve", "--predictor-lr", "1"])
    assert train_ocl.run_folder(other, vae_args) == "runs/ocl_shapes_video_transformer-boxprior-predsteve-plr1_msf"


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_the_predictor_learns_at_predictor_lr_times_the_lr(scale, tiny_video_root, tiny_video_vaes, tmp_path):
    """Adam's first step moves a weight by lr * g / (|g| + eps), that is by the lr itself wherever the gradient is not
    tiny. The predictor's FFN output weights start at zero, so after one step they are at most scale x lr, and the
    largest is close to it: 0.1 (the shapes_video preset) or 1.0 (the authors')."""
    extra = () if scale == 0.1 else ("--predictor-lr", str(scale))
    out = train_ocl.train(video_args(tiny_video_root, tiny_video_vaes, tmp_path, "transformer", "--steps", "1", *extra))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    lr = train_ocl.lr_at(0, 1, ckpt["args"]["lr"])  # the lr of step 1 (the warmup's end when there is one step)
    assert ckpt["args"]["predictor_lr"] == scale
    moved = ckpt["model"]["predictor.layer.linear2.weight"].abs().max().item()
    assert 0.9 * scale * lr <= moved <= scale * lr * (1 + 1e-4)


# ----------------------------------------------------------------------------- the video metrics


def test_a_slot_that_swaps_objects_between_frames_is_penalised_as_computed_by_hand():
    """Two frames of two pixels, objects 1 and 2. A prediction that keeps its slots scores 1; one that swaps the two
    slots in frame 2 is perfect frame by frame, but over the clip every (object, slot) pair holds one pixel of four:
    sum C(n_ij, 2) = 0, sum C(a_i, 2) = sum C(b_j, 2) = 2, expected = 2 * 2 / C(4, 2) = 2/3, max = 2, so
    ARI = (0 - 2/3) / (2 - 2/3) = -0.5; every IoU is 1/3 (1 shared pixel of 3), so mIoU = mBO = 1/3."""
    true = torch.tensor([[[[1, 2]], [[1, 2]]]])  # (b=1, t=2, H=1, W=2)
    keep = torch.tensor([[[[0, 1]], [[0, 1]]]])
    swap = torch.tensor([[[[0, 1]], [[1, 0]]]])
    assert evaluate.ari(keep, true, foreground_only=True).item() == 1.0
    assert evaluate.ari(swap, true, foreground_only=True).item() == pytest.approx(-0.5)
    assert adjusted_rand_score(true.flatten(), swap.flatten()) == pytest.approx(-0.5)  # the independent oracle
    assert evaluate.miou(swap, true).item() == pytest.approx(1 / 3) and evaluate.mbo(swap, true).item() == pytest.approx(1 / 3)
    per_frame = evaluate.ari(swap.flatten(0, 1), true.flatten(0, 1), foreground_only=True)  # frame by frame
    assert per_frame.tolist() == [1.0, 1.0]
    # the same swap in the FIRST of three frames: frames 1-2 alone keep their slots (ARIfg_1+ = 1), the whole clip
    # does not: pairs (object, slot) hold 1, 2, 2, 1 pixels of 6: sum C(n_ij, 2) = 2, sum C(a_i, 2) = sum C(b_j, 2)
    # = 6, expected = 36 / 15 = 2.4, max = 6, ARI = (2 - 2.4) / (6 - 2.4) = -1/9; per frame 1, 1, 1
    true3, swap3 = torch.tensor([[[[1, 2]]] * 3]), torch.tensor([[[[1, 0]], [[0, 1]], [[0, 1]]]])  # (1, 3, 1, 2)
    video = evaluate.video_metrics(swap3, true3)
    assert video["ari_fg_later"].item() == 1.0 and video["ari_fg_frame"].item() == 1.0
    assert evaluate.ari(swap3, true3, foreground_only=True).item() == pytest.approx(-1 / 9)
    assert adjusted_rand_score(true3.flatten(), swap3.flatten()) == pytest.approx(-1 / 9)


# ----------------------------------------------------------------------------- real runs


@pytest.mark.parametrize("decoder", ["transformer", "diffusion"])
def test_both_decoders_train_on_clips_and_evaluate_scores_whole_clips(decoder, tiny_video_root, tiny_video_vaes,
                                                                      tmp_path, capsys):
    out = train_ocl.train(video_args(tiny_video_root, tiny_video_vaes, tmp_path / decoder, decoder, "--steps", "3"))
    assert ("STEVE" if decoder == "transformer" else "video SlotDiffusion") in capsys.readouterr().out
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["model_args"]["video"] and ckpt["model_args"]["queries"] == "box" and ckpt["model_args"]["box_prior"]
    assert ckpt["args"]["clip"] == 1.0 and ckpt["args"]["iters"] == 1 and ckpt["args"]["predictor_lr"] == 0.1  # preset
    assert any(k.startswith("predictor.") for k in ckpt["model"]) and "queries.mlp.0.weight" in ckpt["model"]
    result = evaluate.main(["--ckpt", str(out / "best.pt"), "--viz", "2", "--json", str(tmp_path / "m.json")])
    metrics = result["metrics"]
    assert set(metrics) == {"ari", "ari_fg", "miou", "mbo", "ari_fg_frame", "ari_fg_later"}
    assert metrics["ari"]["count"] == 6  # one value per clip: the 6 val clips
    strip = Image.open(out / "clip_000.png")
    assert strip.height == 2 * 8 * (64 + 2) and (out / "clip_001.png").exists()  # one row per frame (scale 2)
    assert Image.open(out / "masks.png").height == strip.height  # validation's figure: one whole clip too


def test_gaussian_queries_on_video_and_box_queries_refused_on_images(tiny_video_root, tiny_video_vaes, tmp_path,
                                                                     capsys):
    args = video_args(tiny_video_root, tiny_video_vaes, tmp_path / "g", "transformer", "--queries", "gaussian")
    assert train_ocl.run_folder(args, {"kind": "msf", "scales": 3}).endswith("transformer-gaussian_msf")
    preset = video_args(tiny_video_root, tiny_video_vaes, tmp_path / "b", "transformer")
    assert train_ocl.run_folder(preset, {"kind": "msf", "scales": 3}).endswith("transformer-boxprior_msf")
    out = train_ocl.train(video_args(tiny_video_root, tiny_video_vaes, tmp_path / "g", "transformer", "--queries",
                                     "gaussian", "--steps", "2"))
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert "queries.mu" in ckpt["model"] and ckpt["model_args"]["box_prior"] is False  # the preset's prior: box only
    movi = train_ocl.parse_args(["--dataset", "movi_c"])
    assert movi.queries == "box" and movi.box_prior is False and movi.predictor_lr == 1.0  # MOVi: the authors
    assert train_ocl.parse_args(["--dataset", "movi_c", "--box-prior"]).box_prior is True
    assert train_ocl.parse_args(["--dataset", "shapes_video", "--no-box-prior"]).box_prior is False
    with refused(capsys, "image dataset without boxes"):
        train_ocl.parse_args(["--queries", "box"])
    with refused(capsys, "video predictor's"):
        train_ocl.parse_args(["--predictor-lr", "0.1"])
    for argv in (["--box-prior"], ["--dataset", "shapes_video", "--queries", "gaussian", "--box-prior"]):
        with refused(capsys, "--box-prior restricts"):
            train_ocl.parse_args(argv)


# ----------------------------------------------------------------------------- resume, DDP, failures


def test_a_killed_video_run_resumes_bit_identical(tiny_video_root, tiny_video_vaes, tmp_path):
    """As tests/test_run.py for images, killed at once (SIGKILL: last.pt is the newest checkpoint; SIGTERM's path is
    the images' own): the crop, the predictor's dropout, the guidance cache of (clip, frame)."""
    extra = ["--dataset", "shapes_video", *TINY_OCL, "--batch-size", "2", "--clip-frames", "4", "--vae-ckpt",
             str(tiny_video_vaes[256]), "--steps", "12", "--ckpt-every", "4", "--val-every", "6", "--queries", "gaussian"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(command("train_ocl.py", tiny_video_root, full, *extra), tmp_path)
    code, err = interrupt(command("train_ocl.py", tiny_video_root, cut, *extra), tmp_path, cut, 4, signal.SIGKILL)
    assert 4 <= torch.load(cut / "last.pt", weights_only=True)["step"] < 12
    run(command("train_ocl.py", tiny_video_root, cut, *extra, "--resume"), tmp_path)
    assert_same_weights(full, cut, exact=True)
    assert losses(full) == losses(cut) and len(losses(full)) == 12


def test_two_gloo_processes_take_the_single_process_video_steps(tiny_video_root, tiny_video_vaes, tmp_path):
    """Noise off (each process draws its own: the queries' sigma, the predictor's dropout), as for images."""
    import sys
    extra = ["--dataset", "shapes_video", *TINY_OCL, "--batch-size", "4", "--clip-frames", "4", "--vae-ckpt",
             str(tiny_video_vaes[256]), "--steps", "3", "--predictor-dropout", "0", "--sigma", "0", "--lr", "2e-4"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(command("train_ocl.py", tiny_video_root, one, *extra), tmp_path)
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                *command("train_ocl.py", tiny_video_root, two, *extra)[1:]], tmp_path)
    assert "2 processes x batch 2 = effective batch 4" in done.stdout
    assert_same_weights(one, two, exact=False, max_step=2 * 3 * 2e-4)


def test_a_non_finite_video_loss_keeps_the_last_good_checkpoint(tiny_video_root, tiny_video_vaes, tmp_path,
                                                                monkeypatch):
    poison_third_training_loss(monkeypatch)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="at step 3"):
        train_ocl.train(video_args(tiny_video_root, tiny_video_vaes, out, "transformer", "--steps", "5",
                                   "--ckpt-every", "1"))
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
