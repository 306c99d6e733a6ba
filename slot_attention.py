"""phi_sa: slots from features. Slot Attention, the competitor SysBinder, the query initializers and STEVE's predictor.

Paper: "Multi-Scale Fusion for Object Representation" (Zhao et al., ICLR 2025), Sect. 3.1 (phi_sa: (S0, F) -> (S, M)),
A.3 ("Slot Attention: we adhere to the standard design outlined in Locatello et al. 2020"; SysBinder with "group
number two"; STEVE's "additional transformer encoder block to bridge current and subsequent queries"), A.5 (random
query initialization: trainable Gaussian means, one shared non-trainable sigma, cosine-annealed from 1 to 0 over
training, 0 at evaluation; video: queries from the first frame's bounding boxes through a 2-layer MLP). The features
F come from the primary encoder phi_e (encoders.py); the slots go to the decoder phi_d (decoders.py).

Notation (paper -> code): F `features` (b, n, d_in) with n = h*w; S0 `queries` (b, s, d); S `slots` (b, s, d);
M `masks` (b, s, h, w) = the attention of the last iteration. Letters: b batch, s slots, n inputs, d channels.

Reading order: attend and SlotAttention; SysBinder (and BlockCoupling, how a decoder reads its blocks);
GaussianQueries, BoxQueries (with the box prior) and Predictor (video).

`bilevel=True` (train_ocl.py --bilevel) adds the truncated-gradient trick of BO-QSA that the authors' code uses: the
last iteration starts from detached slots, with a straight-through path to the queries; off by default, as in
Locatello et al.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Slot Attention (Locatello et al. 2020): phi_sa of Sect. 3.1


def attend(q, k, v, eps=1e-8, prior=None):
    """One Slot Attention read-out: logits between slot queries q (b, s, d) and input keys k (b, n, d), softmax
    over SLOTS (slots compete for each input), then each slot's update is the attention-weighted MEAN of the values
    v (b, n, d). prior: None or a log-prior (b, s, n) added to the logits. Returns updates (b, s, d) and the
    attention (b, s, n), which sums to 1 over slots."""
    logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # (b, s, n)
    attn = (logits if prior is None else logits + prior).softmax(dim=1)  # (b, s, n)
    weights = (attn + eps) / (attn + eps).sum(dim=2, keepdim=True)  # weighted mean over inputs
    return weights @ v, attn  # (b, s, d), (b, s, n)


class SlotAttention(nn.Module):
    """Slot Attention (Locatello et al. 2020): (S0 (b, s, d), F (b, n, d_in)) -> slots (b, s, d), masks (b, s, n).

    Each iteration: attention logits between slot queries and input keys; softmax over SLOTS (slots compete
    for each input, which is what makes them bind to different objects); each slot's update is the attention-
    weighted MEAN of the values; a GRU merges the update into the slot; a residual MLP refines it.
    """

    def __init__(self, dim, input_dim, iters=3, hidden=None, eps=1e-8, bilevel=False):
        super().__init__()
        self.dim, self.iters, self.eps, self.bilevel = dim, iters, eps, bilevel
        self.norm_inputs, self.norm_slots, self.norm_mlp = nn.LayerNorm(input_dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(input_dim, dim, bias=False)
        self.to_v = nn.Linear(input_dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        hidden = hidden or 2 * dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, queries, inputs, prior=None):
        """prior: None, or a log-prior (b, s, n) added to every iteration's attention logits (--box-prior)."""
        b, s, d = queries.shape
        inputs = self.norm_inputs(inputs)  # (b, n, d_in)
        k, v = self.to_k(inputs), self.to_v(inputs)  # (b, n, d) each, computed once for all iterations
        slots = queries
        for i in range(self.iters):
            if self.bilevel and i == self.iters - 1:  # authors: BO-QSA's truncated gradient, off by default (--bilevel)
                # BO-QSA: no gradient through the earlier iterations, a straight-through one to the queries
                slots = slots.detach() + queries - queries.detach()
            prev = slots
            updates, attn = attend(self.to_q(self.norm_slots(slots)), k, v, self.eps, prior)  # (b, s, d), (b, s, n)
            # EXERCISE: slot-update (EXERCISES.md 9): slots = prev + updates instead of the GRU
            slots = self.gru(updates.reshape(b * s, d), prev.reshape(b * s, d)).view(b, s, d)  # (b, s, d)
            slots = slots + self.mlp(self.norm_mlp(slots))  # (b, s, d)
        return slots, attn  # attn of the last iteration: (b, s, n), sums to 1 over slots


