"""train_vae.py: a short real run (checkpoint safe to load, loss went down, same seed = same weights),
the schedules against their closed forms, and every bad input named by the stage-1 issue.

Run: python -m pytest -q tests/test_train_vae.py
"""
import json
import math

import numpy as np
import pytest
import torch

import checkpoints
import data
import msf
import train_common
import train_ocl
import train_vae
from conftest import refused

TINY = ["--channels", "16", "--batch-size", "8", "--val-batches", "1", "--log-every", "1"]


def run(tmp_path, tiny_root, *extra):
    args = train_vae.parse_args(["--data-root", str(tiny_root), "--out", str(tmp_path / "run"), *TINY, *extra])
    return train_vae.train(args), args


def test_twenty_steps_write_a_safe_checkpoint_and_learn(tmp_path, tiny_root):
    out, args = run(tmp_path, tiny_root, "--steps", "20", "--code-dim", "8")
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(out / name, map_location="cpu", weights_only=True)  # no code runs while loading
        assert ckpt["kind"] == "vae" and ckpt["model_args"]["kind"] == "msf" and ckpt["model_args"]["code_dim"] == 8
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 20
    model = msf.load_vae(checkpoints.load_checkpoint(out / "best.pt", "vae"))
    assert not model.training and model.num_scales == 3
    logs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    recon = [r["recon1"] for r in logs if "recon1" in r]
    assert sum(recon[-5:]) / 5 < 0.7 * sum(recon[:2]) / 2, recon  # the loss went down
    assert any("val_perplexity1_0" in r for r in logs)
    assert (out / "recon.png").exists()
    # evaluate.py scores a VAE with the code training validated with: on the same images (the `select` split,
    # 4 of the 48 training images, held out of training; --val-batches 1 of batch 8), the same reconstruction
    # errors and codebook usage to the last bit
    import evaluate
    best = torch.load(out / "best.pt", weights_only=True)["metrics"]
    result = evaluate.main(["--ckpt", str(out / "best.pt"), "--split", "select", "--batch-size", "8"])
    assert result["samples"] == 4 and result["reconstruction_mse"]["recon1"] == best["val_recon1"]
    scored = {**result["reconstruction_mse"], **result["codebook_usage"], **result["projection"], **result["scale_wins"]}
    assert {f"val_{k}": v for k, v in scored.items()} == best


