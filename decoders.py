"""Slots back to the VAE guidance: the primary decoders phi_d: (X, S) -> X' of the three OCL families.

Paper: "Multi-Scale Fusion for Object Representation" (Zhao et al., ICLR 2025), Sect. 3.1 ("For transformer-based
OCL, a transformer decoder with internal masking performs the reconstruction as classification. For diffusion-
based OCL, a diffusion model, typically a conditional UNet, carries out the reconstruction as regression of the
noise added to X"), A.3 (SLATE decoder on the 4x down-sampled VAE tokens, c = 256; SlotDiffusion UNet with c = 4;
DINOSAUR as the foundation-based reference).

Notation: X guidance (b, c, h, w); I indices (b, g, h, w) with g = 2 for grouped/MSF guidance, 1 otherwise;
S slots (b, s, d_slot); t diffusion time step (b,). Letters: b batch, n = h*w tokens, s slots, m codes.

Reading order: Attention, Block (shared by the transformer decoder and the UNet), TransformerDecoder (SLATE),
noise_schedule / q_sample / timestep_embedding, UNet, DiffusionDecoder (SlotDiffusion), MLPDecoder (DINOSAUR).

Sizes: the defaults are the paper's (the authors' configs: 4 layers of d = 256; UNet channels 128-256-384-512), as
are ocl.OCL's (ocl.SIZES["paper"]); train_ocl.py shrinks them for CPU runs (its `--size cpu`).
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Attention and the transformer block


class Attention(nn.Module):
    """Multi-head attention of x (b, n, d) to a context (b, m, d_ctx) (itself if None); causal=True lets token i
    see tokens <= i only; bias (b, 1, n, m), if given, is added to the attention logits (the mask gate).
    qkv_bias=False: the query, key and value maps without bias, as latent diffusion's (SlotDiffusion's) UNet."""

    def __init__(self, dim, heads, context_dim=None, qkv_bias=True):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} not divisible by heads {heads}"
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context=None, causal=False, bias=None):
        context = x if context is None else context
        b, n, d = x.shape
        m, h = context.shape[1], self.heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)  # (b, heads, n, d/h)
        k, v = self.kv(context).view(b, m, 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2 x (b, heads, m, d/h)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal)  # (b, heads, n, d/h)
        return self.out(y.transpose(1, 2).reshape(b, n, d))  # (b, n, d)


class GEGLU(nn.Module):
    """The gated first layer of latent diffusion's feed-forward (GLU with a GELU gate, Shazeer 2020): one linear map
    to twice the width, split into a value and a gate, value * GELU(gate)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)  # 2 x (..., dim_out)
        return value * F.gelu(gate)


class Block(nn.Module):
    """Pre-norm transformer block: self-attention (causal or not), cross-attention to the slots, feed-forward of 4x
    the width. SLATE's: a GELU MLP. The UNet's (latent diffusion's BasicTransformerBlock, as SlotDiffusion's):
    geglu=True (the GEGLU feed-forward) and qkv_bias=False."""

    def __init__(self, dim, heads, context_dim, dropout=0.0, geglu=False, qkv_bias=True):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), Attention(dim, heads, qkv_bias=qkv_bias)
        self.norm2, self.cross_attn = nn.LayerNorm(dim), Attention(dim, heads, context_dim, qkv_bias=qkv_bias)
        self.norm3 = nn.LayerNorm(dim)
        if geglu:
            self.mlp = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        else:
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x, slots, causal=False, bias=None):
        x = x + self.self_attn(self.norm1(x), causal=causal)  # (b, n, d)
        x = x + self.cross_attn(self.norm2(x), slots, bias=bias)  # every token reads the slots (bias: the gate)
        return x + self.mlp(self.norm3(x))


# -----------------------------------------------------------------------------
# SLATE: autoregressive transformer decoder, reconstruction as classification of the VAE code indices


