"""The paper's primary encoder (A.3): our DINO ViT-S/8 loads a state dict with the official release's names and
shapes (listed here from the release, not from our code) and computes what a plain re-derivation of ViT written
here computes (patchify by reshapes, attention with an explicit softmax, LayerNorm and GELU from their formulas);
the big-little encoder keeps DINO frozen; checkpoints name DINO's weights by their sha256 and do not hold them."""
import json
import math
import os
import shutil
import subprocess
import sys
import types
import urllib.error
from pathlib import Path

import lmdb
import pytest
import torch
import torch.nn.functional as F

import checkpoints
import data
import evaluate
import encoders
import ocl
import train_common
import train_ocl
from conftest import ROOT, TINY_OCL, refused

D, HEADS, DEPTH = 384, 6, 12


def official_shapes():
    """Names and shapes of dino_deitsmall8_pretrain.pth (DINO's vision_transformer.py, ViT-S/8 at 224 px)."""
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + 28 * 28, D), "patch_embed.proj.weight": (D, 3, 8, 8),
              "patch_embed.proj.bias": (D,), "norm.weight": (D,), "norm.bias": (D,)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.qkv.weight": (3 * D, D),
                       b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                       b + "norm2.weight": (D,), b + "norm2.bias": (D,), b + "mlp.fc1.weight": (4 * D, D),
                       b + "mlp.fc1.bias": (4 * D,), b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,)})
    return shapes


def official_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_shapes().items():
        value = 0.05 * torch.randn(shape, generator=g)
        state[name] = value + 1 if name.endswith("norm1.weight") or name.endswith("norm2.weight") or \
            name == "norm.weight" else value
    return state