def test_same_seed_same_weights(tmp_path, tiny_root):
    a, _ = run(tmp_path / "a", tiny_root, "--steps", "3", "--code-dim", "4", "--vae", "gdr")
    b, _ = run(tmp_path / "b", tiny_root, "--steps", "3", "--code-dim", "4", "--vae", "gdr")
    sa, sb = (torch.load(p / "last.pt", weights_only=True)["model"] for p in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_vae_kind_trains(tmp_path, tiny_root):
    for kind in ("vqvae", "multiscale"):
        out, _ = run(tmp_path / kind, tiny_root, "--steps", "2", "--code-dim", "4", "--vae", kind)
        ckpt = checkpoints.load_checkpoint(out / "last.pt", "vae")
        model = msf.load_vae(ckpt)
        assert ckpt["model_args"]["kind"] == kind


@pytest.mark.parametrize("lr_at", [train_vae.lr_at, train_ocl.lr_at])
def test_lr_schedule_closed_form(lr_at):
    """A.5 for both stages: linear warmup over the first 1/20 of the steps, then half a cosine to lr / 1000."""
    total, lr = 200, 1.0
    assert lr_at(0, total, lr) == pytest.approx(1 / 10)  # warmup over total/20 = 10 steps
    assert lr_at(9, total, lr) == pytest.approx(1.0)
    mid = 10 + (total - 10) // 2  # halfway down the cosine from lr to lr / 1000 (the authors' end point)
    assert lr_at(mid, total, lr) == pytest.approx((1 + 1e-3) / 2, abs=0.01)
    assert lr_at(total, total, lr) == pytest.approx(1e-3, abs=1e-12)


def test_annealing_schedules_closed_form():
    """GDR's residual / Gumbel annealing: 1 -> 0 over the first half, then 0; the query noise: start -> 0 over all."""
    assert train_vae.anneal_at(0, 200) == 1 and train_vae.anneal_at(50, 200) == pytest.approx(0.5)
    assert train_vae.anneal_at(100, 200) == 0 and train_vae.anneal_at(150, 200) == 0
    assert train_vae.anneal_at(25, 200) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert train_ocl.sigma_at(0, 100, 1.0) == 1 and train_ocl.sigma_at(50, 100, 2.0) == pytest.approx(1.0)
    assert train_ocl.sigma_at(100, 100, 1.0) == 0 and train_ocl.sigma_at(150, 100, 1.0) == 0


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "imagenet"], "known datasets: shapes"),
    (["--scales", "0"], "argument --scales: must be >= 1, got 0"),
    (["--resolution", "72"], "not divisible by 4 \\* 2\\^\\(N-1\\) = 16"),
    # ablation flags that would change nothing stop with a message (Tab. 5-6 apply to --vae msf only)
    (["--vae", "vqvae", "--no-inter"], "--no-inter: the ablations of Tab. 5-6 change the MSF VAE; --vae vqvae"),
    (["--vae", "gdr", "--fusion", "sum"], "--fusion sum: the ablations .* --vae gdr"),
    (["--vae", "multiscale", "--sv-shared"], "--vae multiscale has no fusion to change"),
    (["--fusion", "concat", "--no-intra"], "--fusion concat replaces inter/intra-scale fusion .* --no-intra has nothing"),
    (["--sv-shared", "--no-intra"], "--sv-shared shares the scale-variant codebooks, which --no-intra removes"),
    (["--vae", "gdr", "--scales", "2"], "--vae gdr is single-scale"),
    (["--num-codes", "1000"], "must be a square"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with refused(capsys, message):
        train_vae.parse_args(argv)


def test_unconverted_real_dataset_prints_the_command(tmp_path):
    with pytest.raises(SystemExit, match="python convert.py coco --src"):
        train_vae.main(["--dataset", "coco", "--data-root", str(tmp_path), "--out", str(tmp_path / "r")])


def test_non_finite_loss_stops_and_names_the_step(tmp_path, tiny_root, monkeypatch):
    real_build = msf.build_vae

    def build_poisoned(**kw):
        model = real_build(**kw)
        forward, calls = model.forward, [0]

        def poisoned(*a, **k):
            out = forward(*a, **k)
            calls[0] += model.training  # count training steps only (validation also calls forward)
            if calls[0] == 3 and model.training:
                out["loss"] = out["loss"] * float("nan")
            return out
        model.forward = poisoned
        return model
    monkeypatch.setattr(msf, "build_vae", build_poisoned)
    with pytest.raises(FloatingPointError, match="step 3"):
        run(tmp_path, tiny_root, "--steps", "5", "--code-dim", "4")
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)  # validation ran every step (5 // 4 = 1)
    assert last["step"] == 2  # the last good checkpoint is kept, nothing from the broken step overwrote it
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_load_checkpoint_refuses_wrong_kind_and_corruption(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"kind": "ocl", "format_version": checkpoints.CKPT_VERSION}, path)
    with pytest.raises(ValueError, match="OCL checkpoint, but a VAE checkpoint"):
        checkpoints.load_checkpoint(path, "vae")
    path.write_bytes(b"garbage, not a checkpoint")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        checkpoints.load_checkpoint(path, "vae")
    torch.save({"kind": "vae", "format_version": 99}, path)
    with pytest.raises(ValueError, match="has checkpoint format 99; this code reads format 5 only"):
        checkpoints.load_checkpoint(path, "vae")
    torch.save({"kind": "vae"}, path)  # the first format stored no version
    with pytest.raises(ValueError, match="has checkpoint format 1; this code reads format 5 only"):
        checkpoints.load_checkpoint(path, "vae")


# ----------------------------------------------------------------------------- video datasets (MOVi) in stage 1

def test_video_frames_slices_consecutive_frames_per_clip():
    video = torch.arange(2 * 8, dtype=torch.float32).view(2, 8, 1, 1, 1).expand(2, 8, 3, 4, 4)  # pixel = clip*8 + frame
    image = torch.randn(5, 3, 4, 4)
    assert data.video_frames(image, 3) is image  # images pass through
    assert torch.equal(data.video_frames(video)[:, 0, 0, 0], torch.arange(16.0))  # clip = 0: every frame, in order
    frames = data.video_frames(video, 3, torch.Generator().manual_seed(0))
    assert frames.shape == (6, 3, 4, 4)
    v = frames[:, 0, 0, 0].view(2, 3)  # (clip, frame) values
    for c in range(2):
        start = v[c, 0] - 8 * c
        assert 0 <= start <= 5 and torch.equal(v[c], 8 * c + start + torch.arange(3.0))  # 3 consecutive frames of clip c
    starts = {tuple(data.video_frames(video, 3, torch.Generator().manual_seed(s))[::3, 0, 0, 0].tolist())
              for s in range(20)}
    assert len(starts) > 5  # the start frame is random ...
    assert torch.equal(frames, data.video_frames(video, 3, torch.Generator().manual_seed(0)))  # ... and seeded