class TransformerDecoder(nn.Module):
    """Predicts the code indices of the guidance tokens one after the other (raster order), from the slots and
    the previous tokens: logits_i = f(BOS, X_1 .. X_{i-1}; S). Teacher forcing during training.

    Input embedding: the frozen VAE's code vectors X (c channels) through a linear layer (the code vector of a
    token is its embedding), plus learned positions; a learned BOS starts the sequence. Output: one linear
    classifier per index of the guidance, e.g. two for MSF's (scale-invariant, scale-variant) pair.
    With several guide scales (Tab. 5 lower right) their tokens are concatenated into one sequence.
    """

    def __init__(self, code_dim, vocab, grids, slot_dim, dim=256, layers=4, heads=4, dropout=0.0):
        super().__init__()
        self.grids, self.vocab = [tuple(g) for g in grids], list(vocab)  # e.g. [(16, 16)], [64, 64]
        n = sum(h * w for h, w in self.grids)
        self.embed = nn.Linear(code_dim, dim)
        self.bos = nn.Parameter(torch.randn(1, 1, dim) / math.sqrt(dim))
        self.pos = nn.Parameter(torch.randn(1, n, dim) * 0.02)  # (1, n, d)
        self.blocks = nn.ModuleList([Block(dim, heads, slot_dim, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        # one linear classifier per index group (MSF: scale-invariant, scale-variant) and guide scale
        self.classifiers = nn.ModuleList([nn.ModuleList([nn.Linear(dim, m) for m in self.vocab]) for _ in self.grids])

    def forward(self, xs, slots):
        """xs: per guide scale (b, c, h, w); slots (b, s, d_slot) -> per scale, per index group (b, h*w, m) logits,
        tokens in raster order. Token-major, as the classifiers write them: cross-entropy over 4,096 codes reads this
        layout without a copy, which makes a 4,096-code VQ-VAE's SLATE step markedly cheaper on a CPU."""
        tokens = torch.cat([x.flatten(2).transpose(1, 2) for x in xs], dim=1)  # (b, n, c)
        b = tokens.shape[0]
        inp = torch.cat([self.bos.expand(b, -1, -1), self.embed(tokens[:, :-1])], dim=1) + self.pos  # (b, n, d)
        for block in self.blocks:
            inp = block(inp, slots, causal=True)
        out = self.norm(inp)  # (b, n, d)
        logits, start = [], 0
        for (h, w), classifiers in zip(self.grids, self.classifiers):
            part = out[:, start:start + h * w]  # (b, h*w, d)
            logits.append([cls(part) for cls in classifiers])  # g x (b, h*w, m)
            start += h * w
        return logits

    @staticmethod
    def loss(logits, indices):
        """Cross-entropy of every index group at every guide scale, summed over groups (Sect. 3.1: reconstruction
        as classification); averaged over guide scales. logits: per scale, per group (b, h*w, m); indices: per scale
        (b, g, h, w)."""
        per_scale = [sum(F.cross_entropy(lg.flatten(0, 1), idx[:, k].flatten())  # (b*h*w, m) against (b*h*w,)
                         for k, lg in enumerate(lgs)) for lgs, idx in zip(logits, indices)]
        return sum(per_scale) / len(per_scale)


# -----------------------------------------------------------------------------
# SlotDiffusion: DDPM noise schedule and a slot-conditioned UNet


def noise_schedule(steps=1000, beta_start=0.0015, beta_end=0.0195):
    """The "scaled_linear" betas (evenly spaced in sqrt(beta), squared) from 0.0015 to 0.0195 over 1,000 steps:
    latent diffusion's (LDM) schedule, which SlotDiffusion and the authors' configs keep. Returns betas and
    alpha_bar_t = prod_{s<=t} (1 - beta_s), both (T,)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return betas.float(), torch.cumprod(1 - betas, 0).float()


def q_sample(x0, t, noise, alpha_bar):
    """x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), reparametrised with `noise`."""
    a = alpha_bar[t].view(-1, *[1] * (x0.dim() - 1))  # (b, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer time steps (b,) -> (b, dim) (Transformer positions, as DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (b, half)
    return torch.cat([args.cos(), args.sin()], dim=1)


def _groups(ch):
    return 32 if ch % 32 == 0 else 8


def zero_init(module):
    """A layer whose weights and bias start at zero, as latent diffusion's `zero_module`: the residual branch it
    ends adds nothing at initialisation, so every block starts as the identity (or its skip path) and the UNet
    starts by predicting zeros."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Latent diffusion's (SlotDiffusion's) residual block: GroupNorm-SiLU-conv, plus the time embedding (SiLU, then
    a linear map to this block's channels), GroupNorm-SiLU-dropout-conv, the last conv zero-initialised; plus the
    skip path (a 1x1 conv where the channels change, else the identity)."""

    def __init__(self, in_ch, out_ch, time_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(in_ch), in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time = nn.Linear(time_dim, out_ch)
        self.norm2, self.drop = nn.GroupNorm(_groups(out_ch), out_ch), nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))  # the block starts as its skip path
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))  # (b, out, h, w)
        h = h + self.time(F.silu(temb))[:, :, None, None]  # without the SiLU, two linear maps would stack
        h = self.conv2(self.drop(F.silu(self.norm2(h))))  # (b, out, h, w)
        return self.skip(x) + h


class SpatialTransformer(nn.Module):
    """Latent diffusion's (SlotDiffusion's) attention block on a feature map: GroupNorm, a 1x1 conv in (proj_in),
    one transformer block over the h*w cells (self-attention, cross-attention to the slots, GEGLU feed-forward), a
    1x1 conv out (proj_out, zero-initialised: the block starts as the identity), added to the input.
    masks (b, s, H', W'), if given (--mask-gate): Slot Attention's masks gate the cross-attention, position p's logit
    for slot k plus log m_k(p), m average-pooled to this map's grid: p reads mostly the slots that claim it."""

    def __init__(self, ch, slot_dim, heads):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.block = Block(ch, heads, slot_dim, geglu=True, qkv_bias=False)
        self.proj_out = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x, slots, masks=None):
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (b, h*w, c)
        bias = None
        if masks is not None:  # uniform masks add one constant per row: no change; a mask of 0 shuts a slot out
            # ours: the mask gate, log m_k(p) added to the cross-attention logits (--mask-gate)
            m = F.adaptive_avg_pool2d(masks, (h, w))  # (b, s, h, w): the share of each slot in each cell
            bias = m.clamp(min=1e-6).log().flatten(2).transpose(1, 2)[:, None]  # (b, 1, h*w, s)
        t = self.block(t, slots, bias=bias)  # (b, h*w, c)
        return x + self.proj_out(t.transpose(1, 2).reshape(b, c, h, w))  # (b, c, h, w)


