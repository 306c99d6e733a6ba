"""phi_e, the primary encoders: the naive CNN, and the frozen DINO ViT-S/8 of the paper's big-little encoder, with
DINO's position interpolation and the loading and checking of DINO's official weights.

Paper: "Multi-Scale Fusion for Object Representation" (Zhao et al., ICLR 2025), Sect. 3.1 (phi_e: T -> F), A.3 (the
primary encoder of every main table is "big-little": a frozen DINO ViT-S/8 beside Kipf et al.'s naive CNN), Sect.
4.3 (the ablations use "naive CNN (Kipf et al., 2022) as the primary encoder", the default on the built-in datasets).
The features F go to Slot Attention, phi_sa (slot_attention.py).

Reading order: position_grid and CNNEncoder (the naive CNN, + DINO for big-little); ViTBlock and DinoViT (DINO
ViT-S/8 with DINO's own interpolate_pos_encoding); weights_digest, download_dino and dino_vit_s8 (DINO's weights:
the official file, checked, loaded strictly, named by its sha256 in checkpoints).

The encoder's stride: the naive CNN of Kipf et al. runs 5x5 convolutions at full resolution (the paper's big-little
CNN branch gives 128x128 features at 128 px: `stride=1`, the `--size paper` default). A 2-core CPU cannot afford
that, so the CPU size reads overlapping 4x4 windows 2 px apart (`stride=2`: masks at H/2); `stride=4` gives SLATE's
4x4 patches (masks at H/4); what each costs and scores is in results/2026-11-25-cpu-preset-tuning.md.

Big-little: `CNNEncoder(..., dino=...)` runs the frozen DINO (`DinoViT`, built by `dino_vit_s8`) beside the naive
CNN; DINO's map is projected (3x3 conv), up-sampled to the CNN's grid and added to the CNN's output: dino() ->
conv(k3 s1 p1) -> upsample + naivecnn(). Without `dino` it is the naive CNN alone.
"""
import hashlib
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# The primary encoder phi_e: the naive CNN, alone or beside a frozen DINO (big-little, A.3)


def position_grid(h, w, device=None):
    """(h, w, 4) coordinates [y, x, 1 - y, 1 - x] in [0, 1] of each cell (Locatello et al.'s soft position grid)."""
    ys = torch.linspace(0, 1, h, device=device)
    xs = torch.linspace(0, 1, w, device=device)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)  # (h, w, 2)
    return torch.cat([grid, 1 - grid], dim=-1)  # (h, w, 4)


