"""Training that scales out and survives: exact resume after SIGKILL/SIGTERM (real subprocesses), torchrun DDP
equal to one process over the same combined batches (2 gloo processes on the CPU), the data order and worker
seeds, and the loud failures (unwritable or full --out, another run's checkpoint, non-finite loss).

Run: python -m pytest -q tests/test_run.py
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import decoders
import evaluate
import ocl
import train_common
import train_ocl
import train_vae
from conftest import refused

ROOT = Path(__file__).resolve().parents[1]
VAE_TINY = ["--channels", "16", "--batch-size", "8", "--val-batches", "1", "--log-every", "1"]
OCL_TINY = ["--slot-dim", "32", "--enc-channels", "16", "--dec-dim", "32", "--dec-layers", "1", "--batch-size", "4",
            "--val-batches", "1", "--log-every", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}  # same threads in every run: same sums


@pytest.fixture(scope="module")
def vae256(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "c256"
    return train_vae.train(train_vae.parse_args(["--data-root", str(tiny_root), "--out", str(out), "--code-dim", "256",
                                                 *VAE_TINY, "--steps", "2"])) / "best.pt"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted runs the resume tests compare with, each trained once per module: reference(cmd) runs
    `cmd` (its --out left to this fixture) the first time it is asked for and returns its folder."""
    done = {}

    def get(script, tiny_root, *extra, nproc=1):
        key = (script, nproc, *extra)
        if key not in done:
            out = tmp_path_factory.mktemp("reference") / "full"
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
            printed = run([*(torchrun if nproc > 1 else [sys.executable]), *command(script, tiny_root, out, *extra)[1:]],
                          out.parent).stdout
            (out.parent / "stdout.txt").write_text(printed)  # what the run printed, beside its folder
            done[key] = out
        return done[key]
    return get


def command(script, tiny_root, out, *extra):
    return [sys.executable, str(ROOT / script), "--data-root", str(tiny_root), "--out", str(out), *extra]


def run(cmd, cwd):
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-8000:]  # a process's own error sits above torchrun's report
    return done