class UNet(nn.Module):
    """Conditional UNet eps_theta(x_t, t, S) on the guidance grid: latent diffusion's UNetModel as SlotDiffusion
    configures it, block for block in the same order (the time embedding; conv_in; per level `layers` ResBlocks, each
    followed by a SpatialTransformer on the levels in `attn_levels`, then a strided conv; the middle ResBlock,
    SpatialTransformer, ResBlock; per level up `layers` + 1 ResBlocks on the concatenated skips, the same
    SpatialTransformers, then nearest up-sampling and a conv; GroupNorm-SiLU-conv out).

    At the paper's size (base 128, mults 1-2-3-4, 2 layers, attention at the 8x8, 4x4 and 2x2 levels of the 16x16
    grid, slots of 256) it has the parameters of the authors' diffusers UNet2DConditionModel, 135,048,452
    (`benchmarks/unet_params.py`). Initialisation is latent diffusion's: the last conv of every residual branch,
    every proj_out and the output conv start at zero (diffusers, which the authors' code builds on, starts them
    at PyTorch's default). Heads: `heads` per attention (the authors' 8 at the paper's size; SlotDiffusion's own
    configs use heads of 32 channels).
    """

    def __init__(self, in_ch, slot_dim, base=128, mults=(1, 2, 3, 4), layers=2, attn_levels=(1, 2, 3), heads=8,
                 dropout=0.1):
        super().__init__()
        self.base, time_dim = base, 4 * base
        self.time = nn.Sequential(nn.Linear(base, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(in_ch, base, 3, padding=1)
        self.down, chans, ch = nn.ModuleList(), [base], base
        for level, mult in enumerate(mults):
            for _ in range(layers):
                self.down.append(nn.ModuleList([ResBlock(ch, base * mult, time_dim, dropout),
                                                SpatialTransformer(base * mult, slot_dim, heads) if level in attn_levels else nn.Identity()]))
                ch = base * mult
                chans.append(ch)
            if level < len(mults) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # halve the grid
                chans.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, time_dim, dropout), SpatialTransformer(ch, slot_dim, heads),
                                  ResBlock(ch, ch, time_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for _ in range(layers + 1):
                self.up.append(nn.ModuleList([ResBlock(ch + chans.pop(), base * mult, time_dim, dropout),
                                              SpatialTransformer(base * mult, slot_dim, heads) if level in attn_levels else nn.Identity()]))
                ch = base * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
        # the output conv starts at zero: the untrained UNet predicts 0 (the mean of both eps and the unit-variance X)
        self.out = nn.Sequential(nn.GroupNorm(_groups(ch), ch), nn.SiLU(), zero_init(nn.Conv2d(ch, in_ch, 3, padding=1)))

    def forward(self, x, t, slots, masks=None):
        """x_t (b, c, h, w), t (b,), slots (b, s, d); masks (b, s, H', W') gate every cross-attention (--mask-gate)."""
        temb = self.time(timestep_embedding(t, self.base))  # (b, 4*base)
        h = self.conv_in(x)  # (b, base, h, w)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, nn.ModuleList):
                h = layer[1](layer[0](h, temb), slots, masks) if not isinstance(layer[1], nn.Identity) else layer[0](h, temb)
            else:
                h = layer(h)  # down-sampling
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, temb), slots, masks), temb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = layer[0](torch.cat([h, skips.pop()], dim=1), temb)
                h = layer[1](h, slots, masks) if not isinstance(layer[1], nn.Identity) else h
            else:
                h = layer(h)  # up-sampling
        return self.out(h)  # (b, in_ch, h, w): the predicted noise (or X itself: prediction "x0")


