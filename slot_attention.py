"""Pixels to slots: the primary encoder, the query initializer and Slot Attention.

Paper: "Multi-Scale Fusion for Object Representation" (Zhao et al., ICLR 2025), Sect. 3.1 (phi_e: T -> F,
phi_sa: (S0, F) -> (S, M)), A.3 ("Slot Attention: we adhere to the standard design outlined in Locatello et al.
2020"), A.5 (random query initialization: trainable Gaussian means, one shared non-trainable sigma, cosine-annealed
from 1 to 0 over training, 0 at evaluation). Ablations of Sect. 4.3 use "naive CNN (Kipf et al., 2022) as the
primary encoder", which is our default.

Notation (paper -> code): F `features` (b, n, d_in) with n = h*w; S0 `queries` (b, s, d); S `slots` (b, s, d);
M `masks` (b, s, h, w) = the attention of the last iteration. Letters: b batch, s slots, n inputs, d channels.

Reading order: CNNEncoder (+ soft position embedding), GaussianQueries, SlotAttention.

Differences: the naive CNN of Kipf et al. runs four 5x5 convolutions at full resolution (the authors' CNN branch
gives 128x128 features at 128 px: `stride=1`, the `--size paper` default). A 2-core CPU cannot afford that, so the
CPU size reads overlapping 4x4 windows 2 px apart (`stride=2`: masks at H/2); `stride=4` gives SLATE's 4x4 patches
(masks at H/4). What each costs and scores on the built-in dataset is in the README ("How the CPU quick start was
tuned"). `bilevel=True` (train_ocl.py --bilevel) adds the truncated-gradient trick of BO-QSA that the authors'
code uses: the last iteration starts from detached slots, with a straight-through path to the queries. It is off
by default, as in Locatello et al. The DINO big-little encoder of A.3 (frozen DINO + naive CNN, summed) belongs
next to CNNEncoder; the line of train_ocl.OCL that builds the encoder is where it will be chosen.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def position_grid(h, w, device=None):
    """(h, w, 4) coordinates [y, x, 1 - y, 1 - x] in [0, 1] of each cell (Locatello et al.'s soft position grid)."""
    ys = torch.linspace(0, 1, h, device=device)
    xs = torch.linspace(0, 1, w, device=device)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)  # (h, w, 2)
    return torch.cat([grid, 1 - grid], dim=-1)  # (h, w, 4)


class CNNEncoder(nn.Module):
    """The naive CNN primary encoder phi_e: T (b, 3, H, W) -> F (b, (H/r)*(W/r), d), plus the grid size (h, w).

    A first convolution with stride r (4: one cell per 4x4 patch; 2: overlapping 4x4 windows; 1: 3x3 at full
    resolution), then two 3x3 convolutions (64 channels), ReLU between the three but none after the last; a
    learned linear map of the position grid is added to every cell (soft position embedding); then LayerNorm and a
    two-layer MLP per cell. Masks come out at H/r. Locatello et al. put a ReLU after their last convolution too;
    here the features stay signed when the position embedding is added, and the LayerNorm + MLP after it are the
    nonlinearity (every number in the README was measured this way; a ReLU there is a one-line exercise).
    """

    def __init__(self, out_dim, channels=64, stride=4):
        super().__init__()
        first = {1: (3, 1), 2: (4, 1), 4: (4, 0)}  # stride -> (kernel, padding) of the first convolution
        if stride not in first:
            raise ValueError(f"encoder stride {stride}: choose 4 (masks at H/4), 2 (H/2) or 1 (full resolution)")
        ch, r, (k, pad) = channels, stride, first[stride]
        self.convs = nn.Sequential(
            nn.Conv2d(3, ch, k, stride=r, padding=pad), nn.ReLU(),  # (b, ch, H/r, W/r)
            nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(),
            # EXERCISE: encoder-relu (EXERCISES.md 8): add nn.ReLU() after this last convolution, as Locatello et al.
            nn.Conv2d(ch, ch, 3, padding=1),  # (b, ch, H/r, W/r); at r = 2 a cell sees 12 px across
        )
        self.pos = nn.Linear(4, ch)  # soft position embedding
        self.norm = nn.LayerNorm(ch)
        self.mlp = nn.Sequential(nn.Linear(ch, ch), nn.ReLU(), nn.Linear(ch, out_dim))

    def forward(self, image):
        f = self.convs(image)  # (b, ch, h, w)
        b, ch, h, w = f.shape
        f = f.permute(0, 2, 3, 1) + self.pos(position_grid(h, w, f.device))  # (b, h, w, ch)
        f = self.mlp(self.norm(f.reshape(b, h * w, ch)))  # (b, n, d)
        return f, (h, w)


class GaussianQueries(nn.Module):
    """Random query initialization of A.5: S0 = mu + sigma * N(0, I).

    mu (1, s, d): one trainable mean per slot. sigma: one scalar shared by all slots and channels, not trained;
    the training loop anneals it with a cosine from 1 to 0 and evaluation uses 0 (the authors' code learns a
    per-slot sigma instead; we follow the paper). The sample is mu + sigma * noise, so the gradient reaches mu
    whatever sigma is (several peers sampled in a way that cut it off).
    """

    def __init__(self, num_slots, dim):
        super().__init__()
        self.mu = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, num_slots, dim)))  # (1, s, d)

    def forward(self, batch_size, sigma=0.0):
        mu = self.mu.expand(batch_size, -1, -1)  # (b, s, d)
        if sigma == 0:
            return mu
        return mu + sigma * torch.randn_like(mu)  # (b, s, d)


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

    def forward(self, queries, inputs):
        b, s, d = queries.shape
        inputs = self.norm_inputs(inputs)  # (b, n, d_in)
        k, v = self.to_k(inputs), self.to_v(inputs)  # (b, n, d) each, computed once for all iterations
        slots = queries
        for i in range(self.iters):
            if self.bilevel and i == self.iters - 1:
                # BO-QSA: no gradient through the earlier iterations, a straight-through one to the queries
                slots = slots.detach() + queries - queries.detach()
            prev = slots
            q = self.to_q(self.norm_slots(slots))  # (b, s, d)
            logits = q @ k.transpose(1, 2) / math.sqrt(d)  # (b, s, n)
            attn = logits.softmax(dim=1)  # softmax over slots: competition for every input
            weights = (attn + self.eps) / (attn + self.eps).sum(dim=2, keepdim=True)  # weighted mean over inputs
            updates = weights @ v  # (b, s, d)
            # EXERCISE: slot-update (EXERCISES.md 9): slots = prev + updates instead of the GRU
            slots = self.gru(updates.reshape(b * s, d), prev.reshape(b * s, d)).view(b, s, d)  # (b, s, d)
            slots = slots + self.mlp(self.norm_mlp(slots))  # (b, s, d)
        return slots, attn  # attn of the last iteration: (b, s, n), sums to 1 over slots