class CNNEncoder(nn.Module):
    """The naive CNN primary encoder phi_e: T (b, 3, H, W) -> F (b, (H/r)*(W/r), d), plus the grid size (h, w).

    Stride r = 1 (the paper size): Kipf et al.'s naive CNN, four 5x5 convolutions at full resolution. Stride 4 or 2
    (ours, the CPU sizes): a first convolution with stride r (4: one cell per 4x4 patch; 2: overlapping 4x4 windows),
    then two 3x3 convolutions. 64 channels, ReLU between the convolutions but none after the last; a learned linear
    map of the position grid is added to every cell (soft position embedding); then LayerNorm and a two-layer MLP
    per cell. Masks come out at H/r. Locatello et al. put a ReLU after their last convolution too; here the
    features stay signed when the position embedding is added, and the LayerNorm + MLP after it are the
    nonlinearity (ours; every number in results/ was measured this way; a ReLU there is a one-line exercise).
    """

    def __init__(self, out_dim, channels=64, stride=4, dino=None):
        super().__init__()
        first = {1: (5, 2), 2: (4, 1), 4: (4, 0)}  # stride -> (kernel, padding) of the first convolution
        if stride not in first:
            raise ValueError(f"encoder stride {stride}: choose 4 (masks at H/4), 2 (H/2) or 1 (full resolution)")
        ch, r, (k, pad) = channels, stride, first[stride]
        k2 = 5 if r == 1 else 3  # the other convolutions' kernel: Kipf et al.'s 5x5 at full resolution
        convs = [nn.Conv2d(3, ch, k, stride=r, padding=pad), nn.ReLU()]  # (b, ch, H/r, W/r)
        for _ in range(2 if r == 1 else 1):  # four convolutions in all at full resolution, three at the CPU sizes
            convs += [nn.Conv2d(ch, ch, k2, padding=k2 // 2), nn.ReLU()]
        self.convs = nn.Sequential(
            *convs,
            # EXERCISE: encoder-relu (EXERCISES.md 8): add nn.ReLU() after this last convolution, as Locatello et al.
            nn.Conv2d(ch, ch, k2, padding=k2 // 2),  # (b, ch, H/r, W/r); at r = 2 a cell sees 12 px across
        )
        self.pos = nn.Linear(4, ch)  # soft position embedding
        self.norm = nn.LayerNorm(ch)
        self.mlp = nn.Sequential(nn.Linear(ch, ch), nn.ReLU(), nn.Linear(ch, out_dim))
        # big-little (A.3): a frozen DINO beside the CNN; only its 3x3 projection learns
        self.dino = None if dino is None else dino.eval().requires_grad_(False)
        self.dino_proj = None if dino is None else nn.Conv2d(dino.dim, ch, 3, padding=1)
        if dino is not None:  # checkpoints name DINO's weights (sha256) instead of holding 87 MB of them again
            self.register_state_dict_post_hook(_leave_out_dino)
            self.register_load_state_dict_post_hook(_dino_is_not_missing)

    def train(self, mode=True):
        """nn.Module.train, except for DINO: frozen, it stays in eval mode whatever the rest does."""
        super().train(mode)
        if self.dino is not None:
            self.dino.eval()
        return self

    @torch.no_grad()
    def dino_map(self, image, prenorm=False):
        """The frozen DINO's map of the images, (b, 384, H/8, W/8), rounded to fp16; prenorm=True (DINOSAUR's target
        before DINO's final LayerNorm, --dino-target prenorm) appends the map before that norm: (b, 768, H/8, W/8).
        The one place that computes it: the feature cache (train_ocl.FeatureCache) stores exactly what this returns,
        so cached and uncached steps see the same numbers."""
        maps = self.dino(image, prenorm)  # (b, 384, h, w), or its two maps after and before the final norm
        return (torch.cat(maps, 1) if prenorm else maps).half()

    def forward(self, image, dino_features=None):
        """image (b, 3, H, W) -> features (b, n, d), grid (h, w). dino_features: DINO's map of these images
        (b, 384, H/8, W/8) if already known (the feature cache; the first 384 channels of dino_map's); computed
        here otherwise."""
        f = self.convs(image)  # (b, ch, h, w)
        if self.dino is not None:  # dino() -> conv(k3 s1 p1) -> upsample (x 8/r, nearest) + naivecnn()
            if dino_features is None:
                dino_features = self.dino_map(image)  # (b, 384, H/8, W/8)
            dino_features = dino_features[:, :self.dino.dim]  # the final map (prenorm maps append the other)
            up = F.interpolate(self.dino_proj(dino_features.to(f.dtype)), size=f.shape[-2:], mode="nearest")
            f = f + up  # (b, ch, h, w)
        b, ch, h, w = f.shape
        f = f.permute(0, 2, 3, 1) + self.pos(position_grid(h, w, f.device))  # (b, h, w, ch)
        f = self.mlp(self.norm(f.reshape(b, h * w, ch)))  # (b, n, d)
        return f, (h, w)


def _leave_out_dino(module, state, prefix, local_metadata):
    """state_dict hook of a big-little CNNEncoder: drop the frozen DINO's weights (they come from their own file)."""
    for key in [k for k in state if k.startswith(prefix + "dino.")]:
        del state[key]


def _dino_is_not_missing(module, incompatible):
    """load_state_dict hook of a big-little CNNEncoder: a state dict without DINO's weights is complete."""
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if "dino" not in k.split(".")]


# -----------------------------------------------------------------------------
# DINO ViT-S/8: the frozen half of the paper's big-little encoder (A.3)

DINO_FILE = "dino_deitsmall8_pretrain.pth"  # the official release of Caron et al. 2021 (backbone only, 21.7M)
DINO_URL = f"https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/{DINO_FILE}"
# what a download of it must be: its size in bytes and the start of its md5 (the values public downloaders of the
# file check; no full digest is published with it)
DINO_BYTES, DINO_MD5_PREFIX = 86_728_949, "230cd5"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINO's input normalization


class ViTBlock(nn.Module):
    """One pre-norm transformer block of ViT (Dosovitskiy et al. 2021): x + MSA(LN(x)), then x + MLP(LN(x)) with
    MLP = fc2(GELU(fc1(.))), 4x wide. The parameter names are those of DINO's release (norm1, attn.qkv, attn.proj,
    norm2, mlp.fc1, mlp.fc2; ModuleDicts give the dotted names without a class per part)."""

    def __init__(self, dim=384, heads=6):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim)))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(dim, 4 * dim), fc2=nn.Linear(4 * dim, dim)))

    def forward(self, x):
        b, n, d = x.shape  # (b, 1 + patches, d)
        qkv = self.attn.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads)  # (b, n, 3, heads, d/heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (b, heads, n, d/heads)
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d/heads)) v: (b, heads, n, d/heads)
        x = x + self.attn.proj(a.transpose(1, 2).reshape(b, n, d))  # heads concatenated, projected: (b, n, d)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))  # (b, n, d)