def layer_norm(x, w, b, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def plain_vit(sd, image):
    """ViT-S/8 from its equations: x_0 = [cls; patches E] + pos, x' = x + MSA(LN(x)), x = x' + MLP(LN(x'))."""
    x = ((image + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    b, _, H, W = x.shape
    h, w = H // 8, W // 8
    patches = x.reshape(b, 3, h, 8, w, 8).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, 3 * 64)  # (c, ky, kx) order
    t = patches @ sd["patch_embed.proj.weight"].reshape(D, -1).T + sd["patch_embed.proj.bias"]
    pos = sd["pos_embed"]
    if h != 28:
        grid = pos[:, 1:].reshape(1, 28, 28, D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / 28, (w + 0.1) / 28), mode="bicubic")  # DINO's formula
        grid = grid.flatten(2).transpose(1, 2)
        pos = torch.cat([pos[:, :1], grid], 1)
    t = torch.cat([sd["cls_token"].expand(b, 1, D), t], 1) + pos
    for i in range(DEPTH):
        p = f"blocks.{i}."
        y = layer_norm(t, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        qkv = y @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
        q, k, v = (qkv[..., j * D:(j + 1) * D].reshape(b, -1, HEADS, D // HEADS).transpose(1, 2) for j in range(3))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // HEADS), dim=-1)
        o = (attn @ v).transpose(1, 2).reshape(b, -1, D)
        t = t + o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        y = layer_norm(t, sd[p + "norm2.weight"], sd[p + "norm2.bias"]) @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))  # GELU
        t = t + y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    t = layer_norm(t, sd["norm.weight"], sd["norm.bias"])
    return t[:, 1:].transpose(1, 2).reshape(b, D, h, w)


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dino") / "dino_deitsmall8_pretrain.pth"
    torch.save(official_state(), path)
    return path


def test_official_state_dict_loads_strictly_and_equals_a_plain_vit(official_file):
    model, source, digest = encoders.dino_vit_s8(str(official_file))
    assert source == str(official_file) and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_shapes()
    assert sum(p.numel() for p in model.parameters()) == 21_670_272  # ViT-S/8's published size (21.7M)
    sd = official_state()
    torch.manual_seed(1)
    for size in (224, 64):  # the native 28x28 grid, and 8x8 (position embeddings resized)
        image = torch.rand(1 if size == 224 else 2, 3, size, size) * 2 - 1
        with torch.no_grad():
            ours, ref = model(image), plain_vit(sd, image)
        assert ours.shape == (image.shape[0], D, size // 8, size // 8)
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    other, _, other_digest = encoders.dino_vit_s8("random")
    assert other_digest != digest and encoders.dino_vit_s8("random")[2] == other_digest  # fixed random


def test_position_embeddings_are_untouched_at_the_native_grid(official_file):
    model, _, _ = encoders.dino_vit_s8(str(official_file))
    assert torch.equal(model.position(28, 28), model.pos_embed)  # no resampling at 224 px
    assert model.position(16, 16).shape == (1, 1 + 256, D)  # 128 px


def cubic_1d(values, out_len, scale):
    """Bicubic resampling along one axis written out from its definition: Keys' cubic convolution with a = -0.75,
    output cell i read at the input coordinate (i + 0.5) / scale - 0.5 (half-pixel centres), edge values repeated.
    values (n, ...) -> (out_len, ...)."""
    a, n = -0.75, len(values)

    def kernel(x):
        x = abs(x)
        return ((a + 2) * x - (a + 3)) * x * x + 1 if x <= 1 else ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    out = []
    for i in range(out_len):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        out.append(sum(kernel(src - j) * values[min(max(j, 0), n - 1)] for j in range(base - 1, base + 3)))
    return torch.stack(out)


def test_position_embeddings_at_128_px_are_dinos_interpolate_pos_encoding():
    """At a 16x16 patch grid (128 px) the patch position embeddings are DINO's: bicubic by the scale factor
    (16 + 0.1) / 28 along each axis (not a resize to 16 x 16 cells), held against the formula written out."""
    model = encoders.dino_vit_s8("random")[0]
    with torch.no_grad():
        model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=torch.Generator().manual_seed(0)))
        ours = model.position(16, 16)[0, 1:].reshape(16, 16, D).double()
    grid = model.pos_embed[0, 1:].detach().reshape(28, 28, D).double()
    rows = cubic_1d(grid, 16, 16.1 / 28)  # (16, 28, D): along the rows, then along the columns
    expected = cubic_1d(rows.transpose(0, 1), 16, 16.1 / 28).transpose(0, 1)  # (16, 16, D)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(model.position(16, 16)[:, 0], model.pos_embed[:, 0])  # [CLS] as it is


def test_bad_weight_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--dino-weights .*no such file"):
        encoders.dino_vit_s8(str(tmp_path / "missing.pth"))
    state = official_state()
    del state["norm.bias"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match="cut.pth is not a DINO ViT-S/8 state dict"):
        encoders.dino_vit_s8(str(tmp_path / "cut.pth"))


def test_a_download_is_checked_before_it_takes_the_official_name(tmp_path, monkeypatch):
    """The DINO file torch's hub would download is kept only if its size and md5 are the official file's: a wrong
    download is named and nothing is left in the cache; a right one is renamed into place."""
    import hashlib
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, progress=True: Path(dst).write_bytes(b"html"))
    with pytest.raises(ValueError, match=r"is not the official file \(4 bytes, md5 .*expected 86,728,949 bytes, md5 "
                                         r"230cd5\.\.\.\); nothing was kept"):
        encoders.dino_vit_s8()
    assert not any((tmp_path / "hub" / "checkpoints").iterdir())
    body = b"the official bytes"  # stands in for the file: its size and md5 become the known ones
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, progress=True: Path(dst).write_bytes(body))
    monkeypatch.setattr(encoders, "DINO_BYTES", len(body))
    monkeypatch.setattr(encoders, "DINO_MD5_PREFIX", hashlib.md5(body).hexdigest()[:6])
    encoders.download_dino(tmp_path / "hub" / "checkpoints" / encoders.DINO_FILE)
    assert [p.name for p in (tmp_path / "hub" / "checkpoints").iterdir()] == [encoders.DINO_FILE]


def test_offline_without_the_file_stops_before_step_one(tiny_root, tiny_vaes, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, progress=True):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    out = tmp_path / "run"
    argv = ["--data-root", str(tiny_root), "--encoder", "dino", "--vae-ckpt", str(tiny_vaes[256]), "--out", str(out),
            *TINY_OCL]
    with pytest.raises(SystemExit, match="could not be downloaded") as e:
        train_ocl.main(argv)
    message = str(e.value)
    assert "dino_deitsmall8_pretrain.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "--dino-weights PATH" in message and not out.exists()