# -----------------------------------------------------------------------------
# SysBinder's block-slot attention: the paper's competitor (Tab. 1-2)


class SysBinder(nn.Module):
    """Block-slot attention (SysBinder, Singh et al. 2022b), the paper's first competitor (Tab. 1-2, A.3: "group
    number two" = 2 blocks per slot), as its authors' code has it: (S0 (b, s, d), F (b, n, d_in)) -> slots (b, s, d),
    masks (b, s, n). Same interface as SlotAttention.

    A slot is M blocks of d/M channels. Each iteration reads the inputs as Slot Attention does (`attend`: the blocks
    meet only there, in the attention logits over the whole slot), then block by block, with nothing shared between
    blocks:
    1. update: block m of the update goes through block m's own GRU (the original's block-diagonal GRU) and a
       residual MLP after a non-affine LayerNorm of the block (`mlp_hidden` channels over all blocks; the original's
       192);
    2. binding: block m becomes an attention-weighted mixture of its K prototypes: the prototype parameters pass
       through an MLP (the original's 3 hidden layers of 4 x d/M), memory and block are LayerNormed per block without
       affine parameters, and the block is replaced by the attention read-out of the NORMALISED memory, so every
       block lies in the convex hull of its unit-variance prototypes.
    The blocks of a slot are coupled once, after the iterations, in the decoder's input (BlockCoupling). Masks are
    the attention of the last iteration, as Slot Attention's.
    """

    def __init__(self, dim, input_dim, iters=3, blocks=2, prototypes=64, mlp_hidden=192, eps=1e-8):
        super().__init__()
        if dim % blocks or mlp_hidden % blocks:
            raise ValueError(f"SysBinder: {blocks} blocks must divide the slot width ({dim}) and the MLP's width "
                             f"({mlp_hidden}): give --slot-dim a multiple of {blocks}")
        self.dim, self.iters, self.blocks, self.eps = dim, iters, blocks, eps
        db = dim // blocks  # channels per block
        self.norm_inputs, self.norm_slots = nn.LayerNorm(input_dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(input_dim, dim, bias=False)
        self.to_v = nn.Linear(input_dim, dim, bias=False)
        self.grus = nn.ModuleList(nn.GRUCell(db, db) for _ in range(blocks))  # 1. one GRU and one MLP per block
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(db, mlp_hidden // blocks), nn.ReLU(),
                                                nn.Linear(mlp_hidden // blocks, db)) for _ in range(blocks))
        self.prototypes = nn.Parameter(nn.init.trunc_normal_(torch.empty(prototypes, blocks, db)))  # 2. (K, M, d/M)
        self.prototype_mlp = nn.Sequential(nn.Linear(db, 4 * db), nn.ReLU(), nn.Linear(4 * db, 4 * db), nn.ReLU(),
                                           nn.Linear(4 * db, 4 * db), nn.ReLU(), nn.Linear(4 * db, db))

    def block_norm(self, x):
        """LayerNorm of every block of x (..., M, d/M) on its own, without affine parameters (the original's
        BlockLayerNorm)."""
        return F.layer_norm(x, x.shape[-1:])

    def memory(self):
        """The prototypes as the blocks read them: through the MLP, then normalised per block, (M, K, d/M)."""
        return self.block_norm(self.prototype_mlp(self.prototypes)).transpose(0, 1)  # (M, K, d/M)

    def update(self, updates, prev):
        """One iteration's update of the slots prev (b, s, d) by the attention read-out `updates` (b, s, d): block
        by block GRU, residual MLP and binding to the prototypes. Block m of the result depends on block m of its
        inputs only."""
        b, s, d = prev.shape
        m, db = self.blocks, d // self.blocks
        u, p = updates.reshape(b * s, m, db), prev.reshape(b * s, m, db)  # the blocks
        blocks = torch.stack([self.grus[j](u[:, j], p[:, j]) for j in range(m)], dim=1)  # 1. (b*s, m, d/M)
        normed = self.block_norm(blocks)
        blocks = blocks + torch.stack([self.mlps[j](normed[:, j]) for j in range(m)], dim=1)  # (b*s, m, d/M)
        memory = self.memory()  # 2. (m, K, d/M)
        logits = torch.einsum("xmc,mkc->xmk", self.block_norm(blocks), memory) / math.sqrt(db)  # (b*s, m, K)
        blocks = torch.einsum("xmk,mkc->xmc", logits.softmax(dim=-1), memory)  # mixtures of the normalised memory
        return blocks.reshape(b, s, d)  # (b, s, d)

    def forward(self, queries, inputs, prior=None):
        inputs = self.norm_inputs(inputs)  # (b, n, d_in)
        k, v = self.to_k(inputs), self.to_v(inputs)  # (b, n, d) each
        slots = queries
        for _ in range(self.iters):
            updates, attn = attend(self.to_q(self.norm_slots(slots)), k, v, self.eps, prior)  # (b, s, d), (b, s, n)
            slots = self.update(updates, slots)  # (b, s, d)
        return slots, attn  # attn of the last iteration: (b, s, n), sums to 1 over slots


class BlockCoupling(nn.Module):
    """SysBinder's decoder input: the M blocks of every slot become M tokens of width `dim`, coupled once (Singh et
    al.'s block coupler): each block projected on its own, plus a learned position per block (through a block-wise
    MLP), then one 4-head transformer layer over the M tokens of a slot with a final LayerNorm (SinghEncoderLayer).
    slots (b, s, d) -> tokens (b, s * M, dim), which the decoder cross-attends to instead of the s slots."""

    def __init__(self, slot_dim, dim, blocks=2, heads=4):
        super().__init__()
        self.blocks, self.dim = blocks, dim
        db = slot_dim // blocks
        self.proj = nn.ModuleList(nn.Linear(db, dim) for _ in range(blocks))  # block m -> token m
        self.block_pos = nn.Parameter(torch.zeros(blocks, dim))  # (M, dim), through the block-wise MLP
        self.pos_mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
                                      for _ in range(blocks))
        self.layer = SinghEncoderLayer(dim, heads)  # the original's 1-layer coupler with its final LayerNorm

    def forward(self, slots):
        b, s, d = slots.shape
        parts = slots.reshape(b * s, self.blocks, d // self.blocks)  # (b*s, M, d/M)
        pos = torch.stack([mlp(p) for mlp, p in zip(self.pos_mlps, self.block_pos)])  # (M, dim)
        x = torch.stack([proj(parts[:, j]) for j, proj in enumerate(self.proj)], dim=1) + pos  # (b*s, M, dim)
        return self.layer(x).reshape(b, s * self.blocks, self.dim)  # the blocks of a slot attend: (b, s*M, dim)


# -----------------------------------------------------------------------------
# Query initialization (A.5): S0 for images and for the first frame of a video; STEVE's predictor for the next frames


class GaussianQueries(nn.Module):
    """Random query initialization of A.5: S0 = mu + sigma * N(0, I).

    mu (1, s, d): one trainable mean per slot. sigma: one scalar shared by all slots and channels, not trained;
    the training loop anneals it with a cosine from 1 to 0 (train_ocl.sigma_at) and evaluation uses 0 (the
    authors' code learns a per-slot sigma instead; this follows the paper). The sample is mu + sigma * noise, so
    the gradient reaches mu whatever sigma is (a sample drawn any other way can cut it off).
    """

    def __init__(self, num_slots, dim):
        super().__init__()
        self.mu = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, num_slots, dim)))  # (1, s, d)

    def forward(self, batch_size, sigma=0.0):
        mu = self.mu.expand(batch_size, -1, -1)  # (b, s, d)
        if sigma == 0:
            return mu
        return mu + sigma * torch.randn_like(mu)  # (b, s, d)