class DinoViT(nn.Module):
    """DINO ViT-S/8: 8x8 patches embedded to 384 channels, a [CLS] token, learned position embeddings (for the 28x28
    patches of a 224-px image), 12 blocks of 6 heads, a final LayerNorm. Built randomly; the official state dict
    (DINO_FILE) loads into it as is (strict). Called on our images (b, 3, H, W) in [-1, 1], it applies DINO's
    ImageNet normalization itself and returns the last block's patch tokens after the final LayerNorm as a map
    (b, 384, H/8, W/8). Other grids than 28x28 get the position embeddings resized bicubically (128 px: 16x16)."""

    def __init__(self, dim=384, depth=12, heads=6, patch=8, native=224):
        super().__init__()
        self.dim = dim
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv2d(3, dim, patch, stride=patch)))  # (b, d, H/8, W/8)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (native // patch) ** 2, dim))  # [CLS] + 28 x 28
        self.blocks = nn.ModuleList(ViTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # not in the state dict (persistent=False), so the official file loads strictly
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def position(self, h, w):
        """Position embeddings for an h x w patch grid (1, 1 + h*w, d) as DINO's own interpolate_pos_encoding makes
        them, so that the features at any resolution are the official model's: the [CLS] one as is, the patch ones
        resized bicubically by the scale factor ((h + 0.1) / 28, (w + 0.1) / 28) (DINO adds 0.1 against float error
        in the output size); at the native grid they are returned untouched."""
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]  # (1, 1, d), (1, 28*28, d)
        side = math.isqrt(grid.shape[1])
        if (h, w) != (side, side):
            grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, d, 28, 28)
            grid = F.interpolate(grid, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic")  # (1, d, h, w)
            grid = grid.flatten(2).transpose(1, 2)  # (1, h*w, d)
        return torch.cat([cls, grid], dim=1)

    def forward(self, image, prenorm=False):
        """The map after the final LayerNorm (DINO's output); prenorm=True: (that map, the last block's map before
        the norm), the target OCLF's DINOSAUR reconstructs."""
        x = ((image + 1) / 2 - self.mean) / self.std  # [-1, 1] -> [0, 1] -> ImageNet-normalized, (b, 3, H, W)
        x = self.patch_embed.proj(x)  # (b, d, h, w), h = H/8
        b, d, h, w = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)  # (b, 1 + h*w, d)
        x = x + self.position(h, w)
        for block in self.blocks:
            x = block(x)
        # the patch tokens as a map (b, 384, H/8, W/8), in contiguous memory: a strided view would send the
        # big-little projection down another convolution kernel than cached maps (other float rounding)
        as_map = lambda t: t[:, 1:].transpose(1, 2).reshape(b, d, h, w).contiguous()  # noqa: E731
        out = as_map(self.norm(x))  # (b, 384, h, w)
        return (out, as_map(x)) if prenorm else out


def weights_digest(model):
    """sha256 of a model's weights themselves (names, shapes and values in state-dict order): the same for the same
    weights whatever file they came from, so a checkpoint can name the DINO it was trained with."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def download_dino(path):
    """The official DINO ViT-S/8 file into `path` (torch's hub cache), checked before it takes that name: downloaded
    to a temporary file beside it, its size and md5 compared with the known ones, then renamed; a download that
    fails or differs leaves nothing behind and says what to do."""
    tmp = path.with_name(f".{path.name}.download-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(DINO_URL, str(tmp), progress=True)
    except Exception as e:  # offline, a proxy, a full disk: say what to do
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"the DINO ViT-S/8 weights {DINO_FILE} are not in {path.parent} and could not be downloaded from "
            f"{DINO_URL} ({type(e).__name__}); put the file there or pass --dino-weights PATH "
            f"(--dino-weights random: random weights, for smoke runs only)") from None
    size, md5 = tmp.stat().st_size, hashlib.md5(tmp.read_bytes()).hexdigest()
    if size != DINO_BYTES or not md5.startswith(DINO_MD5_PREFIX):
        tmp.unlink()
        raise ValueError(f"the download of {DINO_URL} is not the official file ({size:,} bytes, md5 {md5[:6]}..., "
                         f"expected {DINO_BYTES:,} bytes, md5 {DINO_MD5_PREFIX}...); nothing was kept. Download it "
                         f"again, or by hand into {path.parent}")
    os.replace(tmp, path)


def dino_vit_s8(weights=None):
    """DINO ViT-S/8, frozen (eval mode, no gradients), and where its weights came from: (model, source, sha256 of
    the weights). weights: None = the official file through torch's hub cache (downloaded there on first use, never
    at import), a path to that file, or "random" (fixed random weights: smoke runs only; logs and checkpoints say so).
    Building it never touches the global random generators (seed k of a run starts the same whatever the encoder)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # "random" is the same random DINO every time, so evaluate.py can rebuild it
        model = DinoViT()
    if weights == "random":
        return model.eval().requires_grad_(False), "random", weights_digest(model)
    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / DINO_FILE
    if weights is None and not path.exists():
        download_dino(path)
    if not path.is_file():
        raise FileNotFoundError(f"--dino-weights {path}: no such file (the official file is {DINO_FILE}: {DINO_URL})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("teacher", state)  # a whole DINO training checkpoint: its teacher's backbone
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # the DINO projection head is not used
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ValueError(f"--dino-weights {path} is not a DINO ViT-S/8 state dict ({lines[-1][:200]})") from None
    return model.eval().requires_grad_(False), str(path), weights_digest(model)
