"""Stage 2: Slot Attention's invariants, the query init's gradients, the transformer decoder's causality, the noise
schedule against its closed form, the MLP decoder's masks, and short real runs of every decoder that evaluate.py
scores (with the frozen VAE proven unchanged and the guidance cache proven exact).

Run: python -m pytest -q tests/test_ocl.py
"""
import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import data
import decoders
import evaluate
import msf
import ocl
import train_common
import train_ocl
import train_vae
from encoders import CNNEncoder
from slot_attention import BlockCoupling, GaussianQueries, SlotAttention, SysBinder

from conftest import TINY_OCL, refused


def ocl_args(tiny_root, tiny_vaes, out, decoder="transformer", *extra):
    vae = tiny_vaes[4 if decoder == "diffusion" else 256]
    return train_ocl.parse_args(["--data-root", str(tiny_root), "--decoder", decoder, "--vae-ckpt", str(vae),
                                 "--out", str(out), *TINY_OCL, *extra])


# ----------------------------------------------------------------------------- slot attention

def test_slot_attention_is_equivariant_to_query_permutation():
    torch.manual_seed(0)
    sa = SlotAttention(16, 8, iters=3).eval()
    queries, inputs = torch.randn(2, 5, 16), torch.randn(2, 30, 8)
    perm = torch.tensor([3, 0, 4, 1, 2])
    slots, attn = sa(queries, inputs)
    slots_p, attn_p = sa(queries[:, perm], inputs)
    assert torch.allclose(slots_p, slots[:, perm], atol=1e-5)
    assert torch.allclose(attn_p, attn[:, perm], atol=1e-6)
    assert torch.allclose(attn.sum(1), torch.ones(2, 30), atol=1e-5)  # masks sum to 1 over slots


def test_query_means_receive_gradients():
    torch.manual_seed(0)
    q = GaussianQueries(4, 16)
    for sigma, bilevel in ((1.0, False), (0.0, False), (1.0, True)):
        sa = SlotAttention(16, 16, bilevel=bilevel)
        q.zero_grad()
        slots, _ = sa(q(3, sigma), torch.randn(3, 10, 16))
        slots.pow(2).sum().backward()
        assert q.mu.grad is not None and q.mu.grad.abs().sum() > 0, sigma
    assert torch.equal(q(2, 0.0), q.mu.expand(2, -1, -1))  # sigma = 0 (evaluation) is deterministic
    torch.manual_seed(1)
    noisy = q(20000, 1.0) - q.mu
    assert abs(noisy.std().item() - 1.0) < 0.01  # sigma scales a unit Gaussian


def test_cnn_encoder_grid_and_position_sensitivity():
    enc = CNNEncoder(24, channels=8)
    f, grid = enc(torch.zeros(2, 3, 64, 64))
    assert f.shape == (2, 256, 24) and grid == (16, 16)
    assert not torch.allclose(f[0, 0], f[0, 100])  # a constant image still tells positions apart
    f, grid = CNNEncoder(24, channels=8, stride=2)(torch.zeros(2, 3, 64, 64))
    assert f.shape == (2, 1024, 24) and grid == (32, 32)  # stride 2: masks at H/2
    assert CNNEncoder(24, channels=8, stride=1)(torch.zeros(1, 3, 20, 20))[1] == (20, 20)  # full resolution
    with pytest.raises(ValueError, match="choose 4"):
        CNNEncoder(24, stride=3)


# ----------------------------------------------------------------------------- decoders

def test_transformer_decoder_is_causal():
    torch.manual_seed(0)
    dec = decoders.TransformerDecoder(code_dim=6, vocab=[5, 7], grids=[(4, 4)], slot_dim=8, dim=16, layers=2, heads=2).eval()
    x, slots = torch.randn(2, 6, 4, 4), torch.randn(2, 3, 8)
    logits = [torch.cat([lg.transpose(1, 2) for lg in dec([x], slots)[0]], 1)]  # (b, 12, 16) tokens in raster order
    for j in (0, 5, 15):
        x2 = x.clone()
        x2.view(2, 6, 16)[:, :, j] += 3.0  # change token j
        after = torch.cat([lg.transpose(1, 2) for lg in dec([x2], slots)[0]], 1)
        assert torch.allclose(after[..., :j + 1], logits[0][..., :j + 1], atol=1e-5)  # tokens <= j see no change
        if j < 15:
            assert not torch.allclose(after[..., j + 1:], logits[0][..., j + 1:])
    shapes = [tuple(lg.shape) for lg in dec([x], slots)[0]]
    assert shapes == [(2, 16, 5), (2, 16, 7)]


def test_transformer_loss_sums_groups():
    logits = [[torch.zeros(1, 4, 4), torch.zeros(1, 4, 8)]]  # uniform predictions, (b, h*w, m) per group
    idx = [torch.zeros(1, 2, 2, 2, dtype=torch.long)]
    assert decoders.TransformerDecoder.loss(logits, idx).item() == pytest.approx(torch.log(torch.tensor(4.0 * 8.0)).item())


