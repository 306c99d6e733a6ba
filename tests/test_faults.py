"""What can go wrong, and what the code says: the bad inputs and faults of docs/messages.md are provoked here (and
in the other test files); each ends in a one-line message that says what to do (never a traceback), and the data or checkpoints
the user did not name are bit-identical afterwards.

Run: python -m pytest -q tests/test_faults.py
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import checkpoints
import convert
import data
import evaluate
import train_common
import train_ocl
import train_vae

ROOT = Path(__file__).resolve().parents[1]
VAE_TINY = ["--channels", "16", "--batch-size", "4", "--val-batches", "1", "--log-every", "1", "--steps", "1"]


def fingerprint(folder):
    """{relative path: sha256} of every file under folder: 'nothing changed' made checkable."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def dead_pid():
    """The id of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.fixture(scope="module")
def custom_shapes(tmp_path_factory):
    """A user's own shapes dataset (another seed and size than the default): what must never be rewritten."""
    root = tmp_path_factory.mktemp("custom")
    data.main(["shapes", "--root", str(root), "--seed", "7", "--train", "20", "--val", "4"])
    return root


@pytest.fixture(scope="module")
def vae_run(custom_shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "run"
    train_vae.train(train_vae.parse_args(["--data-root", str(custom_shapes), "--out", str(out), *VAE_TINY]))
    return out


# ----------------------------------------------------------------------------- what used to destroy work


def test_a_mistyped_split_names_the_splits_and_rewrites_nothing(custom_shapes, vae_run):
    before = fingerprint(custom_shapes)
    with pytest.raises(SystemExit, match=r"has no split 'bogus' \(its splits: train, val, select\)"):
        evaluate.main(["--ckpt", str(vae_run / "best.pt"), "--split", "bogus"])
    assert fingerprint(custom_shapes) == before  # the user's seed-7 dataset is untouched


def test_a_missing_split_of_the_builtin_dataset_is_named_not_regenerated(tmp_path):
    data.write_shapes(tmp_path, 64, seed=3, counts={"train": 10, "val": 2}, quiet=True)
    (tmp_path / "shapes" / "val" / "data.mdb").rename(tmp_path / "val.mdb")  # val lost, train still there
    before = fingerprint(tmp_path / "shapes")
    with pytest.raises(data.DatasetMissing, match=r"no split 'val' \(its splits: train, select\).*data.py shapes"):
        data.load_dataset("shapes", "val", tmp_path)
    assert fingerprint(tmp_path / "shapes") == before


def test_an_out_with_any_earlier_run_file_is_not_overwritten(custom_shapes, tmp_path):
    for leftover in ("best.pt", "metrics.jsonl", "step_0000005.pt"):
        out = tmp_path / leftover
        out.mkdir()
        (out / leftover).write_bytes(b"the user's earlier work")
        args = train_vae.parse_args(["--data-root", str(custom_shapes), "--out", str(out), *VAE_TINY])
        with pytest.raises(train_common.RunError, match=rf"already holds a run \({leftover}\).*--overwrite"):
            train_vae.train(args)
        assert (out / leftover).read_bytes() == b"the user's earlier work" and len(list(out.iterdir())) == 1


def test_records_that_contradict_their_meta_record_stop_before_training(tmp_path):
    """32x32 records in a split whose meta record says 64x64 used to train to the end with exit code 0."""
    rng = np.random.default_rng(0)
    samples = [{"image": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), "segment": np.zeros((32, 32), np.uint8)}
               for _ in range(12)]
    for split in ("train", "val"):
        data.write_lmdb(tmp_path / "coco" / split, iter(samples), dict(name="coco", split=split, resolution=64,
                                                                      max_objects=3))
    with pytest.raises(SystemExit, match=r"coco/train, record 00000000: image uint8 \(32, 32, 3\), but the meta "
                                         r"record says 64x64x3 uint8; rebuild the split: python convert.py coco"):
        train_vae.main(["--dataset", "coco", "--data-root", str(tmp_path), "--resolution", "64", "--out",
                        str(tmp_path / "run"), *VAE_TINY])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was taken
    bad = {"image": np.zeros((64, 64, 3), np.uint8), "segment": np.full((64, 64), 9, np.uint8)}  # label 9 > 3
    data.write_lmdb(tmp_path / "toy" / "train", iter([samples[0] | {"image": bad["image"],
                                                                   "segment": np.zeros((64, 64), np.uint8)}, bad]),
                    dict(name="toy", split="train", resolution=64, max_objects=3))
    ds = data.LMDBDataset(tmp_path / "toy" / "train")
    with pytest.raises(data.DatasetCorrupt, match=r"record 00000001: segment label 9, but the meta record says at "
                                                  r"most 3 objects"):
        ds[1]