def global_std(x):
    """The (unbiased) standard deviation of all elements of x, over the x of every process of a torchrun group
    (all-reduced sums; the plain x.std() for one process). Two passes: the mean first, then the squares."""
    x = x.detach().float()
    group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    total = torch.stack([x.sum(), torch.tensor(float(x.numel()), device=x.device)])  # (2,) sum, count
    if group:
        dist.all_reduce(total)
    mean = total[0] / total[1]
    squares = ((x - mean) ** 2).sum()
    if group:
        dist.all_reduce(squares)
    return (squares / (total[1] - 1)).sqrt()


class DiffusionDecoder(nn.Module):
    """SlotDiffusion's decoder: learns eps_theta(x_t, t, S) with loss ||eps - eps_theta(x_t, t, S)||^2 where
    x_t = sqrt(alpha_bar_t) X + sqrt(1 - alpha_bar_t) eps, t ~ U{0..T-1} (DDPM, epsilon prediction).

    latent_scale "auto": X is multiplied by `scale` = 1 / std(X) measured on the first training batch (ours; latent
    diffusion's latent scaling: the noise schedule assumes unit-variance data); "1": X as it is (SlotDiffusion and the
    authors' code). `sample` undoes it.
    prediction "eps" (SlotDiffusion, the authors' code) or "x0" (an option of SlotDiffusion's code: the UNet predicts
    X itself, loss ||X - x0_theta(x_t, t, S)||^2, which weights the noisy steps, where only the slots know X, by SNR^-1
    against epsilon's). gate (ours, --mask-gate): Slot Attention's masks gate the UNet's cross-attention
    (SpatialTransformer); loss and sample then take them.
    """

    def __init__(self, code_dim, slot_dim, base=128, mults=(1, 2, 3, 4), layers=2, attn_levels=(1, 2, 3), heads=8,
                 dropout=0.1, steps=1000, beta_start=0.0015, beta_end=0.0195, latent_scale="auto", prediction="eps",
                 gate=False):
        super().__init__()
        if prediction not in ("eps", "x0"):
            raise ValueError(f"diffusion prediction {prediction!r}: choose eps (the noise) or x0 (X itself)")
        self.prediction, self.gate = prediction, gate
        self.unet = UNet(code_dim, slot_dim, base, mults, layers, attn_levels, heads, dropout)
        betas, alpha_bar = noise_schedule(steps, beta_start, beta_end)
        self.register_buffer("betas", betas)
        self.register_buffer("alpha_bar", alpha_bar)
        if latent_scale not in ("auto", "1"):
            raise ValueError(f"latent scale {latent_scale!r}: choose auto (1 / std of the first batch) or 1")
        self.register_buffer("scale", torch.tensor(0.0 if latent_scale == "auto" else 1.0))  # 0: not measured yet

    def loss(self, x0, slots, t=None, masks=None):
        """The DDPM loss of one batch: x0 = X (b, c, h, w) the frozen VAE's guidance, slots (b, s, d); a random time
        step t (b,) per sample unless given; masks (b, s, h', w'): Slot Attention's, read only with the gate. Returns
        the scalar MSE between the noise (or, prediction "x0", the scaled X) and its prediction."""
        # The latent scale: X of a c = 4 VAE has no fixed variance, but the schedule assumes unit-variance data.
        # It is measured once, on the first training batch (X is frozen, so one batch estimates it well), and
        # kept in a buffer: checkpoints carry it, evaluation and sampling use the stored value, never re-measure.
        # Under DDP it is the std of the combined first batch of all processes: one value for every process.
        if self.training and self.scale == 0:
            # ours: latent scaling 1 / std(X) (the originals use 1)
            self.scale.fill_(1.0 / global_std(x0).clamp(min=1e-6).item())
        x0 = x0 * self.scale  # (b, c, h, w), unit variance
        if t is None:
            t = torch.randint(0, len(self.betas), (x0.shape[0],), device=x0.device)  # (b,)
        noise = torch.randn_like(x0)
        pred = self.unet(q_sample(x0, t, noise, self.alpha_bar), t, slots, self._gate(masks))
        return F.mse_loss(pred.float(), (noise if self.prediction == "eps" else x0).float())

    def _gate(self, masks):
        """The masks the UNet reads: Slot Attention's with the gate (then required), none without it."""
        if self.gate and masks is None:
            raise ValueError("this SlotDiffusion decoder reads the slots through Slot Attention's masks (--mask-gate): "
                             "pass masks=")
        return masks if self.gate else None

    @torch.no_grad()
    def sample(self, slots, shape, steps=50, generator=None, masks=None):
        """DDIM (eta = 0, deterministic given the start noise) with `steps` of the T training steps: X' (b, c, h, w).
        masks: Slot Attention's (b, s, h', w'), needed with the gate."""
        x = torch.randn(shape, generator=generator, device=slots.device)
        ts = torch.linspace(len(self.betas) - 1, 0, steps, device=slots.device).round().long()
        for i, t in enumerate(ts):
            a = self.alpha_bar[t]
            a_prev = self.alpha_bar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=x.device)
            pred = self.unet(x, t.expand(shape[0]), slots, self._gate(masks))
            if self.prediction == "eps":
                eps = pred
                x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()  # predicted clean sample
            else:  # x0 prediction: the noise it implies, x_t = sqrt(a) x0 + sqrt(1 - a) eps
                x0 = pred
                eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x / self.scale.clamp(min=1e-6)