def test_transformer_loss_pairs_each_token_with_its_own_index():
    """Token t of the raster order is scored against the index at (t // w, t % w), by the formula
    -log(exp(l_t[i]) / sum_j exp(l_t[j])) written out per token, averaged over tokens and images."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 5, generator=g)  # (b, h*w, m), a 2 x 3 grid
    idx = torch.randint(0, 5, (2, 1, 2, 3), generator=g)  # (b, g=1, h, w)
    terms = [math.log(sum(math.exp(v) for v in logits[b, t].tolist())) - logits[b, t, idx[b, 0, t // 3, t % 3]].item()
             for b in range(2) for t in range(6)]
    assert decoders.TransformerDecoder.loss([[logits]], [idx]).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_noise_schedule_matches_closed_form():
    betas, alpha_bar = decoders.noise_schedule(1000, 0.0015, 0.0195)
    assert betas[0].item() == pytest.approx(0.0015) and betas[-1].item() == pytest.approx(0.0195)
    assert torch.allclose(betas[499], torch.tensor((0.0015 ** 0.5 + (0.0195 ** 0.5 - 0.0015 ** 0.5) * 499 / 999) ** 2))
    expected = torch.tensor(1.0)
    for t in range(300):
        expected = expected * (1 - betas[t].double())
    assert alpha_bar[299].item() == pytest.approx(expected.item(), rel=1e-5)
    torch.manual_seed(0)
    x0 = torch.full((200000, 1, 1, 1), 0.7)
    for t in (0, 500, 999):
        xt = decoders.q_sample(x0, torch.full((200000,), t), torch.randn_like(x0), alpha_bar)
        assert xt.mean().item() == pytest.approx(0.7 * alpha_bar[t].sqrt().item(), abs=0.01)  # mean sqrt(ab) x0
        assert xt.var().item() == pytest.approx(1 - alpha_bar[t].item(), abs=0.01)  # variance 1 - ab


def test_diffusion_loss_finite_at_both_ends_and_sampler_shape():
    torch.manual_seed(0)
    dec = decoders.DiffusionDecoder(4, 8, base=16, layers=1, heads=1).train()
    x0, slots = torch.randn(2, 4, 16, 16), torch.randn(2, 3, 8)
    for t in (0, 999):
        loss = dec.loss(x0, slots, t=torch.full((2,), t))
        assert torch.isfinite(loss)
    assert dec.scale.item() == pytest.approx(1 / x0.std().item(), rel=1e-4)
    dec.eval()
    a = dec.sample(slots, (2, 4, 16, 16), steps=3, generator=torch.Generator().manual_seed(1))
    b = dec.sample(slots, (2, 4, 16, 16), steps=3, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 4, 16, 16) and torch.equal(a, b)


def test_mask_gate_reads_each_position_from_the_slots_that_claim_it():
    """--mask-gate adds log m_k(p) to position p's cross-attention logits: uniform masks change nothing (softmax is
    blind to a constant per row); with one-hot masks a position's output depends on its own slot only."""
    torch.manual_seed(0)
    block = decoders.SpatialTransformer(16, 8, heads=2).eval()
    torch.nn.init.normal_(block.proj_out.weight)  # as after training: at initialisation the block adds nothing
    x, slots = torch.randn(1, 16, 4, 4), torch.randn(1, 3, 8)
    with torch.no_grad():
        free = block(x, slots)
        assert torch.allclose(block(x, slots, torch.full((1, 3, 4, 4), 1 / 3)), free, atol=1e-5)
        masks = torch.zeros(1, 3, 4, 4)
        masks[:, 0, :, :2], masks[:, 1, :, 2:] = 1, 1  # slot 0 claims the left half, slot 1 the right, slot 2 nothing
        gated = block(x, slots, masks)
        other = slots.clone()
        other[:, 1] += 3.0  # another slot 1
        moved = block(x, other, masks)
        assert torch.allclose(moved[..., :2], gated[..., :2], atol=1e-4)  # the left half reads slot 0 only
        assert not torch.allclose(moved[..., 2:], gated[..., 2:], atol=1e-2)  # the right half reads slot 1
        other = slots.clone()
        other[:, 2] += 3.0  # the slot that claims nothing
        assert torch.allclose(block(x, other, masks), gated, atol=1e-4)
        assert not torch.allclose(block(x, other), free, atol=1e-2)  # ungated, every position reads it


class _Fixed(torch.nn.Module):
    """A UNet stand-in that answers one tensor whatever it is asked."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def forward(self, x, t, slots, masks=None):
        return self.answer


class _Perfect(torch.nn.Module):
    """A UNet stand-in that knows the clean target x0 and answers as the decoder's parametrisation asks."""

    def __init__(self, x0, alpha_bar, prediction):
        super().__init__()
        self.x0, self.alpha_bar, self.prediction = x0, alpha_bar, prediction

    def forward(self, x, t, slots, masks=None):
        if self.prediction == "x0":
            return self.x0.expand_as(x)
        a = self.alpha_bar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.x0) / (1 - a).sqrt()  # the noise in x_t = sqrt(a) x0 + sqrt(1 - a) eps


def test_unet_blocks_start_as_the_identity_and_the_unet_predicts_zeros():
    """Latent diffusion's initialisation (SlotDiffusion's UNet): at initialisation every SpatialTransformer returns its
    input, every ResBlock its skip path (the input itself where the channels stay), and the UNet returns zeros;
    after one optimiser step none of it holds any more (the zeros are a starting point, not frozen)."""
    torch.manual_seed(0)
    unet = decoders.UNet(4, 8, base=32, layers=1, heads=2)
    seen = {"res": 0, "attn": 0}

    def check(kind):
        def hook(module, inputs, out):
            x = inputs[0]
            expected = x if kind == "attn" else module.skip(x)
            assert torch.equal(out, expected), f"{kind} block of {tuple(x.shape)} changed its input at initialisation"
            seen[kind] += 1
        return hook
    hooks = [m.register_forward_hook(check("res" if isinstance(m, decoders.ResBlock) else "attn"))
             for m in unet.modules() if isinstance(m, (decoders.ResBlock, decoders.SpatialTransformer))]
    x, t, slots = torch.randn(2, 4, 16, 16), torch.tensor([3, 900]), torch.randn(2, 5, 8)
    out = unet(x, t, slots)
    assert torch.equal(out, torch.zeros_like(x))
    # 4 levels x 1 layer down, 2 in the middle, 4 x 2 up; attention after the ResBlocks of levels 1-3 and the middle
    assert seen == {"res": 4 + 2 + 8, "attn": 3 + 1 + 6}
    for h in hooks:
        h.remove()
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    F = torch.nn.functional
    for _ in range(2):  # step 1 moves the zero convs; step 2 passes gradients through them into everything else
        opt.zero_grad()
        F.mse_loss(unet(x, t, slots), torch.randn_like(x)).backward()
        opt.step()
    assert unet(x, t, slots).abs().max() > 0


