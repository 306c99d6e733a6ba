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
    idx, conf = vae.match(z, codebook, confidence=True)
    x = vae.select(codebook, idx)
    assert conf.shape == idx.shape == (b, h, w) and x.shape == (b, c, h, w)
    assert vae.match(z, codebook)[1] is None  # the probability only where asked for (Eq. 4)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                d2 = torch.tensor([sum((z[bi, k, i, j] - codebook[mi, k]) ** 2 for k in range(c)) for mi in range(m)])
                p = torch.exp(-d2) / torch.exp(-d2).sum()  # Eq. 1
                assert idx[bi, i, j] == int(torch.argmin(d2))
                assert conf[bi, i, j].item() == pytest.approx(p.max().item(), abs=1e-6)  # P of the chosen code
                assert torch.equal(x[bi, :, i, j], codebook[int(torch.argmin(d2))])  # Eq. 2


def test_gumbel_matching_samples_softmax_of_scaled_distances():
    # one token, three codes at squared distances 0, 1, 2; with tau = 2 the sample law is softmax(-d2 / 2)
    codebook = torch.tensor([[0.0], [1.0], [math.sqrt(2.0)]])
    z = torch.zeros(4000, 1, 1, 1)
    torch.manual_seed(0)
    idx, _ = vae.match(z, codebook, tau=2.0)
    freq = torch.bincount(idx.flatten(), minlength=3).float() / idx.numel()
    target = torch.softmax(-torch.tensor([0.0, 1.0, 2.0]) / 2.0, 0)
    assert torch.allclose(freq, target, atol=0.03), (freq, target)
    idx0, _ = vae.match(z, codebook, tau=0.0)
    assert (idx0 == 0).all()


def test_guidance_noise_samples_the_authors_standardised_distances():
    """--guidance-noise std: codes are a sample of softmax(std * (-||z - c|| - mu) / sigma), the plain distance
    standardised by the chi distribution of c degrees of freedom (scipy's chi is the oracle), and the probability
    returned for Eq. 4 is that of the Gumbel-perturbed softmax at the sample (gumbel_softmax's maximum)."""
    from scipy.stats import chi
    for dof in (1, 4, 256):
        assert vae.chi_std(dof) == pytest.approx(chi(dof).std(), rel=1e-6)
    c, std = 4, 5.0
    codebook = torch.zeros(3, c)
    codebook[1, 0], codebook[2, 0] = 0.3, 0.6  # plain distances 0, 0.3, 0.6 from z = 0
    z = torch.zeros(20000, c, 1, 1)
    torch.manual_seed(0)
    idx, conf = vae.match(z, codebook, confidence=True, noise=std)
    freq = torch.bincount(idx.flatten(), minlength=3).float() / idx.numel()
    target = torch.softmax(-std * torch.tensor([0.0, 0.3, 0.6]) / chi(c).std(), 0)
    assert torch.allclose(freq, target, atol=0.01), (freq, target)
    assert (conf > 0).all() and (conf <= 1).all() and conf.std() > 0.05  # perturbed: a different P at each draw
    idx0, _ = vae.match(z[:10], codebook, noise=0.0)
    assert (idx0 == 0).all()  # Eq. 1 without noise


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
    # with the annealed residual r = alpha z + (1 - alpha) q the commitment is measured against r: (1 - alpha)^2 x
    codebook_loss, commit = vae.vq_losses(z, q, beta=0.25, alpha=0.5)
    assert codebook_loss.item() == pytest.approx((1 + 4) / 2)  # the codes still move to the data
    assert commit.item() == pytest.approx(0.25 * (0.25 + 1) / 2)  # z - r = (0.5, -1)


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
    idx, _ = cb.match(z)
    vae.cb_select(cb, idx, z)  # selects, and records hits and recent vectors
    assert (idx == 0).all()
    replaced = cb.replace_dead()
    assert sorted(replaced.tolist()) == list(range(1, 8))
    assert torch.equal(cb.weight[0], before[0])  # the live code is untouched
    recent = z.permute(0, 2, 3, 1).reshape(-1, 4)
    for k in range(1, 8):  # each dead code now sits (up to tiny noise) on a data vector
        assert torch.cdist(cb.weight[k:k + 1].detach(), recent).min() < 0.1
    assert cb.hits.sum() == 0 and len(cb.recent) == 0 and cb.seen == 0  # counts and the sample restart


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