# -----------------------------------------------------------------------------
# DINOSAUR: broadcast MLP decoder with per-slot alpha masks


class MLPDecoder(nn.Module):
    """Every slot is broadcast to the n token positions (plus a learned position embedding) and decoded by a shared
    MLP into a target vector and an alpha logit; alphas are normalised over slots (softmax) and the reconstruction
    is the alpha-weighted sum. The alphas are the masks DINOSAUR is evaluated on."""

    def __init__(self, slot_dim, target_dim, num_tokens, hidden=2048, layers=3):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 1, num_tokens, slot_dim) * 0.02)  # (1, 1, n, d)
        mlp = [nn.Linear(slot_dim, hidden), nn.GELU()]
        for _ in range(layers - 1):
            mlp += [nn.Linear(hidden, hidden), nn.GELU()]
        self.mlp = nn.Sequential(*mlp, nn.Linear(hidden, target_dim + 1))

    def forward(self, slots, grid):
        b, s, _ = slots.shape
        h, w = grid
        out = self.mlp(slots[:, :, None, :] + self.pos)  # (b, s, n, D + 1)
        recon, alpha = out[..., :-1], out[..., -1:].softmax(dim=1)  # (b, s, n, D), (b, s, n, 1): softmax over slots
        recon = (alpha * recon).sum(dim=1)  # (b, n, D)
        return recon, alpha[..., 0].view(b, s, h, w)  # masks (b, s, h, w)