def test_unet_attention_block_is_latent_diffusions():
    """SpatialTransformer as SlotDiffusion's (latent diffusion's): GroupNorm, 1x1 proj_in, one transformer block whose
    q, k, v have no bias and whose feed-forward is GEGLU (value * GELU(gate), 4x the width), 1x1 proj_out. Checked
    against the block written out by hand from those equations."""
    torch.manual_seed(0)
    block = decoders.SpatialTransformer(32, 8, heads=2)
    for p in block.parameters():  # random weights everywhere, the zero-initialised proj_out included
        torch.nn.init.normal_(p, std=0.2)
    assert block.block.self_attn.q.bias is None and block.block.cross_attn.kv.bias is None
    assert block.block.mlp[0].proj.out_features == 2 * 4 * 32 and block.block.mlp[-1].in_features == 4 * 32
    x, slots = torch.randn(2, 32, 4, 4), torch.randn(2, 3, 8)
    F = torch.nn.functional

    def attend(att, q_in, ctx):  # plain multi-head softmax attention, 2 heads of 16
        q = q_in @ att.q.weight.T
        k, v = (ctx @ att.kv.weight.T).chunk(2, dim=-1)
        split = lambda z: z.unflatten(-1, (2, 16)).transpose(1, 2)  # noqa: E731  (b, heads, n, 16)
        w = (split(q) @ split(k).transpose(-1, -2) / 4.0).softmax(-1)
        return att.out((w @ split(v)).transpose(1, 2).flatten(2))
    b = block.block
    t = block.proj_in(block.norm(x)).flatten(2).transpose(1, 2)  # (2, 16, 32)
    t = t + attend(b.self_attn, b.norm1(t), b.norm1(t))
    t = t + attend(b.cross_attn, b.norm2(t), slots)
    value, gate = b.mlp[0].proj(b.norm3(t)).chunk(2, dim=-1)
    t = t + b.mlp[2](value * F.gelu(gate))
    expected = x + block.proj_out(t.transpose(1, 2).reshape(2, 32, 4, 4))
    with torch.no_grad():
        assert torch.allclose(block.eval()(x, slots), expected, atol=1e-5)


def test_paper_size_unet_has_the_authors_parameter_count():
    """At the paper's size our UNet has exactly the parameters of the authors' diffusers UNet2DConditionModel (in/out
    4, block widths 128-256-384-512, 2 layers per block, cross-attention at 256): 135,048,452, counted by building
    theirs with diffusers 0.35.1 (benchmarks/unet_params.py counts both where diffusers is installed)."""
    unet = decoders.UNet(4, 256, base=128, layers=2, heads=8)
    assert sum(p.numel() for p in unet.parameters()) == 135_048_452