def test_big_little_trains_the_projection_keeps_dino_frozen_and_checkpoints_name_it(tiny_root, tiny_vaes, tmp_path,
                                                                                    official_file):
    args = train_ocl.parse_args(["--data-root", str(tiny_root), "--encoder", "dino", "--dino-weights", "random",
                                 "--vae-ckpt", str(tiny_vaes[256]), "--out", str(tmp_path / "run"), *TINY_OCL,
                                 "--steps", "2"])
    out = train_ocl.train(args)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert not any(".dino." in k for k in ckpt["model"]) and "encoder.dino_proj.weight" in ckpt["model"]
    assert ckpt["args"]["dino_weights"] == "random" and ckpt["model_args"]["encoder"] == "dino"
    fresh, _, digest = encoders.dino_vit_s8("random")
    assert ckpt["model_args"]["dino_sha256"] == digest
    model, _ = ocl.load_ocl(checkpoints.load_checkpoint(out / "last.pt", "ocl"))  # DINO rebuilt from its weights, checked by sha256
    assert all(torch.equal(a, b) for a, b in zip(model.encoder.dino.state_dict().values(),
                                                  fresh.state_dict().values()))  # unchanged by the 2 steps
    trainable = [n for n, _ in model.named_parameters() if not n.startswith(("vae.", "encoder.dino."))]
    assert len(ckpt["train_state"]["optimizer"]["param_groups"][0]["params"]) == len(trainable)  # DINO not in Adam
    model.train()
    assert not model.encoder.dino.training and model.encoder.convs.training
    with pytest.raises(ValueError, match="other DINO weights"):
        ocl.load_ocl(checkpoints.load_checkpoint(out / "last.pt", "ocl"), dino_weights=str(official_file))


# ----------------------------------------------------------------------------- the feature cache

def _one_process():
    return types.SimpleNamespace(main=True, world=1)


def test_cached_features_are_the_encoders_bit_for_bit_and_a_stale_cache_is_refused(tiny_root, tmp_path):
    dino, _, digest = encoders.dino_vit_s8("random")
    model = types.SimpleNamespace(encoder=encoders.CNNEncoder(32, 16, 2, dino=dino))  # what FeatureCache uses
    train = data.load_dataset("shapes", "train", tiny_root)
    folder = tmp_path / "train_dino"
    cache = train_ocl.FeatureCache(train, digest, folder).open(model, torch.device("cpu"), 8, _one_process())
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=8)))  # the fill's first batch: rows 0-7
    stored = cache(batch["index"], "cpu")
    assert stored.dtype == torch.float16 and stored.shape == (8, 384, 8, 8)
    with torch.no_grad():
        assert torch.equal(stored, dino(batch["image"]).half())
        encoder = encoders.CNNEncoder(32, 16, 2, dino=dino)
        assert torch.equal(encoder(batch["image"])[0], encoder(batch["image"], stored)[0])  # the two paths agree

    cache.close()
    before = (folder / "data.mdb").read_bytes()
    for field, value in (("dino_sha256", "0" * 64), ("resolution", 128)):
        stale = train_ocl.FeatureCache(train, digest, folder)
        stale.header[field] = value
        with pytest.raises(ValueError, match=f"made for another {field}.*rm -r"):
            stale.open(model, torch.device("cpu"), 8, _one_process())
    assert (folder / "data.mdb").read_bytes() == before  # refused, not touched

    env = lmdb.open(str(folder))  # a fill cut short: one record missing, the header not yet complete
    with env.begin(write=True) as txn:
        txn.delete(b"3")
        txn.put(b"header", json.dumps({**cache.header, "complete": False}).encode())
    env.close()
    again = train_ocl.FeatureCache(train, digest, folder).open(model, torch.device("cpu"), 8, _one_process())
    assert torch.equal(again(batch["index"], "cpu")[:3], stored[:3])
    with torch.no_grad():  # row 3 recomputed alone: DINO's float rounding depends a little on the batch
        torch.testing.assert_close(again([3], "cpu")[0].float(), stored[3].float(), atol=2e-3, rtol=0)


def test_feature_cache_under_two_gloo_processes_has_one_writer(tiny_root, tiny_vaes, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)  # the cache is written beside the dataset: not beside the shared one
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train_ocl.py"), "--data-root", str(root), "--encoder", "dino", "--dino-weights", "random",
               "--cache-features", "--vae-ckpt", str(tiny_vaes[256]), "--out", str(tmp_path / "run"), *TINY_OCL,
               "--steps", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("caching DINO features") == 1  # process 0 fills it; process 1 waits, then reads
    train = data.load_dataset("shapes", "train", root)
    folder = train_ocl.FeatureCache(train, "", None).folder
    assert folder.parent.parent == root and data.splits_in(train.path.parent) == ["train", "val", "select"]
    env = lmdb.open(str(folder), readonly=True, lock=False)
    with env.begin() as txn:
        assert json.loads(txn.get(b"header"))["complete"] and env.stat()["entries"] == len(train) + 1
    env.close()


# ----------------------------------------------------------------------------- DINOSAUR on DINO's features