class BoxQueries(nn.Module):
    """Box-conditioned query initialization for video (A.5, as in SAVi and STEVE): the bounding boxes of the objects
    in the FIRST frame, normalised by the frame size, (x0, y0, x1, y1), each through a 2-layer MLP with GELU to a
    query, S0 (b, s, d). Each visible object's slot comes with its box, so slots start with an identity, if the MLP
    learns to point a query at its box; where it does not, `prior`, the box prior on frame 0's attention
    (--box-prior, ours), gives each box slot its box (results/2026-11-26-video-preset.md measures both).
    The box enters the MLP as 2 * box - 1 (centred, so that different boxes do not share a large common input; ours).
    The box queries get no noise, as in SAVi: the annealed noise at sigma 1 is larger than what the MLP makes of a
    box, and with it slots change objects between frames more often.

    Slots without a box (more slots than objects in the first frame: the background, and spares for objects that
    enter later), boxless="gaussian" (ours): learned per-slot queries, the image model's GaussianQueries (trainable
    means, the annealed sigma). boxless="zero" (the authors'): the MLP of the zero box, and every box enters the MLP
    as it is (not centred); this makes the box-less slots identical: identical slots split the same pixels between
    them, and the model can collapse onto them.
    Boxes are compacted: the slots of the visible objects come first, in record order, then the box-less ones.
    More visible objects than s - 1: the s - 1 largest keep their boxes, so that one slot always starts free for the
    background (MOVi-E: up to 23 objects, 21 slots; the authors' code stops with an assertion there).
    """

    def __init__(self, num_slots, dim, boxless="gaussian"):
        super().__init__()
        if boxless not in ("gaussian", "zero"):
            raise ValueError(f"unknown --boxless '{boxless}'; choose gaussian (ours) or zero (the authors')")
        self.num_slots = num_slots
        self.mlp = nn.Sequential(nn.Linear(4, dim), nn.GELU(), nn.Linear(dim, dim))
        # the queries of slots without a box: Gaussian queries (ours), or (None) the MLP of the zero box (authors)
        self.free = GaussianQueries(num_slots, dim) if boxless == "gaussian" else None

    def slot_boxes(self, boxes):
        """boxes (b, K, 4) of the first frame, zeros where an object is not visible -> the box of each slot (b, s, 4)
        (zeros for box-less slots) and which slots have one (b, s) bool, in the compacted order above."""
        b, k = boxes.shape[:2]
        s = self.num_slots
        area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).clamp(min=0)  # (b, K), 0: none
        # ours: past s - 1 objects the largest keep their boxes (authors: an assertion)
        top = area.argsort(dim=1, descending=True, stable=True)[:, :s - 1]  # (b, m) the largest, m = min(K, s-1)
        visible = area.gather(1, top) > 0  # (b, m)
        top = top.gather(1, torch.where(visible, top, top + k).argsort(dim=1))  # visible first, in record order
        visible = area.gather(1, top) > 0  # (b, m)
        m = top.shape[1]
        chosen = boxes.gather(1, top[..., None].expand(-1, -1, 4)) * visible[..., None]  # (b, m, 4)
        return F.pad(chosen, (0, 0, 0, s - m)), F.pad(visible, (0, s - m))  # (b, s, 4), (b, s)

    def forward(self, boxes, sigma=0.0):
        """boxes (b, K, 4) of the first frame, zeros where an object is not visible -> queries (b, s, d). sigma: the
        annealed noise of the box-less slots' Gaussian queries; the box queries get none."""
        chosen, visible = self.slot_boxes(boxes)  # (b, s, 4), (b, s)
        if self.free is None:  # authors: every slot the MLP of its box as it is, a box-less slot the zero box's
            return self.mlp(chosen)  # (b, s, d)
        m = min(boxes.shape[1], self.num_slots - 1)  # slots that may have a box
        # ours: boxes centred as 2 * box - 1; no noise on box queries (as SAVi)
        boxed = F.pad(self.mlp(2 * chosen[:, :m] - 1), (0, 0, 0, self.num_slots - m))  # (b, s, d), boxes in [-1, 1]
        # ours: box-less slots start from Gaussian queries (authors: the zero box)
        return torch.where(visible[..., None], boxed, self.free(len(boxes), sigma))  # (b, s, d)

    def prior(self, boxes, grid):  # ours: the box prior on frame 0 (--box-prior / --no-box-prior)
        """The box prior on frame 0's attention (--box-prior, ours): a log-prior (b, s, h*w) to add to Slot
        Attention's logits. A slot that starts from a box may take only the feature cells that its box overlaps
        (0 there, -1e4 elsewhere: exp(-1e4) = 0 in every float type); box-less slots (the background, spares) may take
        any cell (0). One slot is always box-less (see above), so every cell has a slot that may take it."""
        chosen, visible = self.slot_boxes(boxes)  # (b, s, 4), (b, s)
        h, w = grid
        ys, xs = torch.arange(h, device=boxes.device), torch.arange(w, device=boxes.device)
        # cell (i, j) covers [j/w, (j+1)/w] x [i/h, (i+1)/h]; it overlaps the box where the intervals overlap
        in_x = (xs / w < chosen[..., 2:3]) & ((xs + 1) / w > chosen[..., 0:1])  # (b, s, w)
        in_y = (ys / h < chosen[..., 3:4]) & ((ys + 1) / h > chosen[..., 1:2])  # (b, s, h)
        inside = (in_y[..., :, None] & in_x[..., None, :]).flatten(2)  # (b, s, h*w)
        allowed = inside | ~visible[..., None]  # (b, s, h*w)
        return torch.zeros(allowed.shape, device=boxes.device).masked_fill(~allowed, -1e4)  # (b, s, h*w)


