"""vae.py: Eq. 1-2 against brute-force loops, the Gumbel sampler against its target distribution, the
invertible projection, the straight-through estimator, grouped quantization, the code-replacing trick and
the Sect. 3.4 parameter arithmetic.

Run: python -m pytest -q tests/test_vae.py
"""
import math

import pytest
import torch

import msf
import vae


def test_match_and_select_equal_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    b, c, h, w, m = 2, 5, 3, 4, 7
    z, codebook = torch.randn(b, c, h, w, generator=g), torch.randn(m, c, generator=g)
    probs, idx = vae.match(z, codebook)
    x = vae.select(codebook, idx)
    assert probs.shape == (b, m, h, w) and idx.shape == (b, h, w) and x.shape == (b, c, h, w)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                d2 = torch.tensor([sum((z[bi, k, i, j] - codebook[mi, k]) ** 2 for k in range(c)) for mi in range(m)])
                p = torch.exp(-d2) / torch.exp(-d2).sum()  # Eq. 1
                assert torch.allclose(probs[bi, :, i, j], p, atol=1e-5)
                assert idx[bi, i, j] == int(torch.argmin(d2))
                assert torch.equal(x[bi, :, i, j], codebook[int(torch.argmin(d2))])  # Eq. 2


def test_gumbel_matching_samples_softmax_of_scaled_distances():
    # one token, three codes at squared distances 0, 1, 2; with tau = 2 the sample law is softmax(-d2 / 2)
    codebook = torch.tensor([[0.0], [1.0], [math.sqrt(2.0)]])
    z = torch.zeros(4000, 1, 1, 1)
    torch.manual_seed(0)
    _, idx = vae.match(z, codebook, tau=2.0)
    freq = torch.bincount(idx.flatten(), minlength=3).float() / idx.numel()
    target = torch.softmax(-torch.tensor([0.0, 1.0, 2.0]) / 2.0, 0)
    assert torch.allclose(freq, target, atol=0.03), (freq, target)
    _, idx0 = vae.match(z, codebook, tau=0.0)
    assert (idx0 == 0).all()


def test_projection_round_trip_is_identity():
    torch.manual_seed(0)
    W = vae.init_projection(16, 2).detach() + 0.3 * torch.randn(32, 16)  # any full-column-rank W, not just orthonormal
    z = torch.randn(3, 16, 4, 5)
    up = vae.project(z, vae.pinv(W))  # Eq. 3: (3, 32, 4, 5)
    assert up.shape == (3, 32, 4, 5)
    assert torch.allclose(vae.project(up, W), z, atol=1e-4)  # Eq. 5 after Eq. 3


def test_straight_through_forward_value_and_identity_gradient():
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    q = torch.randn(2, 3, 4, 4)
    for alpha in (0.0, 0.3, 1.0):
        x = vae.straight_through(z, q, alpha)
        assert torch.allclose(x, alpha * z + (1 - alpha) * q, atol=1e-6)
        upstream = torch.randn_like(x)
        (gz,) = torch.autograd.grad(x, z, upstream)
        assert torch.allclose(gz, upstream)  # the estimator passes the gradient through unchanged


def test_gradients_reach_the_encoder_through_the_quantizer():
    torch.manual_seed(0)
    for kind in ("vqvae", "gdr", "msf"):
        model = msf.build_vae(kind, code_dim=8, channels=16, scales=2)
        out = model(torch.rand(2, 3, 32, 32) * 2 - 1)
        recon_only = sum(torch.nn.functional.mse_loss(r, t) for r, t in
                         zip(out["recons"], msf.image_pyramid(torch.zeros(2, 3, 32, 32), len(out["recons"]))))
        model.zero_grad()
        recon_only.backward()  # reconstruction alone: only the straight-through path connects it to the encoder
        grads = [p.grad for p in model.encoder.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), kind


def test_vq_losses_hand_computed():
    z = torch.tensor([[[[1.0]], [[2.0]]]])  # (1, 2, 1, 1)
    q = torch.tensor([[[[0.0]], [[4.0]]]])
    codebook_loss, commit = vae.vq_losses(z, q, beta=0.25)
    assert codebook_loss.item() == pytest.approx((1 + 4) / 2)
    assert commit.item() == pytest.approx(0.25 * (1 + 4) / 2)


def test_quantize_grouped_equals_nearest_codes_per_group():
    torch.manual_seed(1)
    c, m = 6, 5
    z = torch.randn(2, c, 3, 3)
    cbs = [torch.randn(m, c), torch.randn(m, c)]
    W = torch.randn(2 * c, c)
    idx, x, _ = vae.quantize_grouped(z, cbs, W)
    up = torch.einsum("bchw,cd->bdhw", z, torch.linalg.pinv(W))  # an independent project-up
    expect_idx, expect_q = [], []
    for k in range(2):
        part = up[:, k * c:(k + 1) * c]  # (b, c, h, w)
        d2 = ((part[:, None] - cbs[k][None, :, :, None, None]) ** 2).sum(2)  # (b, m, h, w)
        expect_idx.append(d2.argmin(1))
        expect_q.append(cbs[k][d2.argmin(1)].permute(0, 3, 1, 2))
    assert torch.equal(idx, torch.stack(expect_idx, 1))
    expect_x = torch.einsum("bdhw,dc->bchw", torch.cat(expect_q, 1), W)  # Eq. 5
    assert torch.allclose(x, expect_x, atol=1e-5)


def test_code_replacing_moves_only_dead_codes_onto_data():
    torch.manual_seed(0)
    cb = vae.Codebook(8, 4).train()
    z = torch.randn(2, 4, 8, 8) + 10  # data far from every code
    cb.initialised.fill_(True)  # skip the data initialisation: start from the random codes
    cb.weight.data[0] = z[0, :, 0, 0]  # code 0 sits on the data, the other 7 are far away
    before = cb.weight.detach().clone()
    _, idx = cb.match(z)
    vae.cb_select(cb, idx, z)  # selects, and records hits and recent vectors
    assert (idx == 0).all()
    replaced = cb.replace_dead()
    assert replaced == 7
    assert torch.equal(cb.weight[0], before[0])  # the live code is untouched
    recent = z.permute(0, 2, 3, 1).reshape(-1, 4)
    for k in range(1, 8):  # each dead code now sits (up to tiny noise) on a data vector
        assert torch.cdist(cb.weight[k:k + 1].detach(), recent).min() < 0.1
    assert cb.hits.sum() == 0  # counts restart


def test_codebook_initialises_on_data():
    torch.manual_seed(0)
    cb = vae.Codebook(6, 3).train()
    z = torch.randn(1, 3, 4, 4) * 0.01 + 5
    cb.match(z)
    assert bool(cb.initialised) and (cb.weight - 5).abs().max() < 0.2


def test_codebook_parameter_arithmetic_sect_3_4():
    msf_vae = msf.build_vae("msf", code_dim=256, scales=3)
    base = msf.build_vae("vqvae", code_dim=256)
    assert vae.count_codebook_params(base) == 4096 * 256 == 1_048_576
    # projection c x 2c = 2^17 plus 4 codebooks of 64 x 256 = 2^16
    assert vae.count_codebook_params(msf_vae) == 2 ** 17 + 2 ** 16 == 196_608
    assert 1 - 196_608 / 1_048_576 == pytest.approx(0.8125)  # "81.25% fewer"
    assert msf_vae.vocab == [64, 64] and 64 * 64 == 4096
    assert vae.count_codebook_params(msf.build_vae("gdr", code_dim=256)) == 2 * 64 * 256 + 512 * 256