def test_dinosaur_reconstructs_dinos_map_computed_once_and_reads_no_vae(tiny_root, tmp_path, capsys):
    """--decoder mlp --encoder dino is DINOSAUR: the target is the frozen DINO's map (b, 384, H/8, W/8), computed once
    per step and shared with the encoder (or both from the feature cache); MSE over tokens and channels; alpha masks
    on DINO's grid; no VAE is loaded, stored or named, and evaluate.py scores it."""
    with refused(capsys, "is DINOSAUR: it reconstructs DINO's features and reads no VAE"):  # a VAE it would not read
        train_ocl.parse_args(["--decoder", "mlp", "--encoder", "dino", "--vae-ckpt", "runs/x/best.pt"])
    args = train_ocl.parse_args(["--data-root", str(tiny_root), "--decoder", "mlp", "--encoder", "dino",
                                 "--dino-weights", "random", "--out", str(tmp_path / "run"), *TINY_OCL, "--steps", "2"])
    assert args.vae_ckpt is None and train_ocl.run_folder(args, None) == "runs/ocl_shapes_mlp-dino_dino"
    out = train_ocl.train(args)
    ckpt = checkpoints.load_checkpoint(out / "best.pt", "ocl")
    assert ckpt["vae"] is None and not any(k.startswith("vae.") for k in ckpt["model"])
    model, _ = ocl.load_ocl(ckpt)
    calls = []
    model.encoder.dino.register_forward_hook(lambda *a: calls.append(1))
    image = data.load_dataset("shapes", "val", tiny_root)[0]["image"][None]  # (1, 3, 64, 64)
    with torch.no_grad():
        result = model(image)
        assert len(calls) == 1  # one DINO forward per step: encoder input and target
        maps = model.encoder.dino_map(image)  # (1, 384, 8, 8)
        recon, alpha = model.decoder(model.encode(image, dino_features=maps)[0], (8, 8))
        assert len(calls) == 2 and model(image, dino_features=maps) is not None and len(calls) == 2  # cached: none
    assert maps.shape == (1, 384, 8, 8) and recon.shape == (1, 64, 384) and alpha.shape == (1, 7, 8, 8)
    target = maps.float().flatten(2).transpose(1, 2)  # (1, 64 tokens, 384 channels)
    assert torch.allclose(result["loss"], ((recon - target) ** 2).mean(), rtol=1e-5)  # MSE over tokens and channels
    torch.testing.assert_close(result["masks"].sum(1), torch.ones(1, 8, 8))  # alpha: a softmax over slots
    assert evaluate.main(["--ckpt", str(out / "best.pt"), "--limit", "4"])["metrics"]["ari"]["count"] == 4


def test_dinosaurs_mlp_is_three_hidden_layers_of_2048_at_paper_size():
    model = ocl.OCL(None, "mlp", 7, 128, encoder="dino", dino=encoders.dino_vit_s8("random")[0])
    layers = [m for m in model.decoder.mlp]
    widths = [(m.in_features, m.out_features) for m in layers if isinstance(m, torch.nn.Linear)]
    assert widths == [(256, 2048), (2048, 2048), (2048, 2048), (2048, 385)]  # 384 features + 1 alpha logit
    assert sum(isinstance(m, torch.nn.GELU) for m in layers) == 3 and model.token_grid == (16, 16)


def test_dino_target_prenorm_is_the_last_block_before_the_final_layernorm(tiny_root, tmp_path):
    """--dino-target prenorm (OCLF's DINOSAUR): the target is the last block's map before DINO's final LayerNorm,
    whose LayerNorm over channels is exactly the usual map; the encoder still reads the final map, and one DINO
    forward gives both."""
    dino = encoders.dino_vit_s8("random")[0]
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        post, pre = dino(image, prenorm=True)  # (2, 384, 4, 4) each
        assert torch.equal(post, dino(image))
        normed = dino.norm(pre.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(post.shape)
        assert torch.allclose(normed, post, atol=1e-5) and not torch.allclose(pre, post, atol=1e-2)
    args = train_ocl.parse_args(["--data-root", str(tiny_root), "--decoder", "mlp", "--encoder", "dino",
                                 "--dino-weights", "random", "--dino-target", "prenorm", "--out", str(tmp_path / "run"),
                                 *TINY_OCL, "--steps", "1"])
    assert train_ocl.run_folder(args, None) == "runs/ocl_shapes_mlp-dino-prenorm_dino"
    model, _ = ocl.load_ocl(checkpoints.load_checkpoint(train_ocl.train(args) / "last.pt", "ocl"))
    frames = data.load_dataset("shapes", "val", tiny_root)[0]["image"][None]  # (1, 3, 64, 64)
    with torch.no_grad():
        target = model.targets(frames)[1]  # (1, 384, 8, 8)
        post, pre = model.encoder.dino(frames, prenorm=True)
    assert torch.equal(target, pre.half().float()) and model.dino_prenorm