def interrupt(cmd, cwd, out, when, sig):
    """Start cmd, wait for the numbered checkpoint of step `when`, send `sig`; returns (returncode, stderr)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / f"step_{when:07d}.pt").exists():
        assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


def assert_same_weights(a, b, exact=True, max_step=None):
    """Exact: every tensor bit-identical. Otherwise: all but 0.1% of the weights equal to 1e-4 (relative), and the
    rest within `max_step`. Why the 0.1%: a bias right before a normalisation has a zero gradient up to rounding,
    and Adam divides by the gradient's own size, turning different rounding into lr-sized steps. Without gradient
    synchronisation most weights would differ, so the test still fails on a broken DDP."""
    wa = torch.load(a / "last.pt", weights_only=True)["model"]
    wb = torch.load(b / "last.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    off, total = 0, 0
    for k in wa:
        if exact:
            assert torch.equal(wa[k], wb[k]), k
        elif wa[k].is_floating_point() and not k.endswith(".hits"):  # hits: per-process counters of code use
            close = torch.isclose(wa[k], wb[k], rtol=1e-4, atol=1e-6)
            off, total = off + int((~close).sum()), total + close.numel()
            assert (wa[k] - wb[k]).abs().max() <= max_step, k
    assert off <= 0.001 * total, f"{off} of {total} weights differ"


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("script,sig", [("train_vae.py", signal.SIGKILL), ("train_ocl.py", signal.SIGKILL)])
def test_killed_and_resumed_run_ends_bit_identical(script, sig, tiny_root, vae256, tmp_path, reference):
    """N steps uninterrupted vs. killed after a checkpoint (at a random point of a later step), then --resume to N.
    The VAE run uses every stateful part: Gumbel noise, code replacing every 3 steps (the pools of recent vectors),
    data-dependent codebook init; the OCL run the query noise (sigma > 0) and the guidance cache. (SIGTERM, which
    lets the step end and writes last.pt there: test_two_processes_resumed_by_one_then_by_two_again and the
    2-process SIGTERM to torchrun.)"""
    if script == "train_vae.py":
        extra = [*VAE_TINY, "--code-dim", "4", "--steps", "24", "--ckpt-every", "4", "--replace-every", "3",
                 "--val-every", "12"]
    else:
        extra = [*OCL_TINY, "--vae-ckpt", str(vae256), "--steps", "24", "--ckpt-every", "4", "--val-every", "12"]
    full, cut = reference(script, tiny_root, *extra), tmp_path / "cut"
    code, err = interrupt(command(script, tiny_root, cut, *extra), tmp_path, cut, 8, sig)
    stopped_at = torch.load(cut / "last.pt", weights_only=True)["step"]
    assert 8 <= stopped_at < 24
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:  # SIGTERM: the step finishes, last.pt is written at that step, and the message says how to go on
        assert code == 1 and f"stopped by SIGTERM after step {stopped_at}" in err and "--resume" in err
        assert losses(cut)[-1][0] == stopped_at
    run(command(script, tiny_root, cut, *extra, "--resume"), tmp_path)
    assert_same_weights(full, cut, exact=True)
    assert losses(full) == losses(cut) and len(losses(full)) == 24  # exact floats, one line per step
    kept = sorted(p.name for p in cut.glob("step_*.pt"))  # the newest --keep 3 numbered copies
    assert kept == sorted(p.name for p in full.glob("step_*.pt")) and len(kept) == 3 and kept[-1] == "step_0000024.pt"


# ----------------------------------------------------------------------------- distributed


@pytest.mark.parametrize("script", ["train_vae.py", "train_ocl.py"])
def test_two_gloo_processes_take_the_single_process_steps(script, tiny_root, vae256, tmp_path, reference):
    """torchrun with 2 CPU processes x batch 4 vs 1 process x batch 8 over the same global batches: the same
    parameters after 4 steps (to float tolerance: the gradient sums are ordered differently). Noise is switched
    off (--stabilisers off, --sigma 0) since each process draws its own; the codebooks' data init stays on (it
    starts on the gathered batch of both processes, put in single-process order, MSF's stacked scales included)."""
    if script == "train_vae.py":
        extra = ["--channels", "16", "--batch-size", "8", "--val-batches", "1", "--log-every", "1", "--code-dim", "4",
                 "--stabilisers", "off", "--steps", "4", "--lr", "2e-4"]
    else:  # the 2-process run of test_two_processes_resumed_by_one_then_by_two_again, shared
        extra = ocl_without_noise(vae256)
    steps = int(extra[extra.index("--steps") + 1])
    one, two = reference(script, tiny_root, *extra), reference(script, tiny_root, *extra, nproc=2)
    assert "2 processes x batch 4 = effective batch 8" in (two.parent / "stdout.txt").read_text()
    assert_same_weights(one, two, exact=False, max_step=2 * steps * (2e-4 if script == "train_vae.py" else 2e-3))
    la, lb = losses(one), losses(two)  # one line per step; the loss is the mean over both processes' halves
    assert [s for s, _ in la] == [s for s, _ in lb] == list(range(1, steps + 1))
    assert la[0][1] == pytest.approx(lb[0][1], rel=1e-5)  # step 1: the same weights, the same 8 images


