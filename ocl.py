"""The stage-2 model: object-centric learning guided by a frozen (MSF) VAE, as one nn.Module (this project's
nanoGPT `model.py`). Slot Attention with a transformer (SLATE), diffusion (SlotDiffusion) or MLP (DINOSAUR)
decoder; on videos STEVE and video SlotDiffusion (slots carried from frame to frame by a predictor, queries from the
first frame's boxes).

Paper: "Multi-Scale Fusion for Object Representation" (Zhao et al., ICLR 2025), Sect. 3.1 (OCL with VAE guidance:
phi_e -> phi_sa -> phi_d, the guidance I, X of the frozen VAE), Sect. 3.2 ("During OCL training, only scale n = 1 is
used as guidance"), Tab. 5 lower right (guide scales), A.3 (the encoders, decoders and the video predictor), A.5
(query initialization).

Reading order: SIZES (the model widths of --size), OCL (__init__ builds the parts; guide / targets: what the frozen
VAE gives; encode: encoder -> queries -> Slot Attention; encode_video: the recurrence over frames; forward: the
training loss; segment: what evaluation scores), load_ocl / load_dino (a model back from its checkpoint).
train_ocl.py trains it; evaluate.py scores it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import decoders
import encoders
import msf
from encoders import CNNEncoder
from slot_attention import BlockCoupling, BoxQueries, GaussianQueries, Predictor, SlotAttention, SysBinder

# Model sizes (--size): "paper" follows the authors' configs, "cpu" shrinks every width so that the built-in
# datasets train on a 2-core CPU, "class" is "cpu" on a 16x16 grid (encoder stride 4) for classroom runs of a few
# minutes. Explicit flags override each. The CPU size attends over a 32x32 grid (enc_stride 2) and pays for it with
# a 1-layer decoder (ours: results/2026-11-25-cpu-preset-tuning.md); the paper size attends at full resolution like
# the authors' naive CNN branch.
SIZES = {
    "class": dict(slot_dim=64, enc_channels=64, enc_stride=4, dec_dim=64, dec_layers=1, dec_heads=4,
                  unet_base=32, unet_layers=1, mlp_hidden=256),
    # ours: the CPU size, encoder stride 2 (the paper size: 1)
    "cpu": dict(slot_dim=64, enc_channels=64, enc_stride=2, dec_dim=64, dec_layers=1, dec_heads=4,
                unet_base=32, unet_layers=1, mlp_hidden=256),
    "paper": dict(slot_dim=256, enc_channels=64, enc_stride=1, dec_dim=256, dec_layers=4, dec_heads=4,
                  unet_base=128, unet_layers=2, mlp_hidden=2048),
}
DECODERS = ("transformer", "diffusion", "mlp")  # SLATE / STEVE, SlotDiffusion, DINOSAUR
CODE_DIM = {"transformer": 256, "diffusion": 4}  # the guidance each decoder is designed for (A.3); mlp takes any

# -----------------------------------------------------------------------------
# The model


class OCL(nn.Module):
    """Frozen VAE guidance + primary encoder + queries + Slot Attention + one primary decoder; for video (STEVE,
    video SlotDiffusion) also the predictor that carries frame t's slots to frame t+1's queries.

    The size arguments default to the paper's (SIZES["paper"]); train_ocl.py always passes them from --size.
    video: inputs are clips (b, t, 3, H, W); queries: "gaussian" (A.5, images) or "box" (A.5, video: first-frame
    boxes). vae: None for DINOSAUR on the big-little encoder (decoder "mlp", encoder "dino"), which reconstructs
    DINO's features and reads no VAE."""

    def __init__(self, vae, decoder, num_slots, resolution, guide_scales=(1,), iters=3, bilevel=False,
                 slot_dim=256, enc_channels=64, enc_stride=1, dec_dim=256, dec_layers=4, dec_heads=4,
                 unet_base=128, unet_layers=2, mlp_hidden=2048, encoder="cnn", dino=None, dino_sha256=None,
                 grouping="sa", video=False, queries="gaussian", predictor_dropout=0.1, box_prior=False,
                 diffusion_target="x", latent_scale="auto", predictor="ours", boxless="gaussian",
                 diffusion_prediction="eps", mask_gate=False, guidance_noise=0.0, dino_target="postnorm"):
        super().__init__()
        self.dinosaur = decoder == "mlp" and encoder == "dino"  # DINOSAUR proper: DINO's features are the target
        if (vae is None) != self.dinosaur:
            raise ValueError("a VAE guides every model but DINOSAUR (--decoder mlp --encoder dino), which reads none")
        if dino_target not in ("postnorm", "prenorm"):
            raise ValueError(f"dino_target {dino_target!r}: choose postnorm or prenorm (DINO's final LayerNorm)")
        # authors: DINOSAUR's target after DINO's final LayerNorm (DINOSAUR's own: before it, --dino-target prenorm)
        self.dino_prenorm = self.dinosaur and dino_target == "prenorm"
        # authors: the guidance of every training step Gumbel-sampled (their std = 5) when > 0 (--guidance-noise)
        self.guidance_noise = guidance_noise
        self.vae = vae if vae is None else vae.eval().requires_grad_(False)  # frozen: never trained or in train mode
        self.decoder_kind, self.guide_scales, self.video = decoder, list(guide_scales), video
        self.diffuses_z = decoder == "diffusion" and diffusion_target == "z"  # Z_1, not X (--diffusion-target z)
        code_dim = 384 if vae is None else vae.code_dim  # DINO ViT-S/8's channels, or the VAE's c
        # another primary encoder (a project beyond the exercises) goes here
        # phi_e: the naive CNN (ablations, shapes) or A.3's big-little, a frozen DINO ViT-S/8 beside that CNN.
        # `dino`: the frozen DinoViT (load_dino); `dino_sha256` names its weights in checkpoints,
        # which do not hold them (CNNEncoder leaves them out of state_dict).
        if encoder not in ("cnn", "dino") or (encoder == "dino") != (dino is not None):
            raise ValueError(f"encoder '{encoder}' with{'out' if dino is None else ''} a DINO model: 'cnn' takes none, "
                             f"'dino' takes ocl.load_dino()[0]")
        self.dino_sha256 = dino_sha256
        self.encoder = CNNEncoder(slot_dim, enc_channels, enc_stride, dino=dino)
        # the query initializer (A.5): Gaussian for images; for video the first frame's boxes through an MLP
        if queries == "box":
            self.queries = BoxQueries(num_slots, slot_dim, boxless)
        elif queries == "gaussian":
            self.queries = GaussianQueries(num_slots, slot_dim)
        else:
            raise ValueError(f"unknown --queries '{queries}'; choose gaussian or box")
        self.box_queries = queries == "box"
        if box_prior and not (video and self.box_queries):
            raise ValueError("box_prior restricts frame 0's attention to the box queries' boxes: video with box "
                             "queries only")
        self.box_prior = box_prior  # --box-prior (ours): frame 0's box slots attend inside their boxes only
        # video (A.3): one transformer encoder layer turns frame t's slots into frame t+1's queries (STEVE)
        self.predictor = Predictor(slot_dim, dropout=predictor_dropout, kind=predictor) if video else None
        # phi_sa: Slot Attention, or the competitor SysBinder (block-slot attention, 2 blocks: A.3), whose blocks the
        # decoder reads as s x 2 coupled tokens of its own width (BlockCoupling), as the original's decoder does
        self.coupling, context = None, slot_dim  # what the decoder cross-attends to: the slots, of width slot_dim
        if grouping == "sysbinder":
            if bilevel:
                raise ValueError("--bilevel is Slot Attention's (BO-QSA); SysBinder has no such option")
            if decoder == "mlp":
                raise ValueError("SysBinder's blocks are read by a decoder that cross-attends to them: use --decoder "
                                 "transformer or diffusion with --slot-attention sysbinder")
            self.slot_attention = SysBinder(slot_dim, slot_dim, iters, blocks=2)
            self.coupling, context = BlockCoupling(slot_dim, dec_dim, blocks=2), dec_dim
        elif grouping == "sa":
            self.slot_attention = SlotAttention(slot_dim, slot_dim, iters, bilevel=bilevel)
        else:
            raise ValueError(f"unknown --slot-attention '{grouping}'; choose sa or sysbinder")
        token = resolution // 4  # the VAE's scale-1 token grid (4x down-sampling)
        self.token_grid = (token, token)
        # EXERCISE: decoder (EXERCISES.md 5): --decoder diffusion on the same kind of VAE (with --code-dim 4)
        if mask_gate and decoder != "diffusion":
            raise ValueError(f"--mask-gate gates the diffusion decoder's cross-attention; --decoder {decoder} has none")
        if decoder == "transformer":
            grids = [(token // 2 ** (n - 1),) * 2 for n in self.guide_scales]  # the token grid of each guide scale
            self.decoder = decoders.TransformerDecoder(code_dim, vae.vocab, grids, context, dec_dim, dec_layers,
                                                       dec_heads)
        elif decoder == "diffusion":  # it diffuses X (the paper's text) or Z_1 (SlotDiffusion, the authors' code)
            if diffusion_target not in ("x", "z"):
                raise ValueError(f"diffusion target {diffusion_target!r}: choose x (the guidance) or z (Z_1)")
            if mask_gate and self.coupling is not None:
                raise ValueError("--mask-gate gates each slot by its mask; SysBinder's decoder reads 2 coupled tokens per "
                                 "slot: use --slot-attention sa with --mask-gate")
            self.decoder = decoders.DiffusionDecoder(code_dim, context, base=unet_base, layers=unet_layers,
                                                     heads=unet_heads(unet_base), latent_scale=latent_scale,
                                                     prediction=diffusion_prediction, gate=mask_gate)
        elif decoder == "mlp":  # DINOSAUR: DINO's map at H/8 with the big-little encoder, else the VAE's Z_1 at H/4
            if self.dinosaur:
                self.token_grid = (resolution // 8, resolution // 8)
            self.decoder = decoders.MLPDecoder(slot_dim, code_dim, self.token_grid[0] * self.token_grid[1],
                                               hidden=mlp_hidden)
        else:
            raise ValueError(f"unknown --decoder '{decoder}'; choose transformer, diffusion or mlp")

    def train(self, mode=True):
        """nn.Module.train, except for the VAE: it stays in eval mode whatever the rest does."""
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()  # model.train() must not wake the frozen VAE (code replacement, Gumbel sampling)
        return self

    @torch.no_grad()
    def guide(self, image, noise=0.0):
        """The frozen VAE's guidance at the guide scales: indices and X, lists over self.guide_scales. Always in
        fp32, also inside the training step's autocast: the guidance must not depend on the precision it was
        computed in (train_ocl.GuidanceCache computes it outside autocast; both paths must give the same codes).
        noise > 0: Gumbel-sampled codes (vae.match), as the authors' stage 2."""
        with torch.autocast(image.device.type, enabled=False):
            indices, xs = self.vae.guidance(image.float(), noise)  # per scale: (b, g, h_n, w_n), (b, c, h_n, w_n)
        return [indices[n - 1] for n in self.guide_scales], [xs[n - 1] for n in self.guide_scales]

    @torch.no_grad()
    def targets(self, image, indices=None, dino_features=None):
        """What the decoder reconstructs, fixed and in fp32: (indices I, guidance X) at the guide scales; for the
        diffusion decoder with --diffusion-target z the VAE encoder's continuous Z_1 instead of X; for the mlp
        decoder frozen features: DINOSAUR's, DINO's map (b, 384, H/8, W/8) (`dino_features` where the encoder already
        has it), or with the naive CNN a stand-in, the frozen VAE encoder's continuous Z_1 (b, c, H/4, W/4).
        `indices`: already known (train_ocl.GuidanceCache): X is rebuilt from them. In training, guidance_noise > 0
        samples the codes (the authors' stage 2)."""
        with torch.autocast(image.device.type, enabled=False):
            if self.dinosaur:  # the last 384 channels: DINO's final map, or with dino_prenorm the one before its norm
                maps = self.encoder.dino_map(image, self.dino_prenorm) if dino_features is None else dino_features
                return None, maps[:, -self.encoder.dino.dim:].float()  # (b, 384, H/8, W/8)
            if self.decoder_kind == "mlp":  # ours: without DINO, the stand-in target is the VAE encoder's Z_1
                return None, self.vae.encoder(image.float())  # (b, c, h, w)
            if self.diffuses_z:  # authors: SlotDiffusion diffuses the continuous Z_1 before quantization
                return None, [self.vae.encoder(image.float())]  # [(b, c, h, w)]
            if indices is None:
                return self.guide(image, self.guidance_noise if self.training else 0.0)
            return indices, [self.vae.x_from_indices(i, n) for i, n in zip(indices, self.guide_scales)]

    def initial_queries(self, b, sigma, bbox):
        """S0 (b, s, d): the Gaussian queries with noise sigma, or the MLP of the first frame's boxes bbox (b, K, 4)."""
        if self.box_queries:
            if bbox is None:
                raise ValueError("box queries need the first frame's bounding boxes (a dataset that stores `bbox`)")
            return self.queries(bbox, sigma)
        return self.queries(b, sigma)

    def encode(self, image, sigma=0.0, dino_features=None, bbox=None):
        """phi_e and phi_sa (Sect. 3.1): image (b, 3, H, W) -> slots (b, s, d) and Slot Attention's masks
        (b, s, h, w), from queries with noise sigma (0: the means, as at evaluation). dino_features: the frozen
        DINO's map of these images if already known (the feature cache; big-little encoder only).
        Video: clips (b, t, 3, H, W) and boxes (b, t, K, 4) -> slots (b, t, s, d), masks (b, t, s, h, w)."""
        if self.video:
            return self.encode_video(image, sigma, dino_features, bbox)
        b = image.shape[0]
        features, grid = self.encoder(image, dino_features)  # phi_e: (b, n, d), (h, w)
        queries = self.initial_queries(b, sigma, None if bbox is None else bbox[:, 0])  # (b, s, d)
        slots, attn = self.slot_attention(queries, features)  # phi_sa: (b, s, d), (b, s, n)
        return slots, attn.view(b, -1, *grid)  # (b, s, d), (b, s, h, w)

    def encode_video(self, clip, sigma=0.0, dino_features=None, bbox=None):
        """STEVE's recurrence (A.3): frame 0's queries from the first frame's boxes (or Gaussian); at each frame t,
        Slot Attention from the queries gives frame t's slots and masks; the predictor turns them into frame t+1's
        queries. Causal: frame t's slots see frames 0..t only. clip (b, t, 3, H, W) -> slots (b, t, s, d), masks
        (b, t, s, h, w)."""
        b, t = clip.shape[:2]
        features, grid = self.encoder(clip.flatten(0, 1), dino_features)  # phi_e per frame: (b*t, n, d), (h, w)
        features = features.unflatten(0, (b, t))  # (b, t, n, d)
        queries = self.initial_queries(b, sigma, None if bbox is None else bbox[:, 0])  # (b, s, d) for frame 0
        # --box-prior: on frame 0 a slot that starts from a box attends only inside that box (BoxQueries.prior)
        # EXERCISE: box-prior (EXERCISES.md 11): --no-box-prior, the authors' recipe (prior = None)
        # ours: the box prior on frame 0 (--box-prior)
        prior = self.queries.prior(bbox[:, 0], grid) if self.box_prior else None  # (b, s, n) or None
        slots, masks = [], []
        for i in range(t):
            frame_prior = prior if i == 0 else None  # the box prior acts on frame 0 only
            s_i, a_i = self.slot_attention(queries, features[:, i], frame_prior)  # phi_sa: (b, s, d), (b, s, n)
            slots.append(s_i)
            masks.append(a_i.view(b, -1, *grid))  # (b, s, h, w)
            queries = self.predictor(s_i)  # frame i+1's queries (b, s, d)
        return torch.stack(slots, 1), torch.stack(masks, 1)  # (b, t, s, d), (b, t, s, h, w)

    def forward(self, image, sigma=0.0, indices=None, dino_features=None, bbox=None):
        """image (b, 3, H, W) -> dict(loss, masks (b, s, h, w), slots (b, s, d)). `indices`: the guidance indices
        if already known (train_ocl.GuidanceCache); X is then rebuilt from them instead of running the VAE.
        `dino_features`: DINO's map of the images if already known (train_ocl.FeatureCache). bbox (b, t, K, 4): boxes
        (box queries).
        Video: clips (b, t, 3, H, W); every frame is decoded from its own slots (STEVE), masks (b, t, s, h, w)."""
        frames = image.flatten(0, 1) if self.video else image  # the VAE and the decoder are per frame: (b*t, ...)
        if self.dinosaur and dino_features is None:  # DINO's map, once: the encoder's input and the target
            dino_features = self.encoder.dino_map(frames, self.dino_prenorm)  # (b(*t), 384 or 768, H/8, W/8)
        indices, xs = self.targets(frames, indices, dino_features)  # I, X of Sect. 3.1 (mlp: the features as xs)
        slots, masks = self.encode(image, sigma, dino_features, bbox)  # video: (b, t, s, d), (b, t, s, h, w)
        per_frame = slots.flatten(0, 1) if self.video else slots  # (b*t, s, d) or (b, s, d)
        if self.decoder_kind == "transformer":  # reconstruction as classification of the code indices
            loss = self.decoder.loss(self.decoder(xs, self.context(per_frame)), indices)
        elif self.decoder_kind == "diffusion":  # reconstruction as regression of the noise added to X (or of X)
            gate = masks.flatten(0, 1) if self.video else masks  # (b(*t), s, h, w): read only by --mask-gate
            loss = self.decoder.loss(xs[0], self.context(per_frame), masks=gate)
        else:
            recon, masks = self.decoder(per_frame, xs.shape[-2:])  # masks from the decoder's alpha (b(*t), s, h, w)
            loss = F.mse_loss(recon, xs.flatten(2).transpose(1, 2))
            masks = masks.unflatten(0, slots.shape[:2]) if self.video else masks
        return {"loss": loss, "masks": masks, "slots": slots}

    def context(self, slots):
        """What the decoder cross-attends to: the slots (b, s, d), or SysBinder's coupled blocks (b, s * 2, dec_dim)."""
        return slots if self.coupling is None else self.coupling(slots)

    @torch.no_grad()
    def segment(self, image, bbox=None):
        """What evaluation needs, and nothing else: slots (b, s, d) and masks (b, s, h, w) (Slot Attention's last
        attention; mlp: the decoder's alpha), from the query means. No decoder loss and no random draw, so
        validating leaves the training's random stream where it was. Video: whole clips (b, t, 3, H, W) and their
        boxes (b, t, K, 4) -> slots (b, t, s, d), masks (b, t, s, h, w)."""
        slots, masks = self.encode(image, bbox=bbox)
        if self.decoder_kind == "mlp":
            _, masks = self.decoder(slots.flatten(0, 1) if self.video else slots, self.token_grid)  # (b(*t), s, h, w)
            masks = masks.unflatten(0, slots.shape[:2]) if self.video else masks
        return {"slots": slots, "masks": masks}


def unet_heads(base):
    """Attention heads of the diffusion UNet: heads of 16 channels on small (CPU) UNets, 8 at paper size."""
    # authors: 8 heads at the paper's size (SlotDiffusion's configs: heads of 32 channels, 8-16 per block)
    return max(1, base // 16) if base < 128 else 8


# -----------------------------------------------------------------------------
# Rebuilding a model from its checkpoint


def load_ocl(ckpt, device="cpu", dino_weights=None):
    """(model in eval mode, ckpt) from an OCL checkpoint dict (checkpoints.load_checkpoint(path, "ocl") reads one
    safely): the VAE it embeds (msf.load_vae of its arguments and weights), DINO (big-little encoder) from its own
    file, then the OCL model around them. dino_weights: where DINO's weights are (default: where the run found
    them); other weights than the run's are refused."""
    dino, vae = None, None
    if ckpt["model_args"]["encoder"] == "dino":
        dino, _ = load_dino(dino_weights or ckpt["args"]["dino_weights"], ckpt["model_args"]["dino_sha256"])
    weights = ckpt["model"]
    if ckpt["vae"] is not None:  # every model but DINOSAUR embeds its frozen VAE
        vae = msf.load_vae({"model_args": ckpt["vae"]["model_args"],
                            "model": {k[4:]: v for k, v in weights.items() if k.startswith("vae.")}})
    model = OCL(vae, **ckpt["model_args"], dino=dino)
    model.load_state_dict(weights)
    return model.to(device).eval(), ckpt


def load_dino(weights=None, sha256=None):
    """The frozen DINO ViT-S/8 of the big-little encoder and the sha256 of its weights (checkpoints name DINO by it
    instead of holding its 87 MB again): from `weights` (a path; None: torch's hub cache, downloaded on first use;
    "random": smoke runs only). With `sha256` (what a checkpoint names), other weights are refused."""
    dino, found, digest = encoders.dino_vit_s8(weights)
    if sha256 is not None and digest != sha256:
        raise ValueError(f"this checkpoint was trained with other DINO weights (sha256 {sha256[:16]}...) than "
                         f"{found} (sha256 {digest[:16]}...); pass --dino-weights with the file the run used")
    return dino, digest