class Predictor(nn.Module):
    """STEVE's transition (A.3: "an additional transformer encoder block to bridge current and subsequent queries"):
    the slots of frame t, (b, s, d), attend to each other in one transformer encoder layer and become the queries of
    frame t+1. It sees only frame t's slots, so the recurrence is causal: frame t's slots depend on frames 0..t alone.
    Three layers under one name (--predictor):

    "authors": the authors' `transit`, torch's layer as they configure it: post-norm, no biases, GELU, FFN 4d,
    dropout 0.1.
    "steve": STEVE's own (Singh et al. 2022c): SinghEncoderLayer, its input normalised first, a ReLU FFN and a final
    LayerNorm.
    "ours": pre-norm (x + attn(LN(x)), as STEVE's blocks) with the authors' GELU, FFN 4d and dropout, and its two
    residual branches (the attention's output projection, the FFN's second linear map) starting at zero, so that
    at initialization the queries of frame t+1 ARE the slots of frame t (Fixup and ReZero start residual branches at
    zero too): each slot starts by following its own object, and training learns what to change. A post-norm
    layer can map all slots of a frame to one query, and a layer initialised as usual can grow to add one vector
    to every slot, so that every frame is segmented from scratch (results/2026-11-26-video-preset.md).
    """

    def __init__(self, dim, heads=4, dropout=0.1, kind="ours"):
        super().__init__()
        if kind == "steve":
            self.layer = SinghEncoderLayer(dim, heads, dropout)
        elif kind == "authors":
            self.layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True,
                                                    norm_first=False, bias=False)
        elif kind == "ours":
            self.layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True,
                                                    norm_first=True)  # ours: pre-norm (authors: post-norm)
            # ours: the residual branches start at zero
            for residual in (self.layer.self_attn.out_proj, self.layer.linear2):  # the predictor starts as identity
                nn.init.zeros_(residual.weight)
                nn.init.zeros_(residual.bias)
        else:
            raise ValueError(f"unknown --predictor '{kind}'; choose authors, steve or ours")

    def forward(self, slots):
        return self.layer(slots)  # (b, s, d)


class SinghEncoderLayer(nn.Module):
    """One transformer encoder layer as Singh et al.'s codes have it (STEVE's predictor, SysBinder's block coupler):
    the input is normalised first and the attention (4 heads, no biases) adds to the normalised input, then a
    pre-norm ReLU FFN of 4 x dim, then a final LayerNorm. x (b, n, dim) -> (b, n, dim)."""

    def __init__(self, dim, heads=4, dropout=0.0):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, bias=False, batch_first=True)
        self.norm_ffn, self.norm_out = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = self.norm_in(x)  # (b, n, dim)
        x = x + self.drop(self.attn(x, x, x, need_weights=False)[0])
        x = x + self.ffn(self.norm_ffn(x))
        return self.norm_out(x)  # (b, n, dim)