def write_tiny_movi(root, t=5, res=32):
    """movi_c/{train,val} with 4 and 2 clips of t frames (what `python convert.py movi_c` writes, in small)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        samples = [{"image": rng.integers(0, 256, (t, res, res, 3), dtype=np.uint8),
                    "segment": rng.integers(0, 3, (t, res, res), dtype=np.uint8),
                    "bbox": np.zeros((t, 2, 4), np.float32)} for _ in range(n)]
        data.write_lmdb(root / "movi_c" / split, samples, dict(name="movi_c", split=split, resolution=res, max_objects=2))


def test_movi_trains_the_vae_on_frames_and_ocl_takes_the_video_preset(tmp_path, capsys):
    import evaluate
    import train_ocl
    write_tiny_movi(tmp_path / "data")
    out = train_vae.train(train_vae.parse_args(
        ["--dataset", "movi_c", "--data-root", str(tmp_path / "data"), "--resolution", "32", "--out", str(tmp_path / "v"),
         "--channels", "16", "--steps", "3", "--batch-size", "2", "--clip-frames", "2", "--workers", "0"]))
    assert "3 steps x batch 2 clips x 2 frames" in capsys.readouterr().out
    result = evaluate.main(["--ckpt", str(out / "best.pt"), "--batch-size", "1"])
    assert result["samples"] == 2 * 5  # the VAE is scored on every frame of the 2 validation clips
    args = train_ocl.parse_args(["--dataset", "movi_c", "--data-root", str(tmp_path / "data")])  # video OCL: STEVE
    assert args.queries == "box" and args.clip_frames == 6 and args.batch_size == 8 and args.val_batch_size == 4


@pytest.mark.parametrize("argv, out", [
    ([], "runs/vae_shapes_msf_c256"), (["--code-dim", "4"], "runs/vae_shapes_msf_c4"),
    (["--vae", "vqvae"], "runs/vae_shapes_vqvae_c256"), (["--no-inter"], "runs/vae_shapes_msf-nointer_c256"),
    (["--fusion", "sum"], "runs/vae_shapes_msf-sum_c256"), (["--no-intra", "--scales", "2"],
                                                            "runs/vae_shapes_msf-nointra-N2_c256"),
])
def test_default_run_folders_name_the_configuration(argv, out):
    """Ablations and baselines never share (and so never refuse or overwrite) a run folder."""
    assert train_vae.parse_args(argv).out == out


def test_replaced_codes_forget_their_adam_moments():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(5, 3))
    optimizer = torch.optim.Adam([weight], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        (weight ** 2).sum().backward()
        optimizer.step()
    state = {k: v.clone() for k, v in optimizer.state[weight].items() if k != "step"}
    train_vae.forget_adam_rows(optimizer, weight, torch.tensor([1, 3]))
    for k, before in state.items():
        after = optimizer.state[weight][k]
        assert (after[[1, 3]] == 0).all() and torch.equal(after[[0, 2, 4]], before[[0, 2, 4]]) and before[1].abs().sum() > 0


def test_validation_does_not_change_training(tmp_path, tiny_root):
    """VAE validation (eval mode, its own data-loader generator) draws nothing from the training's random streams:
    with Gumbel noise and code replacing on, validating every step gives the same losses as validating once."""
    a, _ = run(tmp_path / "a", tiny_root, "--steps", "6", "--code-dim", "4", "--val-every", "1", "--replace-every", "2")
    b, _ = run(tmp_path / "b", tiny_root, "--steps", "6", "--code-dim", "4", "--val-every", "6", "--replace-every", "2")
    la, lb = ([r["loss"] for r in map(json.loads, open(o / "metrics.jsonl")) if "loss" in r] for o in (a, b))
    assert len(la) == 6 and la == lb


def test_presets_validate_as_a5_says():
    """A.5: the VAE validates every 600 steps, the OCL model every 1,000; a shortened run validates 4 / 10 times."""
    import train_ocl
    assert train_vae.parse_args(["--dataset", "coco"]).val_every == 600
    assert train_ocl.parse_args(["--dataset", "coco"]).val_every == 1000
    assert train_vae.parse_args(["--dataset", "coco", "--steps", "100"]).val_every == 25
    assert train_vae.parse_args([]).val_every == 100 and train_ocl.parse_args([]).val_every == 320
    # shapes' SlotDiffusion: its own steps (4,800) and period; its keys leave the other decoders' recipe alone
    a = train_ocl.parse_args(["--decoder", "diffusion"])
    assert (a.steps, a.val_every) == (4800, 480) and train_ocl.parse_args([]).steps == 3200
    assert train_ocl.parse_args(["--decoder", "diffusion", "--steps", "1000"]).val_every == 100
    assert train_ocl.parse_args(["--decoder", "diffusion", "--dataset", "coco"]).steps == 50000
