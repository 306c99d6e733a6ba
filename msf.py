"""Multi-Scale Fusion (MSF): the image pyramid, naive multi-scale quantization, and inter/intra-scale quantized
fusion, plus the ablation variants of the paper.

Paper: "Multi-Scale Fusion for Object Representation" (Zhao et al., ICLR 2025), Sect. 3.2 (image pyramid,
naive multi-scale training with one shared codebook), Sect. 3.3 (Eq. 3-5, Algorithm 1), Sect. 3.4 (codebook
parameters), Tab. 5-6 (ablations).

Notation (paper -> code): scale n = 1..N is list index n-1, finest first; Z_n `zs[n]` (b, c, h_n, w_n) with
h_n = h / 2^(n-1); Z^si_n, Z^sv_n the two halves after project-up; C^si the shared scale-invariant codebook
`codebook_si` (m, c); C^sv_n the scale-variant codebooks `codebooks_sv[n]` (m, c); W `weight` (2c, c);
I_n `indices[n]` (b, 2, h_n, w_n) = [scale-invariant index, scale-variant index]; X_n `xs[n]` (b, c, h_n, w_n).

Reading order: image_pyramid, resample, multi_scale_fusion (the paper's contribution, one function of its inputs),
fuse_continuous (the channel-concat / element-wise-sum alternatives of Tab. 6), MSFVAE (the module that
train_vae.py trains), build_vae (the one `if` that turns --vae flags into a model), load_vae (the same from a
checkpoint: what train_ocl.py and evaluate.py call).

Where the paper and the authors' public code differ, this follows the paper: the authors' code has no projection
W, quantizes the full c channels in both branches, averages instead of concatenating, and uses 256/256/128/64 codes.
Here: Eq. 3 project-up with pinv(W), chunk into halves, Eq. 5 concat and project-down with W, and 4 codebooks of 64
codes (64 x 64 = 4096 combinations).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import vae


def image_pyramid(image, num_scales=3, mode="halve"):
    """T_1 = T, T_n = bilinear down-sampling of T by 2^(n-1) (Sect. 3.2). image (b, 3, H, W) -> N x (b, 3, H/2^(n-1), W/2^(n-1)).

    mode "halve": each level halves the previous one; bilinear interpolation at exactly 1/2 (align_corners=False)
    averages each 2x2 block, the classic box pyramid, so no level aliases. mode "direct" (the authors' code): T
    itself resized by 2^-(n-1), bilinear without antialiasing, so from level 3 on a level samples 2x2 of each 4x4
    block and aliases.
    """
    levels = [image]
    for n in range(1, num_scales):
        # EXERCISE: scales (EXERCISES.md 3): `--scales 4` adds a level here; what does the 4th scale see at 64 px?
        if mode == "direct":  # authors: resized from T directly (--pyramid direct)
            levels.append(F.interpolate(image, scale_factor=0.5 ** n, mode="bilinear", align_corners=False))
        else:  # ours: each level the box average of the one before
            levels.append(F.interpolate(levels[-1], scale_factor=0.5, mode="bilinear", align_corners=False))
    return levels


def resample(z, src, dst):
    """Bring the super-pixels of scale `src` onto the grid of scale `dst` (Sect. 3.3, step 1; Alg. 1).

    Finer -> coarser (src < dst): mean over the 2^(dst-src) x 2^(dst-src) block of super-pixels ("mean them
    along all spatial dimensions as voting"). Coarser -> finer (src > dst): the covering super-pixel
    Z[i / 2^(src-dst), j / 2^(src-dst)], i.e. nearest up-sampling. z (b, c, h_src, w_src) -> (b, c, h_dst, w_dst).
    """
    if src < dst:
        # EXERCISE: vote-pool (EXERCISES.md 2): F.max_pool2d instead of the mean "voting" of the paper
        return F.avg_pool2d(z, 2 ** (dst - src))
    if src > dst:
        return F.interpolate(z, scale_factor=2 ** (src - dst), mode="nearest")
    return z


def multi_scale_fusion(zs, codebook_si, codebooks_sv, weight, inter=True, tau=0.0, alpha=0.0, return_parts=False,
                       noise=0.0):
    """Inter/intra-scale quantized fusion, Sect. 3.3 and Algorithm 1.

    zs: N x (b, c, h_n, w_n), finest first. codebook_si: (m, c) shared by all scales. codebooks_sv: N x (m, c),
    one per scale (the same tensor N times = the "shared" ablation), or None = no intra-scale fusion (then
    weight must be None and the si branch quantizes the raw c channels). weight: W (2c, c) or None.
    inter=False: each scale votes alone (no inter-scale fusion). tau > 0: Gumbel sampling in matching; noise > 0:
    the authors' Gumbel-sampled stage-2 guidance (vae.match), whose perturbed probabilities then vote in Eq. 4.
    alpha: annealed residual (vae.straight_through). Codebooks may be tensors or vae.Codebook modules.

    What it changes besides its outputs: nothing with plain tensors or in eval mode (stage 2, evaluation). A
    vae.Codebook in training mode also keeps the books of the code-replacing trick: on its first call it starts its
    codes on the candidates it is given (Codebook.init_from), and every selection counts which codes were used and
    adds the vectors to its sample of recent ones (Codebook.observe); with tau > 0 the Gumbel noise draws from the
    random generator.

    Returns indices: N x (b, 2, h_n, w_n) long ([si, sv]; (b, 1, h_n, w_n) without intra-scale fusion) and
    xs: N x (b, c, h_n, w_n); the forward value of xs is Eq. 5 exactly (for alpha = 0) and its gradient reaches
    zs by the straight-through estimator. With return_parts, also per scale a dict of the continuous and
    quantized halves (for the losses), the si codes before inter-scale fusion (for Fig. 3) and `wins` (N,), how many
    of its super-pixels each scale won in Eq. 4.
    """
    N = len(zs)
    c = zs[0].shape[1]
    intra = codebooks_sv is not None
    assert intra == (weight is not None), "intra-scale fusion needs both codebooks_sv and W; without it, neither"
    if intra:
        assert len(codebooks_sv) == N, f"need one scale-variant codebook per scale ({N}), got {len(codebooks_sv)}"
        p = vae.pinv(weight)  # (c, 2c)
        ups = [vae.project(z, p) for z in zs]  # Eq. 3: Z_n pinv(W), N x (b, 2c, h_n, w_n)
        zsi = [u[:, :c] for u in ups]  # chunk_{c,2}: scale-invariant half, N x (b, c, h_n, w_n)
        zsv = [u[:, c:] for u in ups]  # scale-variant half, N x (b, c, h_n, w_n)
    else:
        zsi = list(zs)

    indices, xs, parts = [], [], []
    for n in range(N):
        b, _, h, w = zsi[n].shape
        # Step 1: the same region seen by every scale, on the grid of scale n (only scale n itself without inter)
        sources = range(N) if inter else [n]
        cands = torch.stack([resample(zsi[j], j, n) for j in sources])  # (N', b, c, h, w)
        # Step 2: match every candidate with the shared codebook C^si (Eq. 1); one batched match for all N'
        # (groups: the N' stacked batches, which the codebook's data init needs to know under DDP)
        flat_idx, conf = vae.cb_match(codebook_si, cands.flatten(0, 1), tau, groups=len(sources), confidence=True,
                                      noise=noise)
        conf = conf.unflatten(0, (len(sources), b))  # (N', b, h, w): P of each candidate's chosen code
        cand_idx = flat_idx.unflatten(0, (len(sources), b))  # (N', b, h, w): each candidate's code
        # Step 3, Eq. 4: I^si_n = argmax_m(max_n P): the most confident scale wins each super-pixel
        # EXERCISE: soft-scales (EXERCISES.md 1): weight the candidates by softmax(log P / T) instead of the argmax
        win = conf.argmax(dim=0)  # (b, h, w) index into `sources`
        wins = torch.zeros(N, device=win.device)  # (N,) super-pixels each scale wins (validate_vae's wins<n>_<j>)
        wins[list(sources)] = torch.bincount(win.flatten(), minlength=len(sources)).float()
        idx_si = cand_idx.gather(0, win[None])[0]  # (b, h, w)
        z_si = cands.gather(0, win[None, :, None].expand(1, b, c, h, w))[0]  # (b, c, h, w) the winner's continuous vector
        q_si = vae.cb_select(codebook_si, idx_si, z_si, tau)  # Eq. 2: X^si_n (b, c, h, w)
        part = {"q_si_own": vae.cb_select(codebook_si, cand_idx[sources.index(n)]).detach(),  # si before inter fusion
                "wins": wins}
        if intra:
            # scale-variant half: its own codebook C^sv_n, no voting
            idx_sv, _ = vae.cb_match(codebooks_sv[n], zsv[n], tau, noise=noise)  # (b, h, w)
            q_sv = vae.cb_select(codebooks_sv[n], idx_sv, zsv[n], tau)  # X^sv_n (b, c, h, w)
            z2 = torch.cat([z_si, zsv[n]], dim=1)  # (b, 2c, h, w)
            q2 = torch.cat([q_si, q_sv], dim=1)  # concat_c(X^si_n, X^sv_n), (b, 2c, h, w)
            x = vae.project(vae.straight_through(z2, q2, alpha), weight)  # Eq. 5: concat(..) W, (b, c, h, w)
            indices.append(torch.stack([idx_si, idx_sv], dim=1))  # (b, 2, h, w)
            part.update(z=[z_si, zsv[n]], q=[q_si, q_sv])
        else:
            x = vae.straight_through(z_si, q_si, alpha)  # (b, c, h, w)
            indices.append(idx_si[:, None])  # (b, 1, h, w)
            part.update(z=[z_si], q=[q_si])
        xs.append(x)
        parts.append(part)
    if return_parts:
        return indices, xs, parts
    return indices, xs


def fuse_continuous(zs, mode, mixer=None):
    """The alternatives of Tab. 6 (FPN-style, "mixing both low- and high-quality representations together"):
    for every scale n, bring all scales onto its grid (resample) and either concatenate the channels and mix them
    with a 1x1 convolution `mixer` (N*c -> c), "channel-concat", or add them, "element-wise-sum".
    zs: N x (b, c, h_n, w_n) -> N x (b, c, h_n, w_n), continuous (quantized afterwards with one codebook)."""
    fused = []
    for n in range(len(zs)):
        same_grid = [resample(z, j, n) for j, z in enumerate(zs)]  # N x (b, c, h_n, w_n)
        if mode == "concat":
            fused.append(mixer(torch.cat(same_grid, dim=1)))  # (b, N*c, h, w) -> (b, c, h, w)
        else:
            fused.append(torch.stack(same_grid).sum(0))  # (b, c, h, w)
    return fused


class MSFVAE(nn.Module):
    """The multi-scale VAE of stage 1: pyramid -> shared encoder -> fusion/quantization -> shared decoder per scale.

    fusion="msf" (default) with inter/intra switches: both on = MSF (Sect. 3.3); both off = naive multi-scale
    quantization with one shared 4096-code codebook (Sect. 3.2, kind "multiscale"); inter only = shared
    4096-code codebook with voting; intra only = per-scale GDR-like halves without voting.
    sv_shared=True: one scale-variant codebook for all scales (Tab. 5 upper right).
    fusion="concat" / "sum": Tab. 6's alternatives, quantized with one shared 4096-code codebook.
    """

    def __init__(self, code_dim=256, channels=64, num_scales=3, fusion="msf", inter=True, intra=True,
                 sv_shared=False, num_codes=4096, pyramid="halve"):
        super().__init__()
        assert num_scales >= 1 and fusion in ("msf", "concat", "sum"), (num_scales, fusion)
        if pyramid not in ("halve", "direct"):
            raise ValueError(f"pyramid {pyramid!r}: choose halve (each level from the one before) or direct")
        self.code_dim, self.num_scales, self.fusion, self.pyramid = code_dim, num_scales, fusion, pyramid
        self.inter, self.intra = inter, intra and fusion == "msf"
        self.encoder, self.decoder = vae.Encoder(code_dim, channels), vae.Decoder(code_dim, channels)
        self.weight, self.mixer = None, None
        if self.intra:
            m = round(num_codes ** 0.5)  # 64 codes each: 64 x 64 = 4096 (si, sv) combinations (A.3)
            sv = [vae.Codebook(m, code_dim) for _ in range(1 if sv_shared else num_scales)]
            self.codebooks = nn.ModuleList([vae.Codebook(m, code_dim)] + sv)  # [C^si, C^sv_1, ..., C^sv_N]
            self.weight = vae.init_projection(code_dim, 2)  # W (2c, c)
        else:
            self.codebooks = nn.ModuleList([vae.Codebook(num_codes, code_dim)])  # one shared codebook
        if fusion == "concat":
            self.mixer = nn.Conv2d(num_scales * code_dim, code_dim, 1)
        self.sv_shared = sv_shared
        self.vocab = [cb.weight.shape[0] for cb in self.codebooks[:2 if self.intra else 1]]  # e.g. [64, 64]

    def quantize(self, zs, tau=0.0, alpha=0.0, noise=0.0):
        """zs: N x (b, c, h_n, w_n) -> indices N x (b, g, h_n, w_n), xs N x (b, c, h_n, w_n), parts."""
        if self.fusion != "msf":
            fused = fuse_continuous(zs, self.fusion, self.mixer)
            return multi_scale_fusion(fused, self.codebooks[0], None, None, inter=False, tau=tau, alpha=alpha,
                                      return_parts=True, noise=noise)
        sv = None
        if self.intra:
            sv = list(self.codebooks[1:]) * (self.num_scales if self.sv_shared else 1)  # N codebooks
        return multi_scale_fusion(zs, self.codebooks[0], sv, self.projection(), inter=self.inter, tau=tau,
                                  alpha=alpha, return_parts=True, noise=noise)

    def projection(self):
        """W as Eq. 3 and 5 use it: with orthonormal columns (vae.orthonormal); None without intra-scale fusion."""
        # EXERCISE: no-projection (EXERCISES.md 4): return the fixed W = [I; I] / sqrt(2): what does a learnt W buy?
        return None if self.weight is None else vae.orthonormal(self.weight)

    def forward(self, image, tau=0.0, alpha=0.0):
        return vae.vae_forward(self, image_pyramid(image, self.num_scales, self.pyramid), tau, alpha)

    @torch.no_grad()
    def x_from_indices(self, idx, scale=1):
        """X_n rebuilt from the indices (b, g, h, w) of scale n: Eq. 2 per codebook, then Eq. 5 (concat, W)."""
        if not self.intra:
            return self.codebooks[0].select(idx[:, 0])  # (b, c, h, w)
        sv = self.codebooks[1 if self.sv_shared else scale]  # C^sv_n
        q = torch.cat([self.codebooks[0].select(idx[:, 0]), sv.select(idx[:, 1])], 1)  # (b, 2c, h, w)
        return vae.project(q, self.projection())  # (b, c, h, w)

    @torch.no_grad()
    def guidance(self, image, noise=0.0):
        """Frozen stage-2 guidance at every scale: indices N x (b, g, h_n, w_n), X N x (b, c, h_n, w_n); noise > 0:
        Gumbel-sampled codes, as the authors' stage 2 (vae.match)."""
        zs = [self.encoder(t) for t in image_pyramid(image, self.num_scales, self.pyramid)]
        idxs, xs, _ = self.quantize(zs, noise=noise)
        return idxs, xs


def build_vae(kind="msf", code_dim=256, channels=64, scales=3, fusion="msf", inter=True, intra=True,
              sv_shared=False, num_codes=4096, pyramid="halve"):
    """--vae flag -> model. The single place where the kind of VAE is decided (train_vae.py and the loaders of
    checkpoints call it with the arguments stored in the checkpoint)."""
    if kind in ("vqvae", "gdr"):
        return vae.VQVAE(kind, code_dim, channels, num_codes)
    if kind == "multiscale":
        return MSFVAE(code_dim, channels, scales, "msf", inter=False, intra=False, num_codes=num_codes, pyramid=pyramid)
    if kind == "msf":
        return MSFVAE(code_dim, channels, scales, fusion, inter, intra, sv_shared, num_codes, pyramid)
    raise ValueError(f"unknown --vae '{kind}'; choose msf, vqvae, gdr or multiscale")


def vae_name(model_args):
    """A run name of a VAE configuration: msf, msf-nointer, msf-sum, msf-N2, msf-pyrdirect, gdr, vqvae, multiscale-m1024, ...
    (only what differs from the default), so that ablations and baselines never share a run folder."""
    a = {"fusion": "msf", "inter": True, "intra": True, "sv_shared": False, "scales": 3, "num_codes": 4096,
         "pyramid": "halve", **model_args}
    name = a["kind"]
    if a["kind"] == "msf":
        name += "".join(f"-{tag}" for tag, on in ((a["fusion"], a["fusion"] != "msf"), ("nointer", not a["inter"]),
                                                   ("nointra", not a["intra"]), ("svshared", a["sv_shared"])) if on)
    if a["kind"] in ("msf", "multiscale") and a["scales"] != 3:
        name += f"-N{a['scales']}"
    if a["kind"] in ("msf", "multiscale") and a["pyramid"] != "halve":
        name += f"-pyr{a['pyramid']}"
    return name + (f"-m{a['num_codes']}" if a["num_codes"] != 4096 else "")


def load_vae(ckpt, device="cpu"):
    """Rebuild a stage-1 VAE from its checkpoint dict (checkpoints.load_checkpoint(path, "vae") reads one safely):
    build_vae with the stored model_args, then the stored weights. Returns the model in eval mode."""
    model = build_vae(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