def children(pid):
    """The process ids torchrun started (its direct children), from /proc."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize("script,how", [("train_vae.py", "SIGTERM to torchrun"), ("train_ocl.py", "SIGKILL to rank 1")])
def test_two_gloo_processes_stopped_and_resumed_end_bit_identical(script, how, tiny_root, vae256, tmp_path):
    """torchrun with 2 processes, uninterrupted vs stopped after a checkpoint and continued with --resume: the same
    bits. Everything one process holds apart from the others must be in last.pt: each process's random generators
    (Gumbel and query noise, augmentation), and for the VAE each process's code-use counts and sample of recent
    vectors (code replacing at step 10 sums the counts both processes made since step 0, across the stop)."""
    if script == "train_vae.py":
        extra = [*VAE_TINY, "--code-dim", "4", "--steps", "12", "--ckpt-every", "4", "--replace-every", "10",
                 "--val-every", "12"]
    else:
        extra = [*OCL_TINY, "--vae-ckpt", str(vae256), "--steps", "8", "--ckpt-every", "4", "--val-every", "8"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run([*torchrun, *command(script, tiny_root, full, *extra)[1:]], tmp_path)
    proc = subprocess.Popen([*torchrun, *command(script, tiny_root, cut, *extra)[1:]], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (cut / "step_0000004.pt").exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    if how == "SIGTERM to torchrun":  # as a cluster scheduler stops a job: the step ends, last.pt is written
        proc.send_signal(signal.SIGTERM)
    else:  # one process dies at once; torchrun ends the other; last.pt is the newest checkpoint
        os.kill(children(proc.pid)[1], signal.SIGKILL)
    proc.communicate(timeout=120)
    stopped_at = torch.load(cut / "last.pt", weights_only=True)["step"]
    assert 4 <= stopped_at < int(extra[extra.index("--steps") + 1])
    run([*torchrun, *command(script, tiny_root, cut, *extra, "--resume")[1:]], tmp_path)
    assert_same_weights(full, cut, exact=True)  # code-use counts (hits) included
    assert losses(full) == losses(cut)


def test_code_replacing_state_resumed_with_another_process_count():
    """A 2-process last.pt resumed by 1 or 3 processes (--allow-world-change): process 0, which decides code
    replacing, takes the summed counts and one sample merged from both in proportion to what each stood for (5 and 7
    vectors seen: of 6 places, 2.5 and 3.5, the tie to the first: 3 and 3); the others start empty; the same count
    takes its own."""
    def pool(hits, n, value):
        return {"recent": torch.full((n, 4), value), "seen": n, "hits": torch.tensor(hits)}
    saved = [[pool([1.0, 0.0, 2.0], 5, 1.0)], [pool([0.0, 3.0, 1.0], 7, 2.0)]]  # [process][codebook]
    one = train_vae.my_pools(saved, train_common.Dist(0, 1, 0, torch.device("cpu")), [6])
    assert one[0]["hits"].tolist() == [1.0, 3.0, 3.0] and one[0]["seen"] == 12
    assert sorted(one[0]["recent"][:, 0].tolist()) == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    assert len(train_vae.my_pools(saved, train_common.Dist(0, 1, 0, torch.device("cpu")), [1024])[0]["recent"]) == 12
    third = train_vae.my_pools(saved, train_common.Dist(2, 3, 2, torch.device("cpu")), [6])
    assert third[0]["hits"].tolist() == [0.0, 0.0, 0.0] and len(third[0]["recent"]) == 0 and third[0]["seen"] == 0
    same = train_vae.my_pools(saved, train_common.Dist(1, 2, 1, torch.device("cpu")), [6])
    assert same[0]["hits"].tolist() == [0.0, 3.0, 1.0] and same[0]["seen"] == 7


def ocl_without_noise(vae256):
    """A 12-step OCL run without sampling noise (--sigma 0) at a global batch of 8: 1 and 2 processes take the same
    steps, to float tolerance."""
    return [*OCL_TINY[:OCL_TINY.index("--batch-size")], "--batch-size", "8", *OCL_TINY[OCL_TINY.index("--batch-size") + 2:],
            "--vae-ckpt", str(vae256), "--sigma", "0", "--steps", "12", "--ckpt-every", "4", "--val-every", "12"]


def test_two_processes_resumed_by_one_then_by_two_again(tiny_root, vae256, tmp_path, reference):
    """2 -> 1 -> 2 processes: a 2-process run stopped, continued by one process, stopped, continued by two. Without
    --allow-world-change the change is refused by name; with it, and with no sampling noise (--sigma 0), the chain
    ends where the uninterrupted 2-process run does (to float tolerance: the data order is the step's, whoever
    takes it)."""
    extra = ocl_without_noise(vae256)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    full, cut = reference("train_ocl.py", tiny_root, *extra, nproc=2), tmp_path / "cut"
    interrupt([*torchrun, *command("train_ocl.py", tiny_root, cut, *extra)[1:]], tmp_path, cut, 4, signal.SIGTERM)
    refused = subprocess.run(command("train_ocl.py", tiny_root, cut, *extra, "--resume"), cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "was written by 2 process(es), this run has 1" in refused.stderr
    assert "--allow-world-change" in refused.stderr
    code, err = interrupt(command("train_ocl.py", tiny_root, cut, *extra, "--resume", "--allow-world-change"), tmp_path,
                          cut, 8, signal.SIGTERM)
    stopped_at = torch.load(cut / "last.pt", weights_only=True)["step"]  # SIGTERM: the step ends, last.pt is written
    assert code == 1 and f"stopped by SIGTERM after step {stopped_at}" in err and "--resume" in err
    assert losses(cut)[-1][0] == stopped_at
    run([*torchrun, *command("train_ocl.py", tiny_root, cut, *extra, "--resume", "--allow-world-change")[1:]], tmp_path)
    assert torch.load(cut / "last.pt", weights_only=True)["step"] == 12
    assert_same_weights(full, cut, exact=False, max_step=2 * 12 * 2e-3)
    assert [s for s, _ in losses(full)] == [s for s, _ in losses(cut)] == list(range(1, 13))


def test_compile_compiles_without_graph_breaks_and_checkpoints_load_either_way(tiny_root, vae256, tmp_path,
                                                                                 monkeypatch):
    """--compile on the quick start's paths, with a backend that counts the graphs it is given (torch's eager
    compiler would take minutes here): no graph break, and over 4 steps no graph but the expected ones (a graph
    recompiled for a value that changes each step would add one per step). Stage 1 compiles its
    encoder and decoder (each: one graph at the first pyramid size, one for the others, in training and in eval mode:
    8); stage 2 the whole model (3: the query noise at its first value, at any other, and 0 where the weights are
    checked before a checkpoint). The checkpoints have the plain keys, so a compiled run
    resumes without --compile and evaluate.py reads it."""
    import torch._dynamo
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    monkeypatch.setattr(train_common, "COMPILE_BACKEND", counting)
    for script, extra, expected in ((train_vae, [*VAE_TINY, "--steps", "4"], 8),
                                    (train_ocl, [*OCL_TINY, "--vae-ckpt", str(vae256), "--steps", "4"], 3)):
        torch._dynamo.reset()
        graphs.clear()
        torch._dynamo.utils.counters.clear()
        out = tmp_path / script.__name__
        script.train(script.parse_args(["--data-root", str(tiny_root), "--out", str(out), *extra, "--compile"]))
        assert len(graphs) == expected, script.__name__
        assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
        assert not any(k.startswith("_orig_mod") for k in torch.load(out / "last.pt", weights_only=True)["model"])
        script.train(script.parse_args(["--data-root", str(tiny_root), "--out", str(out), *extra, "--resume"]))  # eager
    assert evaluate.main(["--ckpt", str(tmp_path / "train_ocl" / "best.pt"), "--limit", "4"])["metrics"]["ari"]["count"] == 4


# ----------------------------------------------------------------------------- data order and workers


class Probe(torch.utils.data.Dataset):
    """Returns its index and a number from NumPy's global generator (what an augmentation would draw)."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return {"index": i, "draw": float(np.random.rand())}