def test_chunked_matching_equals_one_pass():
    """Tokens are matched in chunks to bound memory; the result must not depend on the chunk size."""
    g = torch.Generator().manual_seed(3)
    z, codebook = torch.randn(3, 8, 5, 7, generator=g), torch.randn(50, 8, generator=g)
    whole = vae.match(z, codebook, confidence=True)
    small = vae.match(z, codebook, confidence=True, chunk=50 * 4)  # 4 tokens per chunk
    assert torch.equal(whole[0], small[0]) and torch.allclose(whole[1], small[1])


@pytest.mark.parametrize("kind", ["msf", "gdr"])
def test_losses_and_outputs_do_not_depend_on_the_scale_of_w(kind):
    """Eq. 3 and 5 leave W's scale free: a free W scaled by s with the codes scaled by 1/s decodes the same X but
    shrinks the VQ losses by 1/s^2, so training would grow it. With orthonormal columns (vae.orthonormal, what the
    model uses) every output and loss is the same for any positive scaling of the raw W's columns, and every
    singular value of W is 1."""
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.manual_seed(0)
    model = msf.build_vae(kind, code_dim=8, channels=16, scales=2).eval()
    before = model(image)  # (eval: no data init; the random codes are fine for this check)
    with torch.no_grad():
        model.weight.mul_(torch.linspace(0.5, 3.0, 8))  # (c,) one scale per column
    after = model(image)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(before["xs"], after["xs"]))  # the same X
    assert all(torch.allclose(before["logs"][k], after["logs"][k], rtol=1e-4, atol=1e-7) for k in before["logs"])
    assert all(torch.equal(a, b) for a, b in zip(before["indices"], after["indices"]))
    assert torch.allclose(torch.linalg.svdvals(model.projection()), torch.ones(8), atol=1e-5)


def test_retraction_keeps_the_model_and_pins_the_raw_w():
    torch.manual_seed(0)
    model = msf.build_vae("gdr", code_dim=8, channels=16).eval()
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        model.weight.add_(0.3 * torch.randn_like(model.weight))  # as if trained
    before = model(image)["xs"][0]
    vae.retract_(model.weight)
    assert torch.allclose(model(image)["xs"][0], before, atol=1e-5)
    assert torch.allclose(model.weight.t() @ model.weight, torch.eye(8), atol=1e-5)  # the raw W is orthonormal now


def test_reservoir_is_a_uniform_sample_of_every_vector_seen():
    """MSF's shared codebook sees scale 1 first (4x as many vectors as scale 2, 16x scale 3): a pool that keeps a
    random subset of (pool + newest) ends up mostly coarse-scale vectors; the reservoir keeps each vector seen
    with the same probability, so the pool's scale shares are the shares of what was seen (4096 : 1024 : 256)."""
    torch.manual_seed(0)
    cb = vae.Codebook(8, 1).train()
    cb.initialised.fill_(True)
    for step in range(20):
        for scale, n in enumerate((4096, 1024, 256)):
            z = torch.full((1, 1, n, 1), float(scale))  # each vector carries its scale as its value
            cb.observe(z, torch.zeros(1, n, 1, dtype=torch.long))
    assert len(cb.recent) == 1024 and cb.seen == 20 * (4096 + 1024 + 256)
    share = torch.bincount(cb.recent.flatten().long(), minlength=3).float() / 1024
    assert torch.allclose(share, torch.tensor([4096, 1024, 256]) / 5376.0, atol=0.04), share


def test_usage_counts_the_nearest_code_while_gumbel_samples():
    """With tau > 0 the quantizer uses a sampled code, but dead-code detection must count what Eq. 1 chooses."""
    torch.manual_seed(0)
    cb = vae.Codebook(3, 1).train()
    cb.initialised.fill_(True)
    cb.weight.data = torch.tensor([[0.0], [0.5], [1.0]])
    z = torch.zeros(1, 1, 64, 64)  # every token is nearest to code 0
    idx, _ = cb.match(z, tau=100.0)  # nearly uniform samples
    assert (idx != 0).float().mean() > 0.5
    vae.cb_select(cb, idx, z, tau=100.0)
    assert cb.hits.tolist() == [64 * 64, 0, 0]
