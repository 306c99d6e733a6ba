"""msf.py: the image pyramid, the resampling of Sect. 3.3 step 1, multi_scale_fusion against a literal
per-super-pixel implementation of Sect. 3.3 / Eq. 3-5 and against hand-built cases with a known winning
scale, the N = 1 reduction to a 2-group quantizer, and the ablation variants.

Run: python -m pytest -q tests/test_msf.py
"""
import torch

import msf
import vae


def test_pyramid_levels_are_block_means():
    img = torch.randn(2, 3, 16, 16)
    levels = msf.image_pyramid(img, 3)
    assert [tuple(t.shape[-2:]) for t in levels] == [(16, 16), (8, 8), (4, 4)]
    for n in (1, 2):
        k = 2 ** n  # level n (0-based) averages k x k pixels of the input
        blocks = img.reshape(2, 3, 16 // k, k, 16 // k, k).mean((3, 5))
        assert torch.allclose(levels[n], blocks, atol=1e-5)


def test_direct_pyramid_resizes_the_image_itself_as_the_authors():
    """--pyramid direct: level n is the image resized by 2^-n, bilinear without antialiasing; at 1/4 each output
    pixel samples input position 4i + 1.5, the mean of the 2 x 2 centre of its 4 x 4 block (the box pyramid
    averages all 16)."""
    img = torch.randn(2, 3, 16, 16)
    direct = msf.image_pyramid(img, 3, "direct")
    assert torch.allclose(direct[1], msf.image_pyramid(img, 3)[1], atol=1e-6)  # at 1/2 both average 2 x 2
    centre = img.reshape(2, 3, 4, 4, 4, 4)[:, :, :, 1:3, :, 1:3].mean((3, 5))  # (2, 3, 4, 4)
    assert torch.allclose(direct[2], centre, atol=1e-5)
    assert not torch.allclose(direct[2], msf.image_pyramid(img, 3)[2], atol=1e-2)
    model = msf.build_vae("msf", code_dim=8, channels=16, pyramid="direct")
    assert model.pyramid == "direct" and msf.vae_name({"kind": "msf", "pyramid": "direct"}) == "msf-pyrdirect"


def test_resample_mean_and_nearest():
    fine = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.allclose(msf.resample(fine, 0, 1), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert torch.allclose(msf.resample(fine, 0, 2), fine.mean().reshape(1, 1, 1, 1))
    coarse = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    up = msf.resample(coarse, 1, 0)
    assert up.shape == (1, 1, 4, 4) and up[0, 0, 1, 1] == 1 and up[0, 0, 0, 3] == 2 and up[0, 0, 3, 0] == 3
    assert torch.equal(msf.resample(coarse, 1, 1), coarse)


def literal_fusion(zs, cb_si, cbs_sv, W):
    """Sect. 3.3 read literally, one super-pixel at a time (independent of msf.py's batched code)."""
    N, c = len(zs), zs[0].shape[1]
    P = torch.linalg.pinv(W)
    ups = [torch.einsum("bchw,cd->bdhw", z, P) for z in zs]  # Eq. 3
    zsi, zsv = [u[:, :c] for u in ups], [u[:, c:] for u in ups]

    def probs(v, cb):  # Eq. 1 for one vector
        return torch.softmax(-((v[None] - cb) ** 2).sum(1), 0)

    indices, xs = [], []
    for n in range(N):
        b, _, h, w = zsi[n].shape
        idx = torch.zeros(b, 2, h, w, dtype=torch.long)
        x = torch.zeros(b, c, h, w)
        for bi in range(b):
            for i in range(h):
                for j in range(w):
                    best_p, best_code = -1.0, None
                    for m in range(N):  # the same region in every scale m
                        if m < n:  # finer: mean of the 2^(n-m) x 2^(n-m) block
                            k = 2 ** (n - m)
                            v = zsi[m][bi, :, i * k:(i + 1) * k, j * k:(j + 1) * k].mean((1, 2))
                        elif m > n:  # coarser: the covering super-pixel
                            k = 2 ** (m - n)
                            v = zsi[m][bi, :, i // k, j // k]
                        else:
                            v = zsi[n][bi, :, i, j]
                        p = probs(v, cb_si)
                        if p.max() > best_p:  # Eq. 4: argmax_m(max_n P); ties keep the finer scale
                            best_p, best_code = p.max().item(), int(p.argmax())
                    sv_code = int(probs(zsv[n][bi, :, i, j], cbs_sv[n]).argmax())
                    idx[bi, :, i, j] = torch.tensor([best_code, sv_code])
                    x[bi, :, i, j] = torch.cat([cb_si[best_code], cbs_sv[n][sv_code]]) @ W  # Eq. 5
        indices.append(idx)
        xs.append(x)
    return indices, xs


def test_fusion_equals_literal_reading_of_sect_3_3():
    torch.manual_seed(0)
    c, m, N = 3, 6, 3
    zs = [torch.randn(2, c, 8 // 2 ** n, 8 // 2 ** n) * 1.5 for n in range(N)]
    cb_si = torch.randn(m, c)
    cbs_sv = [torch.randn(m, c) for _ in range(N)]
    W = torch.randn(2 * c, c)
    indices, xs = msf.multi_scale_fusion(zs, cb_si, cbs_sv, W)
    ref_indices, ref_xs = literal_fusion(zs, cb_si, cbs_sv, W)
    for n in range(N):
        assert indices[n].shape == (2, 2, 8 // 2 ** n, 8 // 2 ** n) and xs[n].shape == (2, c, 8 // 2 ** n, 8 // 2 ** n)
        assert torch.equal(indices[n], ref_indices[n]), n
        assert torch.allclose(xs[n], ref_xs[n], atol=1e-4), n


def test_known_winning_scale():
    """Hand-built case. With W = [I; I] / sqrt(2), Z pinv(W) = [Z, Z] / sqrt(2): both halves are Z / sqrt(2).
    Codes e0 = (1, 0), e1 = (0, 1), in both the shared and the scale-variant codebooks. Scale-invariant halves:
      scale 1 (4x4): (0.5, 0.5) everywhere, equidistant -> confidence 0.5
      scale 2 (2x2): e1 exactly                         -> confidence 1 / (1 + e^-2)   = 0.881
      scale 3 (1x1): (0.7, 0), nearest e0               -> confidence 1 / (1 + e^-1.4) = 0.802
    Eq. 4 then says: scale 1 takes e1 from scale 2; scale 2 keeps its own e1; scale 3 takes e1 from scale 2 (the
    mean of scale 2's block is e1). The scale-variant halves are never fused: scale 3 keeps e0 there."""
    c = 2
    W = torch.cat([torch.eye(c), torch.eye(c)]) / 2 ** 0.5  # (2c, c), orthonormal columns
    s = 2 ** 0.5
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    cb_si = torch.stack([e0, e1])
    cbs_sv = [cb_si.clone() for _ in range(3)]
    z1 = torch.tensor([0.5, 0.5]).mul(s).view(1, c, 1, 1).expand(1, c, 4, 4).clone()
    z2 = (e1 * s).view(1, c, 1, 1).expand(1, c, 2, 2).clone()
    z3 = torch.tensor([0.7, 0.0]).mul(s).view(1, c, 1, 1).clone()
    indices, xs, parts = msf.multi_scale_fusion([z1, z2, z3], cb_si, cbs_sv, W, return_parts=True)
    # how many super-pixels each scale won (validate_vae's wins<n>_<j>): scale 2 wins all 16 + 4 + 1 of them
    assert [p["wins"].tolist() for p in parts] == [[0, 16, 0], [0, 4, 0], [0, 1, 0]]
    assert (indices[0][:, 0] == 1).all()  # scale 1 borrows e1 from scale 2
    assert (indices[0][:, 1] == 0).all()  # its scale-variant half is a tie -> first code
    assert (indices[1] == torch.tensor([1, 1]).view(1, 2, 1, 1)).all()  # scale 2 keeps its own e1 (both halves)
    assert (indices[2] == torch.tensor([1, 0]).view(1, 2, 1, 1)).all()  # scale 3: borrowed si e1, own sv e0
    # without inter-scale fusion every scale keeps its own vote
    own, _, own_parts = msf.multi_scale_fusion([z1, z2, z3], cb_si, cbs_sv, W, inter=False, return_parts=True)
    assert (own[0][:, 0] == 0).all() and (own[1][:, 0] == 1).all() and (own[2][:, 0] == 0).all()
    assert [p["wins"].tolist() for p in own_parts] == [[16, 0, 0], [0, 4, 0], [0, 0, 1]]
    # Eq. 5: X_1 = concat(e1, e0) W and X_3 = concat(e1, e0) W
    assert torch.allclose(xs[0][0, :, 0, 0], torch.cat([e1, e0]) @ W, atol=1e-6)
    assert torch.allclose(xs[2][0, :, 0, 0], torch.cat([e1, e0]) @ W, atol=1e-6)


def test_one_scale_reduces_to_two_group_quantizer():
    torch.manual_seed(2)
    c = 4
    z = torch.randn(3, c, 5, 5)
    cb_si, cb_sv, W = torch.randn(7, c), torch.randn(7, c), torch.randn(2 * c, c)
    indices, xs = msf.multi_scale_fusion([z], cb_si, [cb_sv], W)
    idx2, x2, _ = vae.quantize_grouped(z, [cb_si, cb_sv], W)
    assert torch.equal(indices[0], idx2) and torch.allclose(xs[0], x2, atol=1e-6)


def test_gradients_reach_every_scale_and_W():
    torch.manual_seed(3)
    zs = [torch.randn(2, 4, 8 // 2 ** n, 8 // 2 ** n, requires_grad=True) for n in range(3)]
    W = torch.randn(8, 4, requires_grad=True)
    _, xs = msf.multi_scale_fusion(zs, torch.randn(5, 4), [torch.randn(5, 4) for _ in range(3)], W, alpha=0.0)
    sum((x ** 2).sum() for x in xs).backward()
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in zs)
    assert W.grad is not None and W.grad.abs().sum() > 0


def test_ablation_variants_build_and_differ():
    torch.manual_seed(0)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    shapes = {}
    for name, kw in {"msf": {}, "no_inter": dict(inter=False), "no_intra": dict(intra=False),
                     "sv_shared": dict(sv_shared=True), "concat": dict(fusion="concat"), "sum": dict(fusion="sum"),
                     "N4": dict(scales=4)}.items():
        args = dict(kind="msf", code_dim=8, channels=16, scales=2)
        args.update(kw)
        model = msf.build_vae(**args)
        out = model(img)
        shapes[name] = [tuple(i.shape) for i in out["indices"]]
        assert torch.isfinite(out["loss"])
    assert shapes["msf"] == [(2, 2, 8, 8), (2, 2, 4, 4)]
    assert shapes["no_intra"] == shapes["concat"] == shapes["sum"] == [(2, 1, 8, 8), (2, 1, 4, 4)]
    assert len(shapes["N4"]) == 4 and shapes["N4"][-1] == (2, 2, 1, 1)
    assert len(msf.build_vae("msf", 8, 16, 3, sv_shared=True).codebooks) == 2  # C^si + one shared C^sv
    assert len(msf.build_vae("msf", 8, 16, 3).codebooks) == 4  # C^si + 3 C^sv
    assert msf.build_vae("multiscale", 8, 16, 3).vocab == [4096]


def test_sum_fusion_is_elementwise_sum_of_resampled_scales():
    zs = [torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)]
    fused = msf.fuse_continuous(zs, "sum")
    assert torch.allclose(fused[0], zs[0] + zs[1].repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert torch.allclose(fused[1], zs[1] + zs[0].reshape(1, 2, 2, 2, 2, 2).mean((3, 5)))


def test_validate_vae_reports_the_share_of_super_pixels_each_scale_wins():
    """wins<n>_<j>: of scale n's super-pixels, the share whose code scale j won in Eq. 4. Each row sums to 1; without
    inter-scale fusion every scale wins its own; a single-scale VQ-VAE has no such row."""
    import evaluate
    images = [{"image": torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1} for i in range(6)]
    for inter in (True, False):
        torch.manual_seed(0)
        m = evaluate.validate_vae(msf.build_vae("msf", 8, 16, 3, inter=inter).eval(), images, "cpu", 4)
        shares = torch.tensor([[m[f"wins{n}_{j}"] for j in (1, 2, 3)] for n in (1, 2, 3)])
        assert torch.allclose(shares.sum(1), torch.ones(3))
        assert inter or torch.equal(shares, torch.eye(3))
    assert not any(k.startswith("wins") for k in evaluate.validate_vae(msf.build_vae("vqvae", 8, 16).eval(), images,
                                                                        "cpu", 4))