def test_global_batches_split_over_ranks_and_resume_mid_epoch():
    ds = Probe()
    single = [b["index"].tolist() for b, _ in zip(train_common.infinite_batches(ds, 8, 3), range(7))]  # 3 batches/epoch
    assert sorted(sum(single[:3], [])) == list(range(24))  # an epoch is a permutation
    ranks = [[b["index"].tolist() for b, _ in zip(train_common.infinite_batches(ds, 8, 3, 0, r, 2), range(7))]
             for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == single  # rank 0 holds the first half of each global batch, rank 1 the rest
    later = [b["index"].tolist() for b, _ in zip(train_common.infinite_batches(ds, 8, 3, start_step=4), range(3))]
    assert later == single[4:7]  # resuming at step 4 = skipping 4 batches, with no saved loader state


def test_augment_crops_resizes_and_flips_and_boxes_follow_their_objects():
    """--augment: a white rectangle drawn at a box stays inside the box augment returns for it (each clip's frames
    take one crop and flip), a box cropped away becomes the zero box, the draws are a function of (seed, step) and
    two processes take the halves of one process's batch."""
    H = W = 64
    torch.manual_seed(0)
    boxes = torch.tensor([[0.1, 0.2, 0.4, 0.5], [0.6, 0.55, 0.9, 0.95], [0.0, 0.0, 0.0, 0.0]])  # (K, 4), one hidden
    clips = torch.zeros(8, 2, 3, H, W)
    for k, (x0, y0, x1, y1) in enumerate(boxes[:2].tolist()):
        clips[:, :, k, round(y0 * H):round(y1 * H), round(x0 * W):round(x1 * W)] = 1.0  # object k in channel k
    bbox = boxes.expand(8, 2, 3, 4).clone()
    out, moved = train_common.augment(clips, bbox, seed=3, step=11)
    assert out.shape == clips.shape and torch.equal(out[:, 0], out[:, 1])  # the frames of a clip alike
    assert not torch.equal(out, clips) and torch.equal(moved[:, :, 2], torch.zeros(8, 2, 4))
    for b in range(8):
        for k in range(2):
            ys, xs = torch.nonzero(out[b, 0, k] > 0.5, as_tuple=True)
            if len(ys) == 0:  # the object left the crop: its box is the zero box
                assert (moved[b, 0, k] == 0).all()
                continue
            x0, y0, x1, y1 = (moved[b, 0, k] * torch.tensor([W, H, W, H])).tolist()
            assert x0 - 1.5 <= xs.min() and xs.max() + 1 <= x1 + 1.5 and y0 - 1.5 <= ys.min() and ys.max() + 1 <= y1 + 1.5
    again, _ = train_common.augment(clips, bbox, seed=3, step=11)
    assert torch.equal(again, out)  # a resumed run draws the same
    halves = [train_common.augment(clips[r * 4:(r + 1) * 4], bbox[r * 4:(r + 1) * 4], 3, 11, rank=r, world=2)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), out)  # two processes: the halves of one process's batch
    for _ in range(200):
        i, j, h, w = train_common.crop_box(64, 64, (0.75, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(_))
        assert 0.73 <= h * w / 64 ** 2 <= 1 and 0.72 <= w / h <= 1.39 and 0 <= i <= 64 - h and 0 <= j <= 64 - w


def test_workers_draw_distinct_numbers_per_worker_and_epoch():
    ds = Probe()
    batches = train_common.infinite_batches(ds, 4, 0, workers=2)
    draws = torch.cat([next(batches)["draw"] for _ in range(12)])  # 2 epochs, 2 workers
    assert len(set(draws.tolist())) == 48  # one seed per worker would repeat, and so would one per worker and not epoch
    plain = [next(train_common.infinite_batches(ds, 4, 0, start_step=s))["index"].tolist() for s in range(12)]
    batches = train_common.infinite_batches(ds, 4, 0, workers=2)
    assert [next(batches)["index"].tolist() for _ in range(12)] == plain  # workers change nothing in the order


# ----------------------------------------------------------------------------- loud failures


def test_unwritable_or_full_out_fails_before_training(tiny_root, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = train_vae.parse_args(["--data-root", str(tiny_root), "--out", str(blocker / "run"), *VAE_TINY, "--steps", "3"])
    with pytest.raises(train_common.RunError, match="is not writable"):
        train_vae.train(args)
    monkeypatch.setattr(train_common.shutil, "disk_usage", lambda p: type("U", (), {"free": 10 * 2 ** 20})())
    args = train_vae.parse_args(["--data-root", str(tiny_root), "--out", str(tmp_path / "full"), *VAE_TINY, "--steps", "3"])
    with pytest.raises(train_common.RunError, match=r"10 MiB free, but this run's checkpoints need about \d+ MiB"):
        train_vae.train(args)
    assert not (tmp_path / "full" / "metrics.jsonl").exists()  # no step was taken


def test_existing_run_needs_resume_or_overwrite(tiny_root, vae256, tmp_path, capsys):
    out = tmp_path / "r"
    base = ["--data-root", str(tiny_root), "--out", str(out), "--vae-ckpt", str(vae256), *OCL_TINY]
    train_ocl.train(train_ocl.parse_args([*base, "--steps", "2"]))
    with pytest.raises(train_common.RunError, match="already holds a run.*--resume.*--overwrite"):
        train_ocl.train(train_ocl.parse_args([*base, "--steps", "2"]))
    with pytest.raises(train_common.RunError, match=r"decoder: 'transformer' in the checkpoint, 'mlp' now; "
                                                 r"steps: 2 in the checkpoint, 3 now"):
        train_ocl.train(train_ocl.parse_args([*base, "--steps", "3", "--decoder", "mlp", "--resume"]))
    with pytest.raises(ValueError, match="OCL checkpoint, but a VAE checkpoint"):  # a VAE run pointed at an OCL run
        train_vae.train(train_vae.parse_args(["--data-root", str(tiny_root), "--out", str(out), *VAE_TINY, "--resume"]))
    with refused(capsys, "--resume continues the run in --out and --overwrite deletes it"):
        train_ocl.parse_args([*base, "--resume", "--overwrite"])
    good = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(good[: len(good) // 2])  # truncated, as by a full disk in another program
    with pytest.raises(ValueError, match="truncated or corrupt"):
        train_ocl.train(train_ocl.parse_args([*base, "--steps", "2", "--resume"]))
    train_ocl.train(train_ocl.parse_args([*base, "--steps", "2", "--overwrite"]))  # starts over
    assert len(losses(out)) == 2 and torch.load(out / "last.pt", weights_only=True)["step"] == 2


def poison_third_training_loss(monkeypatch):
    """OCL.forward returns an infinite loss at the third training step (also used by tests/test_video.py)."""
    forward, calls = ocl.OCL.forward, [0]

    def poisoned(self, *a, **k):
        out = forward(self, *a, **k)
        calls[0] += self.training
        if calls[0] == 3 and self.training:
            out["loss"] = out["loss"] * float("inf")
        return out
    monkeypatch.setattr(ocl.OCL, "forward", poisoned)


def test_ocl_non_finite_loss_keeps_the_last_good_checkpoint(tiny_root, vae256, tmp_path, monkeypatch):
    poison_third_training_loss(monkeypatch)
    out = tmp_path / "nan"
    args = train_ocl.parse_args(["--data-root", str(tiny_root), "--out", str(out), "--vae-ckpt", str(vae256), *OCL_TINY,
                                 "--steps", "5", "--ckpt-every", "1"])
    with pytest.raises(FloatingPointError, match="at step 3"):
        train_ocl.train(args)
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
    assert sorted(p.name for p in out.glob("step_*.pt")) == ["step_0000001.pt", "step_0000002.pt"]


def test_an_update_that_breaks_the_model_is_named_and_never_saved(tiny_root, tmp_path):
    """--lr 1e30: step 1's loss is finite, its update makes the weights ~1e30 (finite) and the next loss inf. The
    check before every checkpoint (train_common.check_weights) names step 1 and writes nothing."""
    out = tmp_path / "huge"
    args = train_vae.parse_args(["--data-root", str(tiny_root), "--out", str(out), *VAE_TINY, "--steps", "3",
                                 "--ckpt-every", "1", "--lr", "1e30", "--stabilisers", "off"])
    with pytest.raises(FloatingPointError, match="the update of step 1 left the model non-finite"):
        train_vae.train(args)
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists() and not list(out.glob("step_*.pt"))


def test_under_amp_only_a_run_of_non_finite_losses_stops():
    """With AMP the grad scaler skips an overflowing step; RunGuard stops only after `patience` in a row (without
    AMP, at the first), and a finite loss in between starts the count again."""
    d = train_common.Dist(0, 1, 0, torch.device("cpu"))
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    with train_common.RunGuard(d, amp=True, patience=3) as guard:
        for step, loss in enumerate([nan, nan, one, nan, nan]):
            assert guard.check(loss, step) is False
        with pytest.raises(FloatingPointError, match=r"at step 6 \(3 in a row under AMP\)"):
            guard.check(nan, 5)
    with train_common.RunGuard(d, amp=False) as guard, pytest.raises(FloatingPointError, match="at step 1;"):
        guard.check(nan, 0)


def test_a_cpu_run_resumes_with_amp_on(tiny_root, vae256, tmp_path):
    """A run started without AMP (CPU: an empty grad-scaler state in last.pt) continues where AMP is on (a GPU):
    the scaler starts afresh instead of failing on the empty state. An enabled CPU scaler stands in for CUDA's."""
    out = tmp_path / "r"
    args = train_ocl.parse_args(["--data-root", str(tiny_root), "--out", str(out), "--vae-ckpt", str(vae256), *OCL_TINY,
                                 "--steps", "2"])
    train_ocl.train(args)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["train_state"]["scaler"] == {}
    model = ocl.load_ocl(ckpt)[0].train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(RuntimeError):  # what the plain load does
        scaler.load_state_dict({})
    d = train_common.Dist(0, 1, 0, torch.device("cpu"))
    vae_args = ckpt["vae"]["model_args"]
    start, *_ = checkpoints.resume(out, "ocl", args, ckpt["model_args"], model, optimizer, scaler, d,
                                    extra={"vae": vae_args})
    assert start == 2 and scaler.is_enabled()


def _global_std_worker(rank, world, init, part, result):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    result[rank] = decoders.global_std(part[rank]).item()
    torch.distributed.destroy_process_group()


def test_diffusion_scale_is_one_value_for_all_processes(tmp_path):
    """Each process used to measure the diffusion decoder's latent scale on its own half batch; now every process
    gets the std of the combined batch, the value a single process gets from the whole batch."""
    x = torch.randn(8, 4, 16, 16) * 3 + 1
    x[:4] *= 2  # the two halves differ, so per-process values would too
    with torch.multiprocessing.Manager() as manager:
        result = manager.dict()
        torch.multiprocessing.spawn(_global_std_worker, args=(2, f"file://{tmp_path / 'rendezvous'}",
                                                              [x[:4], x[4:]], result), nprocs=2)
        values = [result[0], result[1]]
    assert values[0] == values[1] == pytest.approx(x.std().item(), rel=1e-5)
    assert decoders.global_std(x).item() == pytest.approx(x.std().item(), rel=1e-6)
    assert abs(x[:4].std().item() - x.std().item()) > 0.1