def test_x0_prediction_loss_and_ddim_with_a_perfect_denoiser():
    """--diffusion-prediction x0: the loss is the MSE to the (scaled) target itself; DDIM with a perfect denoiser
    ends on the target in either parametrisation (the last step has alpha_bar_prev = 1)."""
    torch.manual_seed(0)
    x0, slots = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8)
    dec = decoders.DiffusionDecoder(4, 8, base=16, layers=1, heads=1, latent_scale="1", prediction="x0").train()
    guess = torch.randn(2, 4, 8, 8)
    dec.unet = _Fixed(guess)
    assert dec.loss(x0, slots).item() == pytest.approx(((guess - x0) ** 2).mean().item(), rel=1e-6)
    for prediction in ("eps", "x0"):
        dec = decoders.DiffusionDecoder(4, 8, base=16, layers=1, heads=1, latent_scale="1", prediction=prediction)
        dec.unet = _Perfect(x0, dec.alpha_bar, prediction)
        out = dec.eval().sample(slots, x0.shape, steps=5, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(out, x0, atol=1e-4)
    with pytest.raises(ValueError, match="eps .* or x0"):
        decoders.DiffusionDecoder(4, 8, base=16, layers=1, heads=1, prediction="v")
    gated = decoders.DiffusionDecoder(4, 8, base=16, layers=1, heads=1, gate=True)
    with pytest.raises(ValueError, match="masks"):
        gated.loss(x0, slots)


def test_mask_gate_and_x0_flags_train_resume_and_name_their_run(tiny_root, tiny_vaes, tmp_path, capsys):
    """The flags reach the decoder and the checkpoint, the decoder gets Slot Attention's masks of the same step, the
    run folder says -x0-gate; a run of the other decoder does not resume as this one."""
    flags = ["--diffusion-prediction", "x0", "--mask-gate"]
    args = train_ocl.parse_args(["--decoder", "diffusion", "--vae-ckpt", str(tiny_vaes[4]), *flags])
    vae_args = checkpoints.load_checkpoint(tiny_vaes[4])["model_args"]
    assert train_ocl.run_folder(args, vae_args) == "runs/ocl_shapes_diffusion-x0-gate_msf"
    for wrong, says in ((["--mask-gate"], "set the diffusion decoder; --decoder transformer has none"),
                        (["--no-mask-gate"], "set the diffusion decoder"), (["--diffusion-prediction", "x0"],
                                                                            "set the diffusion decoder"),
                        (["--decoder", "diffusion", "--mask-gate", "--slot-attention", "sysbinder"],
                         "SysBinder's decoder reads 2 coupled tokens per slot")):
        with refused(capsys, says):
            train_ocl.parse_args(wrong)
    # the recipe: shapes' SlotDiffusion is x0 + the gate with no flag; SysBinder and the paper's datasets keep the
    # authors' decoder; the authors' decoder on shapes is named as the plain run folder
    for given, dataset, want in (([], "shapes", ("x0", True)), (["--slot-attention", "sysbinder"], "shapes", ("eps", False)),
                                 ([], "coco", ("eps", False)), ([], "shapes_video", ("eps", False)),
                                 (["--no-mask-gate"], "shapes", ("x0", False)),
                                 (["--diffusion-prediction", "eps"], "shapes", ("eps", True))):
        a = train_ocl.parse_args(["--decoder", "diffusion", "--dataset", dataset, *given])
        assert (a.diffusion_prediction, a.mask_gate) == want, (given, dataset)
    a = train_ocl.parse_args(["--decoder", "diffusion", "--diffusion-prediction", "eps", "--no-mask-gate"])
    assert train_ocl.run_folder(a, vae_args) == "runs/ocl_shapes_diffusion_msf"
    assert train_ocl.run_folder(train_ocl.parse_args(["--decoder", "diffusion"]), vae_args) == \
        "runs/ocl_shapes_diffusion-x0-gate_msf"
    out = train_ocl.train(ocl_args(tiny_root, tiny_vaes, tmp_path / "gate", "diffusion", "--steps", "1", *flags))
    model, ckpt = ocl.load_ocl(checkpoints.load_checkpoint(out / "last.pt", "ocl"))
    assert (model.decoder.prediction, model.decoder.gate) == ("x0", True)
    image = data.load_dataset("shapes", "val", tiny_root)[0]["image"][None]  # (1, 3, 64, 64)
    seen = []
    model.decoder.loss = lambda x0, slots, t=None, masks=None: seen.append(masks) or torch.zeros(())
    torch.manual_seed(0)
    out_masks = model(image)["masks"]
    assert seen[0] is out_masks and out_masks.shape[0] == 1 and out_masks.dim() == 4  # (1, s, h, w), this step's
    # a run of the authors' decoder does not resume as the recipe's: the difference is named
    authors = ["--diffusion-prediction", "eps", "--no-mask-gate"]
    plain = train_ocl.train(ocl_args(tiny_root, tiny_vaes, tmp_path / "plain", "diffusion", "--steps", "1", *authors))
    with pytest.raises(train_common.RunError, match="diffusion_prediction: 'eps' in the checkpoint, 'x0' now"):
        train_ocl.train(ocl_args(tiny_root, tiny_vaes, plain, "diffusion", "--steps", "1", "--resume"))


def test_the_authors_switches_augment_and_guidance_noise(tiny_root, tiny_vaes, tmp_path, capsys):
    """--augment and --guidance-noise reach training (the guidance cache off, said in one line), name the run folder
    and the checkpoint; sampled guidance differs between training steps and not at evaluation; combinations that
    mean nothing are refused with the flag named."""
    for wrong, says in ((["--augment", "--cache-features", "--encoder", "dino"], "--augment"),
                        (["--decoder", "mlp", "--guidance-noise", "5"], "--guidance-noise"),
                        (["--decoder", "diffusion", "--diffusion-target", "z", "--guidance-noise", "5"], "--guidance-noise"),
                        (["--dino-target", "prenorm"], "--dino-target")):
        with refused(capsys, says):
            train_ocl.parse_args(wrong)
    args = ocl_args(tiny_root, tiny_vaes, tmp_path / "run", "transformer", "--steps", "2", "--augment",
                    "--guidance-noise", "5")
    vae_args = checkpoints.load_checkpoint(tiny_vaes[256])["model_args"]
    assert train_ocl.run_folder(args, vae_args).endswith("transformer-gnoise5-aug_msf")
    out = train_ocl.train(args)
    assert "the guidance cache is off" in capsys.readouterr().out
    model, ckpt = ocl.load_ocl(checkpoints.load_checkpoint(out / "last.pt", "ocl"))
    assert model.guidance_noise == 5 and ckpt["args"]["augment"]
    image = data.load_dataset("shapes", "val", tiny_root)[0]["image"][None].expand(4, -1, -1, -1)  # (4, 3, 64, 64)
    model.train()
    torch.manual_seed(0)
    first, second = model.targets(image)[0][0], model.targets(image)[0][0]  # (4, 2, 16, 16) each
    assert not torch.equal(first, second)  # each step its own sample
    model.eval()
    assert torch.equal(model.targets(image)[0][0], model.targets(image)[0][0])  # Eq. 1: deterministic
    with pytest.raises(train_common.RunError, match="augment: True in the checkpoint, False now"):
        train_ocl.train(ocl_args(tiny_root, tiny_vaes, out, "transformer", "--steps", "3", "--guidance-noise", "5",
                                 "--resume"))


def test_mlp_decoder_alpha_masks():
    dec = decoders.MLPDecoder(8, 5, 16, hidden=16)
    recon, masks = dec(torch.randn(2, 3, 8), (4, 4))
    assert recon.shape == (2, 16, 5) and masks.shape == (2, 3, 4, 4)
    assert torch.allclose(masks.sum(1), torch.ones(2, 4, 4), atol=1e-6)


# ----------------------------------------------------------------------------- train_ocl.py

@pytest.mark.parametrize("decoder", ["transformer", "diffusion", "mlp"])
def test_each_decoder_trains_and_evaluate_scores_it(decoder, tiny_root, tiny_vaes, tmp_path):
    out = train_ocl.train(ocl_args(tiny_root, tiny_vaes, tmp_path / decoder, decoder, "--steps", "3"))
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["kind"] == "ocl" and ckpt["args"]["decoder"] == decoder
    # the VAE inside the checkpoint is the frozen stage-1 VAE, bit for bit
    vae_state = torch.load(tiny_vaes[4 if decoder == "diffusion" else 256], weights_only=True)["model"]
    assert all(torch.equal(ckpt["model"][f"vae.{k}"], v) for k, v in vae_state.items())
    result = evaluate.main(["--ckpt", str(out / "best.pt"), "--viz", "2", "--json", str(tmp_path / "m.json")])
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert set(metrics) == {"ari", "ari_fg", "miou", "mbo", "miou_small", "miou_medium", "miou_large"}
    assert metrics["ari"]["count"] == 16  # all 16 val images; shapes records carry areas, so Tab. 7's split too
    assert 0 <= metrics["mbo"]["mean"] <= 1 and result["decoder"] == decoder
    assert (out / "fig2.png").exists() and (out / "masks.png").exists()
    assert (out / "diffusion_recon.png").exists() == (decoder == "diffusion")  # its sampler's reconstructions


def test_evaluate_draws_fig3_for_an_msf_vae(tiny_vaes, tmp_path, capsys):
    result = evaluate.main(["--ckpt", str(tiny_vaes[256]), "--viz", "2", "--out", str(tmp_path / "figs")])
    assert result["kind"] == "vae" and sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["fig3_000.png",
                                                                                               "fig3_001.png"]
    assert "columns: image, si before inter-scale fusion, si after inter-scale fusion, scale-variant, fused X; one " \
           "row per scale" in capsys.readouterr().out


def test_guidance_cache_changes_nothing(tiny_root, tiny_vaes, tmp_path):
    once = ["--steps", "14", "--val-every", "14"]  # one validation: the cache is about training
    a = train_ocl.train(ocl_args(tiny_root, tiny_vaes, tmp_path / "a", "transformer", *once))
    b = train_ocl.train(ocl_args(tiny_root, tiny_vaes, tmp_path / "b", "transformer", *once, "--no-cache"))
    la = [json.loads(line).get("loss") for line in open(a / "metrics.jsonl")]
    lb = [json.loads(line).get("loss") for line in open(b / "metrics.jsonl")]
    assert len([v for v in la if v is not None]) == 14  # 14 steps of 4 > 48 images: cache hits happen
    # Same codes, same losses up to float rounding: the cache encodes images in other batch compositions, and
    # CPU kernels may round a last bit differently per batch size (seen: 2e-7 relative on one CI machine).
    assert [v is None for v in la] == [v is None for v in lb]
    assert [v for v in la if v is not None] == pytest.approx([v for v in lb if v is not None], rel=1e-5, abs=0)


def test_guide_scales_one_and_two(tiny_root, tiny_vaes, tmp_path):
    out = train_ocl.train(ocl_args(tiny_root, tiny_vaes, tmp_path / "g", "transformer", "--steps", "2",
                                   "--guide-scales", "1,2"))
    model, _ = ocl.load_ocl(checkpoints.load_checkpoint(out / "last.pt", "ocl"))
    assert model.decoder.grids == [(16, 16), (8, 8)]


def test_code_dim_mismatch_is_refused_naming_both(tiny_root, tiny_vaes, tmp_path):
    args = ocl_args(tiny_root, tiny_vaes, tmp_path / "x", "diffusion")
    args.vae_ckpt = str(tiny_vaes[256])
    with pytest.raises(ValueError, match="diffusion decoder needs c = 4 guidance, but .* is a c = 256 VAE"):
        train_ocl.train(args)
    args = ocl_args(tiny_root, tiny_vaes, tmp_path / "y", "transformer")
    args.vae_ckpt = str(tiny_vaes[4])
    with pytest.raises(ValueError, match="transformer decoder needs c = 256 guidance, but .* is a c = 4 VAE"):
        train_ocl.train(args)


def test_missing_inputs_print_the_command(tmp_path, tiny_root):
    with pytest.raises(SystemExit, match="python train_vae.py --dataset shapes --code-dim 4"):
        train_ocl.main(["--data-root", str(tiny_root), "--decoder", "diffusion", "--vae-ckpt", str(tmp_path / "none.pt")])
    with pytest.raises(SystemExit, match="python convert.py coco --src"):
        train_ocl.main(["--dataset", "coco", "--data-root", str(tmp_path)])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        evaluate.main(["--ckpt", str(tmp_path / "none.pt")])


def test_evaluate_segments_a_folder_of_your_own_pictures(tiny_root, tiny_vaes, tmp_path):
    """evaluate.py --images: pictures of any size and format, centre square resized to the model's resolution (oracle:
    PIL's own crop and antialiased bilinear resize), the EXIF orientation applied (oracle: the same picture stored
    turned), files that are not pictures named and skipped, and nothing written over a picture or a run file."""
    from PIL import Image
    out = train_ocl.train(ocl_args(tiny_root, tiny_vaes, tmp_path / "run", "transformer", "--steps", "1"))
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (90, 150, 3), dtype=np.uint8)  # (h, w, 3): not square, not 64 px
    Image.fromarray(wide).save(folder / "a.png")
    Image.fromarray(wide).save(folder / "a.bmp")  # the same name twice: both figures kept
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; viewers turn the picture 90 degrees clockwise
    Image.fromarray(wide).save(folder / "turned.png", exif=exif)
    Image.fromarray(np.ascontiguousarray(np.rot90(wide, k=-1))).save(folder / "upright.png")
    (folder / "notes.txt").write_text("not a picture")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = evaluate.main(["--ckpt", str(out / "best.pt"), "--images", str(folder)])
    figs = out / "images_photos"
    assert sorted(result["figures"]) == ["a_bmp.png", "a_png.png", "turned.png", "upright.png"]
    assert result["skipped"] == ["notes.txt (UnidentifiedImageError)"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the pictures are untouched

    def tile(name, column=0):  # one 64x64 tile of a figure (2x enlarged, 2 white pixels after every tile)
        fig = np.asarray(Image.open(figs / name).convert("RGB"))
        return fig[::2, ::2][:64, column * 66: column * 66 + 64].astype(int)
    crop = Image.fromarray(wide).crop((30, 0, 120, 90)).resize((64, 64), Image.BILINEAR)  # PIL: antialiased
    assert np.abs(tile("a_png.png") - np.asarray(crop, dtype=int)).max() <= 2
    assert np.array_equal(tile("turned.png"), tile("upright.png"))
    slots = torch.load(out / "best.pt", weights_only=True)["model_args"]["num_slots"]
    width = Image.open(figs / "a_png.png").width
    assert width == 2 * (2 + slots) * 66  # image | prediction | one column per slot: no ground truth column

    with pytest.raises(SystemExit, match=r"is the --images folder: the figures would replace your pictures"):
        evaluate.main(["--ckpt", str(out / "best.pt"), "--images", str(folder), "--out", str(folder)])
    with pytest.raises(SystemExit, match=r"is a file; --images writes its figures into a folder"):
        evaluate.main(["--ckpt", str(out / "best.pt"), "--images", str(folder), "--out", str(folder / "a.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"no picture to segment \(the folder is empty\); put \.jpg or \.png"):
        evaluate.main(["--ckpt", str(out / "best.pt"), "--images", str(tmp_path / "empty")])
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "x.jpg").write_text("a text file named like a picture")
    with pytest.raises(SystemExit, match=r"no picture to segment \(x\.jpg \(UnidentifiedImageError\)\)"):
        evaluate.main(["--ckpt", str(out / "best.pt"), "--images", str(tmp_path / "text")])
    with pytest.raises(SystemExit, match="not a folder; give a folder of pictures"):
        evaluate.main(["--ckpt", str(out / "best.pt"), "--images", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="is a VAE checkpoint; --images takes an OCL one"):
        evaluate.main(["--ckpt", str(tiny_vaes[256]), "--images", str(folder)])
    assert {p.name for p in out.iterdir()} >= {"best.pt", "last.pt", "images_photos"}
    # every figure comes with its label map: slot k = value k, the prediction the figure shows
    labels = np.asarray(Image.open(figs / "a_png_labels.png"))
    assert labels.shape == (64, 64) and labels.max() < slots


def test_own_pictures_of_16_bits_transparency_and_odd_shapes_are_said_and_handled(tiny_root, tiny_vaes, tmp_path,
                                                                                    capsys):
    """A 16-bit picture is scaled to 8 bits (not clipped to white), a transparent one composited on the dataset's
    background colour (not black), a very thin one segmented in its centre square and a small one blown up, each with
    one line of warning; one under 8 px a side is skipped and named."""
    from PIL import Image
    out = train_ocl.train(ocl_args(tiny_root, tiny_vaes, tmp_path / "run", "transformer", "--steps", "1"))
    folder = tmp_path / "photos"
    folder.mkdir()
    grey16 = np.full((64, 64), 32768, dtype=np.uint16)  # half of 16-bit white: 128 in 8 bits
    Image.fromarray(grey16).save(folder / "deep.png")
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)  # fully transparent, black underneath
    Image.fromarray(rgba, "RGBA").save(folder / "clear.png")
    Image.fromarray(np.zeros((20, 200, 3), dtype=np.uint8)).save(folder / "thin.png")
    Image.fromarray(np.zeros((2, 2000, 3), dtype=np.uint8)).save(folder / "line.png")
    result = evaluate.main(["--ckpt", str(out / "best.pt"), "--images", str(folder)])
    said = capsys.readouterr().out
    assert "warning: deep.png: 16-bit: scaled to 8 bits" in said
    assert "warning: clear.png: transparent: composited on the dataset's background colour" in said
    assert "warning: thin.png: 200x20 px: only its centre square, 1/10 of it, is segmented" in said
    assert "warning: thin.png: 200x20 px: its centre square blown up 3x to 64 px" in said
    assert result["skipped"] == ["line.png (2000x2 px: too small, at least 8 px a side)"]
    figs = out / "images_photos"
    first = lambda name: np.asarray(Image.open(figs / name).convert("RGB"))[0, 0]  # noqa: E731  the image's corner
    assert np.abs(first("deep.png").astype(int) - 128).max() <= 1
    background = evaluate.dataset_background(checkpoints.load_checkpoint(out / "best.pt"), evaluate.parse_args(
        ["--ckpt", str(out / "best.pt")]))
    assert background != (0, 0, 0) and np.abs(first("clear.png").astype(int) - np.array(background)).max() <= 1


def test_ocl_size_defaults_are_the_paper_size():
    """OCL's constructor defaults are SIZES["paper"] (decoders.py's defaults are the paper's too), not a third size."""
    params = inspect.signature(ocl.OCL.__init__).parameters
    assert {k: params[k].default for k in ocl.SIZES["paper"]} == ocl.SIZES["paper"]


def test_validation_keeps_the_models_mode_and_the_vae_frozen(tiny_root, tiny_vaes, tmp_path):
    """evaluate.validate_ocl serves training (model in train mode) and evaluate.py (eval mode): it must leave the
    mode as it found it (evaluate.py's figures after it ran in train mode before, dropout on in the sampler)."""
    out = train_ocl.train(ocl_args(tiny_root, tiny_vaes, tmp_path / "m", "transformer", "--steps", "1"))
    model, _ = ocl.load_ocl(checkpoints.load_checkpoint(out / "last.pt", "ocl"))
    val = data.load_dataset("shapes", "val", tiny_root)
    for training in (False, True):
        model.train(training)
        values, _ = evaluate.validate_ocl(model, val, "cpu", 8, max_batches=1)
        assert model.training == training and not model.vae.training and len(values["ari"]) == 8


def test_checkpoint_of_another_format_is_refused_by_name(tiny_root, tiny_vaes, tmp_path):
    """One checkpoint format: a best.pt or last.pt of another format (an older one stored no format_version) is
    refused by evaluate.py and by --resume with a one-line message naming both formats, never half-loaded."""
    out = train_ocl.train(ocl_args(tiny_root, tiny_vaes, tmp_path / "new", "transformer", "--steps", "2"))
    (tmp_path / "old_run").mkdir()
    for name, version in (("best.pt", 4), ("last.pt", None)):
        ckpt = torch.load(out / name, weights_only=True)
        ckpt.pop("format_version") if version is None else ckpt.update(format_version=version)
        torch.save(ckpt, tmp_path / "old_run" / name)
    with pytest.raises(SystemExit, match=r"has checkpoint format 4; this code reads format 5 only"):
        evaluate.main(["--ckpt", str(tmp_path / "old_run" / "best.pt"), "--limit", "8"])
    with pytest.raises(ValueError, match=r"has checkpoint format 1; this code reads format 5 only"):
        train_ocl.train(ocl_args(tiny_root, tiny_vaes, tmp_path / "old_run", "transformer", "--steps", "2", "--resume"))


def test_validation_does_not_change_training(tiny_root, tiny_vaes, tmp_path):
    """Validation needs the masks only (model.segment: no decoder loss, no noise) and its own data-loader
    generator: validating every step or never in between gives the same training losses, bit for bit. (The
    diffusion decoder, whose training draws the most noise; validation's path is every decoder's.)"""
    decoder = "diffusion"
    a = train_ocl.train(ocl_args(tiny_root, tiny_vaes, tmp_path / "a", decoder, "--steps", "4", "--val-every", "1"))
    b = train_ocl.train(ocl_args(tiny_root, tiny_vaes, tmp_path / "b", decoder, "--steps", "4", "--val-every", "4"))
    la = [r["loss"] for r in map(json.loads, open(a / "metrics.jsonl")) if "loss" in r]
    lb = [r["loss"] for r in map(json.loads, open(b / "metrics.jsonl")) if "loss" in r]
    assert len(la) == 4 and la == lb


def test_diffusion_target_and_latent_scale(tiny_root, tiny_vaes, tmp_path, capsys):
    """--diffusion-target z noises the VAE encoder's continuous Z_1 (SlotDiffusion, the authors' code), x the guidance
    X (the paper's text); --latent-scale 1 keeps the target as it is, auto scales it by 1 / std of the first batch.
    Both name their run folder and are refused with the other decoders."""
    for flags, name in (([], "diffusion-x0-gate_msf"), (["--diffusion-target", "z", "--latent-scale", "1"],
                                                         "diffusion-z-scale1-x0-gate_msf")):
        args = train_ocl.parse_args(["--decoder", "diffusion", "--vae-ckpt", str(tiny_vaes[4]), *flags])
        vae_args = checkpoints.load_checkpoint(tiny_vaes[4])["model_args"]
        assert train_ocl.run_folder(args, vae_args) == f"runs/ocl_shapes_{name}"
    with refused(capsys, "--decoder transformer has none"):  # the transformer decoder has no diffusion target
        train_ocl.parse_args(["--diffusion-target", "z"])
    image = data.load_dataset("shapes", "val", tiny_root)[0]["image"][None]  # (1, 3, 64, 64)
    for target, scale in (("x", "auto"), ("z", "1"), ("z", "auto")):
        out = train_ocl.train(ocl_args(tiny_root, tiny_vaes, tmp_path / f"{target}{scale}", "diffusion", "--steps", "1",
                                       "--diffusion-target", target, "--latent-scale", scale))
        model, ckpt = ocl.load_ocl(checkpoints.load_checkpoint(out / "last.pt", "ocl"))
        seen = []
        model.decoder.loss = lambda x0, slots, t=None, masks=None: seen.append(x0) or torch.zeros(())
        model(image)
        with torch.no_grad():
            z1, x = model.vae.encoder(image), model.vae.guidance(image)[1][0]  # Z_1 and X at scale 1
        assert torch.equal(seen[0], z1 if target == "z" else x)
        stored = ckpt["model"]["decoder.scale"]
        assert stored == 1.0 if scale == "1" else 0 < stored != 1.0  # auto: measured on the first batch


def test_guidance_is_fp32_inside_autocast(tiny_root, tiny_vaes):
    """The training step runs under autocast; the frozen guidance must be the same codes as outside it (the
    GuidanceCache builds them outside). On the CPU, bfloat16 autocast stands in for the GPU's fp16."""
    ckpt = checkpoints.load_checkpoint(tiny_vaes[256], "vae")
    model = ocl.OCL(msf.load_vae(ckpt), "transformer", 7, 64, slot_dim=32, enc_channels=16, dec_dim=32,
                          dec_layers=1)
    image = data.load_dataset("shapes", "val", tiny_root)[0]["image"][None]  # (1, 3, 64, 64)
    plain = model.targets(image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.targets(image)
        vae_bf16 = model.vae.guidance(image)  # what the guidance was before: computed in bfloat16
    assert all(torch.equal(p, m) for p, m in zip(plain[0], mixed[0]))
    assert all(p.dtype == torch.float32 and torch.equal(p, m) for p, m in zip(plain[1], mixed[1]))
    assert not torch.equal(vae_bf16[1][0], plain[1][0])  # (so the check above is not vacuous)


def test_run_folder_names_the_guidance(tiny_root, tiny_vaes, tmp_path):
    """The default --out comes from the VAE checkpoint, not a fixed "msf": comparing guidances cannot collide."""
    vq = train_vae.train(train_vae.parse_args(["--data-root", str(tiny_root), "--vae", "vqvae", "--out",
                                               str(tmp_path / "vq"), "--channels", "16", "--batch-size", "8",
                                               "--steps", "1", "--val-batches", "1"])) / "best.pt"
    vae_args = {str(tiny_vaes[256]): checkpoints.load_checkpoint(tiny_vaes[256])["model_args"],
                str(vq): checkpoints.load_checkpoint(vq)["model_args"]}
    for decoder, vae, scales, name in [("transformer", tiny_vaes[256], "1", "ocl_shapes_transformer_msf"),
                                       ("transformer", vq, "1", "ocl_shapes_transformer_vqvae"),
                                       ("transformer", tiny_vaes[256], "1,2", "ocl_shapes_transformer_msf-g12"),
                                       ("mlp", tiny_vaes[256], "1", "ocl_shapes_mlp_z1-msf")]:
        args = train_ocl.parse_args(["--decoder", decoder, "--vae-ckpt", str(vae), "--guide-scales", scales])
        assert train_ocl.run_folder(args, vae_args[str(vae)]) == f"runs/{name}"


def test_diffusion_time_embedding_goes_through_silu_first():
    """DDPM adds to each residual block Dense(nonlinearity(temb)); a Linear on the UNet's last Linear would
    stack two linear maps."""
    block = decoders.ResBlock(32, 32, time_dim=64, dropout=0.0)
    seen = []
    block.time.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    temb = torch.randn(2, 64)
    block(torch.randn(2, 32, 4, 4), temb)
    assert torch.equal(seen[0], torch.nn.functional.silu(temb))


def test_seed_k_starts_the_same_slot_model_whatever_the_vae(tiny_root, tiny_vaes, tmp_path, monkeypatch):
    """Paired comparisons of guidances (benchmarks/compare_guidance.py): building a VAE draws from the random
    generators (a VQ-VAE as many draws as its 4,096 codes need), so train_ocl seeds again before the OCL model."""
    vq = train_vae.train(train_vae.parse_args(["--data-root", str(tiny_root), "--vae", "vqvae", "--out",
                                               str(tmp_path / "vq"), "--channels", "16", "--batch-size", "8",
                                               "--steps", "1", "--val-batches", "1"])) / "best.pt"
    seen, build = [], ocl.OCL.__init__

    def recording(self, *a, **k):
        build(self, *a, **k)
        seen.append({k: v.clone() for k, v in self.state_dict().items() if k.startswith(("encoder", "queries",
                                                                                          "slot_attention"))})
    monkeypatch.setattr(ocl.OCL, "__init__", recording)
    for vae, out in ((tiny_vaes[256], "a"), (vq, "b")):
        args = ocl_args(tiny_root, tiny_vaes, tmp_path / out, "transformer", "--steps", "1")
        args.vae_ckpt = str(vae)
        train_ocl.train(args)
    assert seen[0].keys() == seen[1].keys() and all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])


# ----------------------------------------------------------------------------- SysBinder (the competitor)

def test_sysbinder_slots_are_equivariant_and_its_blocks_meet_only_in_the_attention():
    """As the original: permuting the queries permutes the slots; with the attention's read-out held fixed, block 1
    of the previous slots does not reach block 2 of the new ones (block GRU, block MLP, block binding)."""
    torch.manual_seed(0)
    sb = SysBinder(32, 8, iters=3, blocks=2, prototypes=5, mlp_hidden=24).eval()
    queries, inputs = torch.randn(2, 4, 32), torch.randn(2, 30, 8)
    with torch.no_grad():
        slots, attn = sb(queries, inputs)
        perm = torch.tensor([2, 0, 3, 1])
        slots_p, attn_p = sb(queries[:, perm], inputs)
    assert slots.shape == (2, 4, 32) and attn.shape == (2, 4, 30)
    torch.testing.assert_close(attn.sum(1), torch.ones(2, 30))  # softmax over slots
    torch.testing.assert_close(slots_p, slots[:, perm], atol=1e-5, rtol=1e-5)  # permuting queries permutes slots
    torch.testing.assert_close(attn_p, attn[:, perm], atol=1e-5, rtol=1e-5)
    updates, prev = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    other = prev.clone()
    other[..., :16] = torch.randn(2, 4, 16)  # block 1 of the previous slots changes
    with torch.no_grad():
        new, new_other = sb.update(updates, prev), sb.update(updates, other)
    assert torch.equal(new[..., 16:], new_other[..., 16:]) and not torch.allclose(new[..., :16], new_other[..., :16])


def test_every_sysbinder_block_lies_in_the_convex_hull_of_its_normalised_prototypes():
    """Block m of a slot = a mixture of block m's prototypes after the MLP and the non-affine per-block LayerNorm:
    non-negative least squares (scipy) finds weights summing to 1 that rebuild it exactly."""
    from scipy.optimize import nnls
    torch.manual_seed(1)
    sb = SysBinder(32, 8, iters=2, blocks=2, prototypes=20, mlp_hidden=24).eval()
    with torch.no_grad():
        slots, _ = sb(torch.randn(3, 4, 32), torch.randn(3, 30, 8))
        memory = sb.memory()  # (2, 20, 16)
    variance = memory.var(-1, unbiased=False)  # normalised: zero mean, unit variance (LayerNorm's eps aside)
    assert torch.allclose(memory.mean(-1), torch.zeros(2, 20), atol=1e-5) and (variance > 0.95).all()
    assert (variance <= 1 + 1e-5).all()
    for m in range(2):
        a = torch.cat([memory[m].t(), 100 * torch.ones(1, 20)]).double().numpy()  # (17, K): the sum row weighs most
        for block in slots.reshape(-1, 2, 16)[:, m]:
            w, residual = nnls(a, torch.cat([block, torch.tensor([100.0])]).double().numpy())
            assert residual < 1e-4 and abs(w.sum() - 1) < 1e-5


def test_sysbinder_coupling_makes_tokens_of_each_slot_from_its_own_blocks():
    """The decoder reads 2 tokens per slot (BlockCoupling): changing slot 1 changes its own tokens, not slot 2's."""
    torch.manual_seed(0)
    coupling = BlockCoupling(32, 24, blocks=2).eval()
    slots = torch.randn(2, 3, 32)
    other = slots.clone()
    other[:, 0] = torch.randn(2, 32)
    with torch.no_grad():
        tokens, tokens_other = coupling(slots), coupling(other)
    assert tokens.shape == (2, 6, 24)
    assert torch.equal(tokens[:, 2:], tokens_other[:, 2:]) and not torch.allclose(tokens[:, :2], tokens_other[:, :2])


def test_slate_with_sysbinder_trains_and_evaluate_scores_it(tiny_root, tiny_vaes, tmp_path):
    out = train_ocl.train(ocl_args(tiny_root, tiny_vaes, tmp_path / "sb", "transformer", "--slot-attention",
                                   "sysbinder", "--steps", "2"))
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["model_args"]["grouping"] == "sysbinder" and "slot_attention.prototypes" in ckpt["model"]
    assert "coupling.block_pos" in ckpt["model"]  # the decoder reads the coupled blocks
    evaluate.main(["--ckpt", str(out / "best.pt"), "--json", str(tmp_path / "m.json")])
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert {"ari", "ari_fg", "miou", "mbo"} <= set(metrics) and -1 <= metrics["ari_fg"]["mean"] <= 1


@pytest.mark.parametrize("decoder", ["transformer", "diffusion"])
def test_slot_use_measures_what_the_decoder_takes_from_its_slots(decoder, tiny_root, tiny_vaes, tmp_path):
    """benchmarks/slot_use.py. Given the same slots for every image, "another image's slots" are the image's own:
    both losses are equal to the last bit. With the model's own slots they are not. The masks' summary against a
    hand-made split of 16 cells: 12 / 3 / 1 cells -> shares 0.75 / 0.1875 / 0.0625, all three above 5%."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import slot_use
    out = train_ocl.train(ocl_args(tiny_root, tiny_vaes, tmp_path / decoder, decoder, "--steps", "2"))
    model, _ = ocl.load_ocl(checkpoints.load_checkpoint(out / "last.pt", "ocl"))
    val = data.load_dataset("shapes", "val", tiny_root)
    images = torch.stack([torch.as_tensor(val[i]["image"]) for i in range(4)])  # (4, 3, 64, 64)
    rows = slot_use.slot_use(model, images, timesteps=(10, 500))["rows"]
    assert len(rows) == (2 if decoder == "diffusion" else 1) and all(own != other for _, own, other, _ in rows)
    slots, _ = model.encode(images)
    masks = torch.zeros(4, slots.shape[1], 4, 4)
    masks[:, 0].view(4, -1)[:, :12] = 1  # slot 0 wins 12 cells, slot 1 three, slot 2 one
    masks[:, 1].view(4, -1)[:, 12:15] = 1
    masks[:, 2].view(4, -1)[:, 15] = 1
    model.encode = lambda image: (slots[:1].expand_as(slots), masks)  # every image: image 0's slots
    out = slot_use.slot_use(model, images, timesteps=(10, 500))
    assert all(own == other for _, own, other, _ in out["rows"])
    assert out["cover"] == 3 and out["largest"] == 0.75
    if decoder == "diffusion":  # the recipe's decoder predicts x0 through the gate: a UNet that predicts 0 scores
        dec, gates = model.decoder, []  # mean((scale X)^2) whatever the noise, and reads each context's own masks
        assert dec.prediction == "x0" and dec.gate
        dec.unet.forward = lambda xt, t, c, gate: gates.append(gate) or torch.zeros_like(xt)
        own = masks.clone()
        own[1] = masks[1].flip(-1)  # images 0 and 1 split differently: rolled masks are another image's
        model.encode = lambda image: (slots, own)
        rows = slot_use.slot_use(model, images, timesteps=(10,))["rows"]
        x0 = model.targets(images)[1][0] * dec.scale
        assert rows[0][1] == pytest.approx((x0 ** 2).mean().item(), rel=1e-6)
        assert torch.equal(gates[0], own) and torch.equal(gates[1], own.roll(1, 0)) and not torch.equal(own, gates[1])
        assert torch.all(gates[2] == 1 / own.shape[1])  # uniform: the gate changes nothing