# ----------------------------------------------------------------------------- every flag of every script


BAD_FLAGS = [
    (train_vae.parse_args, ["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (train_vae.parse_args, ["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (train_vae.parse_args, ["--lr", "0"], "argument --lr: must be > 0, got 0"),
    (train_vae.parse_args, ["--lr", "nan"], "argument --lr: must be > 0, got nan"),
    (train_vae.parse_args, ["--clip", "-1"], "argument --clip: must be > 0"),
    (train_vae.parse_args, ["--val-every", "0"], "argument --val-every: must be >= 1"),
    (train_vae.parse_args, ["--ckpt-every", "0"], "argument --ckpt-every: must be >= 1"),
    (train_vae.parse_args, ["--keep", "-1"], "argument --keep: must be >= 0"),
    (train_vae.parse_args, ["--workers", "-1"], "argument --workers: must be >= 0"),
    (train_vae.parse_args, ["--code-dim", "0"], "argument --code-dim: must be >= 1"),
    (train_vae.parse_args, ["--channels", "24"], "--channels 24: the VAE's group norms need a multiple of 16"),
    (train_vae.parse_args, ["--resolution", "72"], "not divisible by 4 \\* 2\\^\\(N-1\\) = 16"),
    (train_vae.parse_args, ["--steps", "ten"], "argument --steps: 'ten' is not an integer"),
    (train_ocl.parse_args, ["--slots", "0"], "argument --slots: must be >= 1, got 0"),
    (train_ocl.parse_args, ["--slots", "-3"], "argument --slots: must be >= 1, got -3"),
    (train_ocl.parse_args, ["--iters", "0"], "argument --iters: must be >= 1"),
    (train_ocl.parse_args, ["--dec-heads", "3"], "--dec-heads 3 does not divide --dec-dim 64"),
    (train_ocl.parse_args, ["--sigma", "nan"], "argument --sigma: must be >= 0, got nan"),
    (train_ocl.parse_args, ["--lr", "-1"], "argument --lr: must be > 0"),
    (train_ocl.parse_args, ["--enc-stride", "3"], "argument --enc-stride: invalid choice: 3"),
    (train_ocl.parse_args, ["--decoder", "diffusion", "--unet-base", "56"], "--unet-base 56: the UNet's group norms"),
    (train_ocl.parse_args, ["--steps", "0"], "argument --steps: must be >= 1"),
    (evaluate.main, ["--limit", "-1"], "argument --limit: must be >= 0"),
    (evaluate.main, ["--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (evaluate.main, ["--viz", "-2"], "argument --viz: must be >= 0"),
    (data.main, ["shapes", "--train", "-5"], "argument --train: must be >= 2, got -5"),
    (data.main, ["shapes", "--resolution", "0"], "argument --resolution: must be >= 32"),
    (data.main, ["shapes", "--resolution", "72"], "--resolution 72: the built-in datasets need a multiple of 16"),
    (convert.main, ["coco", "--src", "x", "--resolution", "0"], "argument --resolution: must be >= 8, got 0"),
    (convert.main, ["coco", "--src", "x", "--resolution", "-5"], "argument --resolution: must be >= 8, got -5"),
    (convert.main, ["voc", "--src", "x", "--limit", "-1"], "argument --limit: must be >= 0"),
]


@pytest.mark.parametrize("parse, argv, message", BAD_FLAGS, ids=[" ".join(a) for _, a, _ in BAD_FLAGS])
def test_every_bad_flag_is_one_line_before_any_work(parse, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, and nothing of the user's is there to touch
    with pytest.raises(SystemExit, match=r"^(2|.*)$") as stop:  # 2: argparse's, the message on stderr; else sys.exit's
        parse(argv)
    err = capsys.readouterr().err + (stop.value.code if isinstance(stop.value.code, str) else "")
    assert __import__("re").search(message, err), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- checkpoints


def test_empty_and_folder_checkpoints_are_named(custom_shapes, vae_run, tmp_path):
    empty = tmp_path / "empty.pt"
    empty.touch()
    with pytest.raises(SystemExit, match=r"empty.pt is empty \(0 bytes\)"):
        evaluate.main(["--ckpt", str(empty)])
    with pytest.raises(SystemExit, match=r"is empty \(0 bytes\)"):
        train_ocl.main(["--data-root", str(custom_shapes), "--vae-ckpt", str(empty), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"is a folder, not a checkpoint; give a file inside it \(best.pt, last.pt"):
        evaluate.main(["--ckpt", str(vae_run)])
    run = tmp_path / "resume"
    run.mkdir()
    (run / "last.pt").touch()
    with pytest.raises(SystemExit, match=r"last.pt is empty \(0 bytes\)"):
        train_vae.main(["--data-root", str(custom_shapes), "--out", str(run), *VAE_TINY, "--resume"])


def test_last_pt_size_is_what_the_space_check_expects(vae_run):
    """The free-space check counts last.pt as the model's state + Adam's moments + the code-replacing pools + 1 MiB;
    it must not underestimate what the run writes (it missed the pools by ~25% before)."""
    ckpt = checkpoints.load_checkpoint(vae_run / "last.pt", "vae")
    model = __import__("msf").load_vae(ckpt)
    pools = [p for process in ckpt["train_state"]["pools"] for p in process]  # [process][codebook]
    held = sum((p["recent"].numel() + p["hits"].numel()) * 4 for p in pools)  # the pools as this run filled them
    full = sum((1024 * cb.weight.shape[1] + cb.weight.shape[0]) * 4 for cb in model.codebooks)  # full pools
    actual = (vae_run / "last.pt").stat().st_size
    tight = checkpoints.checkpoint_bytes(model, model.parameters(), held)
    assert actual <= tight <= actual + 1.25 * 2 ** 20, (actual, tight)  # the sizes are right, the margin is 1 MiB
    assert checkpoints.checkpoint_bytes(model, model.parameters(), full) >= tight


def test_a_partial_last_line_of_the_log_is_dropped_on_resume(custom_shapes, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = ["--data-root", str(custom_shapes), "--out", str(out), *VAE_TINY[:-2], "--steps", "3"]
    check = train_common.RunGuard.check

    def signal_at_step_2(self, loss, step):  # as if SIGTERM came during step 2
        self.received = "SIGTERM" if step == 1 else self.received
        return check(self, loss, step)
    monkeypatch.setattr(train_common.RunGuard, "check", signal_at_step_2)
    with pytest.raises(train_common.TrainingStopped):
        train_vae.train(train_vae.parse_args(args))
    monkeypatch.undo()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.1')  # then killed in the middle of writing a line
    train_vae.train(train_vae.parse_args([*args, "--resume"]))
    assert "dropped the partial last line" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps[-1] == 3 and all(isinstance(s, int) for s in steps)


def test_stale_temporaries_of_a_killed_run_are_removed_and_named(custom_shapes, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / f".last.pt.tmp-{dead_pid()}"
    stale.write_bytes(b"half a checkpoint")
    live = out / f".last.pt.tmp-{os.getppid()}"  # a live process's temporary is not ours to delete
    live.write_bytes(b"in use")
    train_vae.train(train_vae.parse_args(["--data-root", str(custom_shapes), "--out", str(out), *VAE_TINY]))
    assert not stale.exists() and live.exists() and f"removed {stale}" in capsys.readouterr().out


# ----------------------------------------------------------------------------- datasets on disk


def run_script(*argv, cwd):
    """A script in its own process: a SIGBUS would kill pytest itself."""
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_lmdb_faults_are_messages_naming_the_split(tmp_path):
    data.write_shapes(tmp_path, 64, counts={"train": 40, "val": 2}, quiet=True)
    mdb = tmp_path / "shapes" / "train" / "data.mdb"
    good = mdb.read_bytes()
    pages = good[:8192] + b"\x17" * (len(good) - 8192)  # the two meta pages intact, every data page garbage
    for fault, payload, expect in [("cut short", good[: len(good) // 2], "data.mdb is cut short"),
                                   ("empty", b"", "is not a readable LMDB split"),
                                   ("garbage", b"\x17" * len(good), "is not a readable LMDB split"),
                                   ("corrupt pages", pages, "rebuild it: python data.py shapes")]:
        mdb.write_bytes(payload)
        done = run_script(str(ROOT / "data.py"), "info", str(tmp_path / "shapes"), cwd=tmp_path)
        assert expect in done.stdout and "python data.py shapes" in done.stdout, (fault, done)
        assert "Traceback" not in done.stderr and done.returncode == 0, (fault, done.stderr)
        if fault in ("empty", "garbage"):
            continue  # the check data.py info runs above; training is shown the two other messages
        done = run_script(str(ROOT / "train_vae.py"), "--data-root", str(tmp_path), "--out", str(tmp_path / "r"),
                          *VAE_TINY, cwd=tmp_path)
        assert done.returncode == 1 and expect in done.stderr and "Traceback" not in done.stderr, (fault, done)
    mdb.write_bytes(good)


def negative_offset(buf):
    """The same record with a header whose first array starts 9 bytes before the payload."""
    n = int.from_bytes(buf[8:12], "little")
    head = json.loads(buf[12:12 + n])
    head[0]["offset"] = -9
    new = json.dumps(head).encode()
    return buf[:8] + len(new).to_bytes(4, "little") + new + buf[12 + n:]


@pytest.mark.parametrize("damage, expect", [
    (lambda b: b[:8] + b"\xff\xff\x00\x00" + b[12:], "JSONDecodeError"),  # a header length that is wrong
    (lambda b: b[:12] + b"[{broken" + b[20:], "JSONDecodeError"),  # a header that is not JSON
    (lambda b: b[:-100], "claims bytes 0..192 of a 156-byte payload"),  # a payload cut short
    (negative_offset, "claims bytes -9..183"),  # a negative offset
])
def test_damaged_records_name_the_file_and_the_key(tmp_path, damage, expect):
    rec = {"image": np.zeros((8, 8, 3), np.uint8), "segment": np.zeros((8, 8), np.uint8)}
    data.write_lmdb(tmp_path / "toy", iter([rec, rec]), dict(name="toy", split="train", resolution=8))
    env = data.lmdb.open(str(tmp_path / "toy"), subdir=True)
    with env.begin(write=True) as txn:
        txn.put(b"00000001", damage(bytes(txn.get(b"00000001"))))
    env.close()
    ds = data.LMDBDataset(tmp_path / "toy")
    with pytest.raises(data.DatasetCorrupt, match=rf"toy, record 00000001: .*({expect}).*rebuild the split"):
        ds[1]


def test_leftovers_of_a_killed_write_are_ignored_and_then_removed(tmp_path, capsys):
    folder = tmp_path / "shapes"
    stale = folder / f".train.tmp-{dead_pid()}"  # what a killed `python data.py shapes` leaves
    stale.mkdir(parents=True)
    (stale / "data.mdb").write_bytes(b"half a split")
    with pytest.raises(SystemExit, match="no dataset splits under"):
        data.main(["info", str(folder)])
    assert "ignored, the leftover of an interrupted write" in capsys.readouterr().out
    data.main(["shapes", "--root", str(tmp_path), "--train", "4", "--val", "2"])  # not "already exists"
    assert sorted(p.name for p in folder.iterdir()) == ["train", "val"]  # the leftover is gone


# ----------------------------------------------------------------------------- messages that pointed the wrong way


def test_a_real_dataset_with_a_wrong_split_names_its_splits(tmp_path):
    rec = {"image": np.zeros((8, 8, 3), np.uint8), "segment": np.zeros((8, 8), np.uint8)}
    for split in ("train", "val"):
        data.write_lmdb(tmp_path / "coco" / split, iter([rec] * 3), dict(name="coco", split=split, resolution=8))
    with pytest.raises(data.DatasetMissing, match=r"coco has no split 'bogus' \(its splits: train, val, select\)"):
        data.load_dataset("coco", "bogus", tmp_path)


def test_a_truncated_coco_annotation_file_is_named(tmp_path):
    src = tmp_path / "coco"
    (src / "annotations").mkdir(parents=True)
    (src / "annotations" / "panoptic_val2017.json").write_text('{"images": [{"id": 1, "file_na')
    with pytest.raises(SystemExit, match=r"panoptic_val2017.json is not valid JSON .* truncated download"):
        convert.main(["coco", "--src", str(src), "--out", str(tmp_path / "out")])
    assert not list((tmp_path / "out").rglob("*"))  # no split, no temporary left behind


def test_viz_into_a_file_stops_before_evaluating(vae_run, tmp_path, capsys):
    target = tmp_path / "figures.png"
    target.write_bytes(b"not a folder")
    with pytest.raises(SystemExit, match="--out .*figures.png is a file; --viz writes its figures into a folder"):
        evaluate.main(["--ckpt", str(vae_run / "best.pt"), "--viz", "2", "--out", str(target)])
    assert "separability" not in capsys.readouterr().out and target.read_bytes() == b"not a folder"


# ----------------------------------------------------------------------------- checkpoints that outlive the machine


def test_a_checkpoint_reaches_the_disk_before_its_name_and_its_name_after(tmp_path, monkeypatch):
    """save_checkpoint: the temporary file is flushed (fsync) before the rename, the folder after it, so a power cut
    leaves the old checkpoint or the new one; save_last's numbered copy is made from the flushed last.pt, renamed
    into place and its folder flushed, under a name the stale-temporary cleanup knows."""
    import torch
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", Path(b).name)) or real_replace(a, b))
    checkpoints.save_checkpoint(tmp_path / "best.pt", {"kind": "vae", "x": torch.ones(3)})
    assert events == [("fsync", False), ("replace", "best.pt"), ("fsync", True)]
    events.clear()
    d = train_common.Dist(0, 1, 0, torch.device("cpu"))
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))])
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    checkpoints.save_last(tmp_path, {"kind": "vae", "step": 7}, opt, scaler, 0.0, d, keep=2)
    assert events == [("fsync", False), ("replace", "last.pt"), ("fsync", True), ("replace", "step_0000007.pt"),
                      ("fsync", True)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "step_0000007.pt"]


def test_a_full_disk_stops_the_run_with_the_previous_checkpoint_intact(custom_shapes, tmp_path, monkeypatch, capsys):
    """ENOSPC while the checkpoints of step 2 are written: the run stops with one line that says how much room there
    is and what to do, the checkpoints of step 1 are as they were, and no temporary is left."""
    import errno
    import torch
    out = tmp_path / "run"
    args = ["--data-root", str(custom_shapes), "--out", str(out), *VAE_TINY[:-2], "--steps", "3", "--ckpt-every", "1"]
    real_save = torch.save

    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 2:
            real_save(obj, f, *a, **k)  # half of it lands, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit, match=r"no space left on the disk of .*run while writing (best|last).pt \(\d+ MiB free\); "
                                         r"the previous checkpoints are intact.*--resume"):
        train_vae.main(args)
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 1
    assert torch.load(out / "best.pt", weights_only=True)["step"] == 1
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_one_writer_per_out_and_no_resume_of_a_running_run(custom_shapes, vae_run, tmp_path):
    """A run holds a lock on its --out for its whole life: a second run into that folder, and --resume of it, stop
    with a message naming the process that holds it; the folder is untouched. The same process may run there again
    (one run after the other); once the holder has ended, the lock is free."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, checkpoints; checkpoints.hold_run(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(60)", str(out)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["--data-root", str(custom_shapes), "--out", str(out), *VAE_TINY]
        for extra in ([], ["--resume"], ["--overwrite"]):
            with pytest.raises(SystemExit, match=rf"{out} is in use by process {holder.pid} on .*one run writes a folder "
                                                 rf"at a time.*choose another --out"):
                train_vae.main([*args, *extra])
        assert sorted(p.name for p in out.iterdir()) == [".run.lock"]
    finally:
        holder.kill()
        holder.wait()
    train_vae.train(train_vae.parse_args(args))  # the holder ended: the folder is free
    train_vae.train(train_vae.parse_args([*args, "--overwrite"]))  # this process holds it: again is fine


def test_non_finite_weights_are_refused_wherever_a_checkpoint_is_read(custom_shapes, vae_run, tmp_path):
    """A checkpoint with a NaN among its weights: evaluate.py, train_ocl.py --vae-ckpt and --resume refuse it by
    name, never a score of 0 or a LinAlgError from deep inside."""
    import torch
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(vae_run / name, weights_only=True)
        key = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
        ckpt["model"][key] = ckpt["model"][key].clone().fill_(float("nan"))
        torch.save(ckpt, bad / name)
    says = rf"holds non-finite weights \(1 tensors, the first {key}\).*earlier checkpoint"
    with pytest.raises(SystemExit, match=says):
        evaluate.main(["--ckpt", str(bad / "best.pt"), "--data-root", str(custom_shapes)])
    with pytest.raises(SystemExit, match=says):
        train_ocl.main(["--data-root", str(custom_shapes), "--vae-ckpt", str(bad / "best.pt"), "--steps", "1"])
    with pytest.raises(SystemExit, match=says):
        train_vae.main(["--data-root", str(custom_shapes), "--out", str(bad), *VAE_TINY, "--resume"])
