"""The VAE of stage 1: encoder/decoder, codebook matching and selection, grouped codebooks (GDR) with the
invertible projection, and the single-scale VQ-VAE baseline.

Paper: "Multi-Scale Fusion for Object Representation" (Zhao et al., ICLR 2025), Sect. 3.1 (Eq. 1-2),
Appendix A.3 (4x down/up-sampling VAE; code dim c = 256 for transformer guidance, 4 for diffusion guidance;
4096 codes; GDR's annealed residual connection, Gumbel sampling in code matching, code-replacing trick).

Notation (paper -> code): T image (b, 3, H, W); Z continuous representation `z` (b, c, h, w) with h = H/4;
C codebook (m, c); P matching probabilities `probs` (b, m, h, w); I indices `idx` (b, h, w);
X discrete representation `x` (b, c, h, w). Letters: b batch, c channels, m codes, g groups, h, w token grid.

Reading order: Encoder/Decoder, match/select (Eq. 1-2), straight_through, Codebook (usage + code
replacement), init_projection/pinv (W and pinv(W)), quantize_grouped, VQVAE (kinds "vqvae" and "gdr").
The multi-scale VAE (image pyramid + fusion) is in msf.py and reuses everything here.

Differences from the paper: the encoder/decoder is a small residual CNN sized for a CPU (`channels`, default
64), not SLATE's exact dVAE; the code-replacing trick is designed here (the paper names it, the authors'
public code has none), see Codebook.replace_dead.
"""

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Encoder and decoder: 4x spatial down/up-sampling (A.3)


class ResBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x))))))"""

    def __init__(self, ch):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):  # ours: a small residual CNN sized for a CPU, 4x down (the paper: SLATE's dVAE)
    """T (b, 3, H, W) -> Z (b, c, H/4, W/4). Two strided convolutions, then the residual blocks run at H/4,
    where compute is 16x cheaper than at full resolution (this is what makes CPU training practical)."""

    def __init__(self, code_dim, channels=64):
        super().__init__()
        ch = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, ch // 2, 4, stride=2, padding=1), nn.SiLU(),  # (b, ch/2, H/2, W/2)
            nn.Conv2d(ch // 2, ch, 4, stride=2, padding=1),  # (b, ch, H/4, W/4)
            ResBlock(ch), ResBlock(ch),
            nn.GroupNorm(8, ch), nn.SiLU(),
            nn.Conv2d(ch, code_dim, 1),  # (b, c, H/4, W/4)
            # ours: Z standardised per sample (zero mean, unit variance, no learnable scale; the authors' code pulls
            # Z there with an extra loss): codes live on a fixed scale, and the encoder cannot run away from them
            # once the residual is annealed
            nn.GroupNorm(1, code_dim, affine=False),
        )

    def forward(self, image):
        return self.net(image)


class Decoder(nn.Module):
    """X (b, c, h, w) -> T' (b, 3, 4h, 4w), the mirror of the encoder with transposed convolutions."""

    def __init__(self, code_dim, channels=64):
        super().__init__()
        ch = channels
        self.net = nn.Sequential(
            nn.Conv2d(code_dim, ch, 1),  # (b, ch, h, w)
            ResBlock(ch), ResBlock(ch),
            nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1),  # (b, ch/2, 2h, 2w)
            ResBlock(ch // 2),
            nn.GroupNorm(8, ch // 2), nn.SiLU(),
            nn.ConvTranspose2d(ch // 2, 3, 4, stride=2, padding=1),  # (b, 3, 4h, 4w)
        )

    def forward(self, x):
        return self.net(x)


# -----------------------------------------------------------------------------
# Codebook matching and selection (Eq. 1-2)

def match(z, codebook, tau=0.0, confidence=False, chunk=2 ** 24, noise=0.0):
    """Eq. 1: P = softmax_m(-||Z - C||^2), I = argmax_m(P).

    z (b, c, h, w), codebook (m, c) -> idx (b, h, w), and with confidence=True also conf (b, h, w), the probability
    P of the chosen code (what Eq. 4 compares across scales); None otherwise.
    With tau > 0 the index is instead sampled from softmax_m(-||Z - C||^2 / tau) by the Gumbel-max trick
    (GDR's Gumbel sampling in code matching, A.3: exploration while the codebook forms); tau = 0 is Eq. 1.
    With noise = std > 0, the authors' stage-2 guidance (--guidance-noise): their gumbel_softmax(std * S, tau=1) with
    S = (-||Z - C|| - mu) / sigma, the plain distance standardised by the mean and std of the chi distribution with
    c degrees of freedom; I is its argmax (a sample of softmax(std * S)) and conf its probability there.
    Matching chooses, it does not learn: no gradient flows through it (losses act on the selected codes).
    Memory: P is never built for all m codes of all tokens (4,096 codes x 65,536 tokens of a paper-size batch would
    be 1 GB per scale): tokens go in chunks of `chunk` / m, and P of the chosen code is exp(logit - logsumexp).
    """
    b, c, h, w = z.shape
    m = codebook.shape[0]
    idx, conf = [], []
    with torch.no_grad(), torch.autocast(z.device.type, enabled=False):  # distances in fp32 even under AMP
        zf = z.detach().float().permute(0, 2, 3, 1).reshape(-1, c)  # (b*h*w, c)
        cb = codebook.detach().float()  # (m, c)
        for zc in zf.split(max(1, chunk // m)):  # (n, c): at most `chunk` distances at a time
            # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, one matmul instead of a (n, m, c) difference tensor
            logits = -(zc.pow(2).sum(1, keepdim=True) - 2 * zc @ cb.t() + cb.pow(2).sum(1))  # (n, m)
            if noise > 0:  # authors: Gumbel-perturbed standardised distance (the shift mu cancels in the softmax)
                logits = -(-logits).clamp(min=0).sqrt() * (noise / chi_std(c)) + gumbel(logits)  # (n, m)
            if tau > 0:
                i = (logits / tau + gumbel(logits)).argmax(dim=1)  # Gumbel-max sample, (n,)
            else:
                i = logits.argmax(dim=1)  # (n,)
            idx.append(i)
            if confidence:  # P of the chosen code = softmax(logits)[i], without the (n, m) softmax
                conf.append((logits.gather(1, i[:, None])[:, 0] - logits.logsumexp(dim=1)).exp())  # (n,)
    idx = torch.cat(idx).view(b, h, w)
    return idx, (torch.cat(conf).view(b, h, w) if confidence else None)


def gumbel(like):
    """Standard Gumbel noise -log(-log u), u ~ U(0, 1), of the shape of `like`: argmax(logits + noise) is a sample of
    softmax(logits) (the Gumbel-max trick)."""
    u = torch.rand_like(like).clamp_(1e-9, 1 - 1e-9)
    return -torch.log(-torch.log(u))


def chi_std(dof):
    """The standard deviation of the chi distribution with `dof` degrees of freedom (the length of a standard normal
    vector of that size): sqrt(dof - mu^2), mu = sqrt(2) Gamma((dof + 1) / 2) / Gamma(dof / 2)."""
    mu = math.sqrt(2) * math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2))
    return math.sqrt(max(dof - mu * mu, 1e-12))


def select(codebook, idx):
    """Eq. 2: X = select_m(C, I), i.e. X[:, :, i, j] = C[I[:, i, j]]. codebook (m, c), idx (b, h, w) -> (b, c, h, w)."""
    return F.embedding(idx, codebook).permute(0, 3, 1, 2)  # codebook[idx]: (b, h, w, c) -> (b, c, h, w)


def straight_through(z, q, alpha=0.0):
    """Decoder input for the continuous z and its quantization q, both (b, c, h, w).

    Forward value: the annealed residual alpha * z + (1 - alpha) * q (GDR, A.3; alpha goes 1 -> 0 during
    pretraining, so the decoder first learns on continuous features and ends on pure codes).
    Backward: identity to z (the straight-through estimator of VQ-VAE: argmin has no gradient).
    """
    residual = alpha * z + (1 - alpha) * q
    return z + (residual - z).detach()


def vq_losses(z, q, beta=0.25, alpha=0.0):
    """VQ-VAE losses: codebook ||sg(z) - q||^2 moves codes to the data; commitment beta ||z - sg(r)||^2 keeps the
    encoder near what the decoder is given, r = alpha z + (1 - alpha) q, the annealed residual (van den Oord et al.
    2017, beta = 0.25; measured against r as in GDR's and the authors' code: while alpha is near 1 the decoder
    reads z itself, and pulling z onto codes it does not use yet would only fight the reconstruction)."""
    # authors: commitment against the annealed residual, as GDR's and the authors' code
    residual = alpha * z + (1 - alpha) * q  # = q without the annealed residual (alpha = 0)
    return F.mse_loss(q, z.detach()), beta * F.mse_loss(z, residual.detach())


# -----------------------------------------------------------------------------
# Codebook with usage tracking and the code-replacing trick


class Codebook(nn.Module):
    """m learnable codes of dimension c, plus what the code-replacing trick needs.

    Code replacing (paper A.3 names it "instead of utilization loss, to improve code utilization"; the
    authors' public code has no implementation, so this is our design):
      * the codes start on data (`init_from`, first training step);
      * training forwards count how many tokens chose each code as their NEAREST code (`hits`; during the Gumbel
        phase the sampled code is used, but usage is judged by what the matching itself would choose), and keep
        `recent`, a uniform random sample of up to 1024 of all continuous vectors this codebook quantized since the
        last replacement (reservoir sampling: every vector seen has the same chance to be in it, whichever scale
        or batch it came from);
      * `replace_dead()`, which the training loop calls every K steps, moves every code that received less than
        `threshold` (3%) of its uniform share of the tokens since the last call onto one of those recent vectors
        (drawn without replacement, plus a little noise), restarts the counts and the sample, and returns which
        codes moved (the loop resets their Adam moments: a new code must not inherit the old one's momentum).
    A dead code thus restarts where the data is, instead of being pushed there by an extra loss. Early in
    training the encoder moves fast and leaves codes behind; this is when most replacements happen.

    Under DistributedDataParallel (torchrun) the data-dependent steps must leave every process with the same codes:
    `init_from` starts on the combined first batch of all processes and `replace_dead` counts the hits of all
    processes; process 0's result is then copied to the others (`_sync_from_rank0`).
    """

    def __init__(self, num_codes, dim, threshold=0.03):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_codes, dim) * 0.1)  # (m, c)
        self.threshold = threshold
        self.pool = 1024  # size of `recent`; train_vae.py sets 0 when code replacing is off (no random draws then)
        self.seen = 0  # vectors observed since the last replacement (the reservoir's denominator)
        self.register_buffer("hits", torch.zeros(num_codes))  # (m,) tokens that chose each code since last check
        self.register_buffer("recent", torch.zeros(0, dim), persistent=False)  # (<=1024, c)
        self.register_buffer("initialised", torch.tensor(False))

    def match(self, z, tau=0.0, groups=1, confidence=False, noise=0.0):
        if self.training and not self.initialised:
            self.init_from(z, groups)
        return match(z, self.weight, tau, confidence, noise=noise)  # (b, h, w), (b, h, w) or None

    def select(self, idx):
        return select(self.weight, idx)  # (b, c, h, w)

    @torch.no_grad()
    def init_from(self, z, groups=1):
        """Data-dependent initialisation: the codes start on randomly chosen continuous vectors of the first
        batch, not at an arbitrary point where one code would win every match. z (groups*b, c, h, w) may stack
        `groups` batches (MSF matches all scales at once); under DDP the batches of all processes are gathered
        and put in the order one process would see: the same codes as a single-process run."""
        if _distributed():  # (groups, b, ...) of every process -> (groups, world*b, ...)
            parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, z.detach().contiguous())
            z = torch.cat([q.unflatten(0, (groups, -1)) for q in parts], dim=1).flatten(0, 1)
        zf = z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (groups*b*h*w, c)
        m = self.weight.shape[0]
        pick = torch.randint(len(zf), (m,), device=zf.device) if len(zf) < m else torch.randperm(len(zf), device=zf.device)[:m]
        self.weight.copy_(zf[pick] + 0.01 * torch.randn_like(zf[pick]))
        self.initialised.fill_(True)
        self._sync_from_rank0()

    @torch.no_grad()
    def observe(self, z, idx, sampled=False):
        """Record that the continuous vectors z (b, c, h, w) were quantized to the codes idx (b, h, w); `sampled`:
        idx were Gumbel samples, so usage is counted on the nearest codes instead."""
        if sampled:
            idx, _ = match(z, self.weight)  # (b, h, w): what Eq. 1 chooses, not what the noise chose
        self.hits += torch.bincount(idx.flatten(), minlength=self.weight.shape[0]).float()
        if self.pool:
            self._reservoir(z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1]))  # (b*h*w, c)

    def _reservoir(self, zf):
        """Algorithm R (Vitter 1985), vectorised: after n vectors, each of them is in `recent` with probability
        pool / n. The first `pool` fill it; vector number k (0-based) then replaces slot r ~ U{0..k} if r < pool,
        a later vector winning a slot that several drew."""
        room = max(0, self.pool - len(self.recent))
        self.recent = torch.cat([self.recent, zf[:room]])  # (<=pool, c)
        rest = zf[room:]  # (k, c)
        if len(rest):
            k = self.seen + room + torch.arange(len(rest), device=zf.device)  # (k,) each vector's 0-based number
            slot = (torch.rand(len(rest), device=zf.device) * (k + 1)).long()  # (k,) uniform in 0..number
            keep = (slot < self.pool).nonzero().flatten()  # (k',) the vectors that enter the sample
            owner = torch.full((self.pool,), -1, dtype=torch.long, device=zf.device)
            owner.scatter_reduce_(0, slot[keep], keep, reduce="amax")  # the last vector to draw a slot keeps it
            filled = (owner >= 0).nonzero().flatten()  # (slots that changed,)
            self.recent[filled] = rest[owner[filled]]
        self.seen += len(zf)

    @torch.no_grad()
    def replace_dead(self):  # ours: code replacing designed here (the paper names it, the authors' code has none)
        """Re-seed the codes that (almost) no token chose since the last call; returns their indices (k,), the same
        on every process."""
        if _distributed():
            dist.all_reduce(self.hits)  # every process sees the hits of all processes
            moved = torch.zeros(self.weight.shape[0], device=self.hits.device)  # (m,) 1 = replaced
            moved[self._replace_dead()] = 1
            self._sync_from_rank0()
            dist.broadcast(moved, 0)  # process 0's choice is the one every process now holds
            return moved.nonzero().flatten()
        return self._replace_dead()

    def _replace_dead(self):
        m, total = self.weight.shape[0], self.hits.sum()
        dead = (self.hits < self.threshold * total / m).nonzero().flatten()  # (k,)
        self.hits.zero_()
        recent, self.recent, self.seen = self.recent, self.recent[:0], 0  # the next sample starts afresh
        k = min(len(dead), len(recent))
        if total == 0 or k == 0:
            return dead[:0]
        dead = dead[torch.randperm(len(dead), device=dead.device)[:k]]
        pick = torch.randperm(len(recent), device=dead.device)[:k]
        noise = 0.01 * recent.std() * torch.randn(k, self.weight.shape[1], device=dead.device)
        self.weight[dead] = (recent[pick] + noise).to(self.weight.dtype)
        return dead

    def pool_state(self):
        """What the code-replacing trick carries from step to step, for last.pt (exact resume). Each process has its
        own: its counts since the last replacement (`hits`, summed over processes only when codes are replaced) and
        its sample of recent vectors."""
        return {"recent": self.recent.cpu(), "seen": self.seen, "hits": self.hits.cpu()}

    def load_pool_state(self, state):
        self.recent, self.seen = state["recent"].to(self.weight.device), int(state["seen"])
        self.hits.copy_(state["hits"])

    def _sync_from_rank0(self):
        if _distributed():
            dist.broadcast(self.weight.data, 0)


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# -----------------------------------------------------------------------------
# The invertible projection of GDR (used by Eq. 3 and Eq. 5)


def init_projection(dim, groups=2):
    """W in R^{(g*c) x c}: Eq. 5 (X = concat(...) W) projects g*c channels down to c, and Eq. 3 projects up
    with its pseudo-inverse pinv(W) in R^{c x (g*c)}. W starts with orthonormal columns (then pinv(W) = W^T);
    pinv(W) W = I_c holds for any W of full column rank, so project-down after project-up returns the input:
    the projection is "invertible" (GDR) and the two copies can be recombined without loss."""
    return nn.Parameter(nn.init.orthogonal_(torch.empty(groups * dim, dim)))  # (g*c, c)


def orthonormal(weight):  # ours: W kept orthonormal, the Q of its QR (the paper and the authors' code: W free)
    """The W that Eq. 3 and Eq. 5 use: the Q of W = QR (orthonormal columns, signs fixed so that diag(R) > 0).

    Why: Eq. 3 and Eq. 5 leave W's scale free, per direction. Scaling W (or one of its directions) by s and the codes
    by 1/s decodes the same X, but the codes live in Z pinv(W), so the codebook and commitment losses shrink by
    1/s^2, and training grows W (results/2026-11-26-stage1-fixes.md). That shrinks the distances of Eq. 1 and
    flattens its probabilities, and with them Eq. 4's comparison of scales and the Gumbel noise. With orthonormal columns every singular value is 1, pinv(W) = W^T,
    Z pinv(W) keeps Z's norm, and every loss and output is the same for any rescaling of W's columns (a test checks
    it); W still learns which c-dimensional subspace of the 2c channels X is read from. At the orthogonal
    initialisation it is W itself. (Ours: GDR and the authors' code leave W free.)
    """
    with torch.autocast(weight.device.type, enabled=False):  # the QR needs fp32
        q, r = torch.linalg.qr(weight.float())  # (g*c, c), (c, c)
        return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)  # the unique Q with diag(R) > 0


@torch.no_grad()
def retract_(weight):
    """Set the trained W to its orthonormal version after an optimizer step. The model does not change (Q of Q is
    Q), but W's raw scale no longer drifts: Adam's steps, orthogonal to what the loss can see, would otherwise grow
    it step by step and shrink the effective learning rate of its orientation."""
    weight.copy_(orthonormal(weight).to(weight.dtype))


def pinv(weight):
    """pinv(W): (g*c, c) -> (c, g*c). Differentiable, so W also learns through the project-up."""
    with torch.autocast(weight.device.type, enabled=False):  # the SVD inside needs fp32
        return torch.linalg.pinv(weight.float())


def project(x, matrix):
    """Right-multiply the channel axis: x (b, k, h, w) @ matrix (k, k') -> (b, k', h, w)."""
    return (x.permute(0, 2, 3, 1) @ matrix.to(x.dtype)).permute(0, 3, 1, 2)  # (b, h, w, k) @ (k, k') -> (b, k', h, w)


def quantize_grouped(z, codebooks, weight=None, tau=0.0, alpha=0.0, noise=0.0):
    """Grouped quantization (GDR). z (b, c, h, w), g codebooks of (m_k, c) each, W (g*c, c) or None.

    With W: project up with pinv(W) to g*c channels, chunk into g groups of c, match each group with its own
    codebook, concatenate the selected codes and project down with W. Without W and with one codebook this is
    the plain VQ-VAE quantizer. Returns indices (b, g, h, w), x (b, c, h, w) carrying the straight-through
    gradient, and `parts` (continuous and quantized halves, for the losses and the figures). noise: the authors'
    stage-2 Gumbel guidance (match).
    """
    g = len(codebooks)
    c = z.shape[1]
    zup = project(z, pinv(weight)) if weight is not None else z  # Eq. 3: (b, g*c, h, w)
    zs = zup.split(c, dim=1)  # g x (b, c, h, w)
    idxs = [cb_match(cb, zk, tau, noise=noise)[0] for cb, zk in zip(codebooks, zs)]  # g x (b, h, w)
    qs = [cb_select(cb, i, zk, tau) for cb, i, zk in zip(codebooks, idxs, zs)]  # g x (b, c, h, w)
    z2, q2 = torch.cat(zs, 1), torch.cat(qs, 1)  # (b, g*c, h, w)
    x = straight_through(z2, q2, alpha)  # (b, g*c, h, w)
    if weight is not None:
        x = project(x, weight)  # Eq. 5 for g groups: (b, c, h, w)
    assert x.shape[1] == c and len(idxs) == g
    return torch.stack(idxs, 1), x, {"z": list(zs), "q": qs}  # (b, g, h, w), (b, c, h, w)


def cb_match(codebook, z, tau, groups=1, confidence=False, noise=0.0):
    """Match against a Codebook module (tracks usage) or a plain (m, c) tensor. `groups`: z stacks that many
    batches along its first dim (MSF's scales), which Codebook.init_from needs to know under DDP."""
    if isinstance(codebook, Codebook):
        return codebook.match(z, tau, groups, confidence, noise)
    return match(z, codebook, tau, confidence, noise=noise)


def cb_select(codebook, idx, z=None, tau=0.0):
    """Select codes; a training Codebook module also records the match of z (its continuous input) for the
    code-replacing trick (tau > 0: idx are Gumbel samples, and usage is counted on z's nearest codes instead)."""
    if not isinstance(codebook, Codebook):
        return select(codebook, idx)
    if z is not None and codebook.training:
        codebook.observe(z, idx, sampled=tau > 0)
    return codebook.select(idx)


# -----------------------------------------------------------------------------
# Single-scale VQ-VAE (kind "vqvae": 4096 codes) and GDR (kind "gdr": 2 groups of 64 codes = 4096 combinations)


class VQVAE(nn.Module):
    """Encoder -> quantizer -> decoder at one scale.

    kind "vqvae": one codebook of `num_codes` (4096) codes of dimension c.
    kind "gdr":   `groups` (2) codebooks of num_codes^(1/groups) (64) codes, invertible projection W (2c, c).
    forward() returns a dict with lists over scales (one scale here) so train_vae.py treats it like MSF.
    """

    def __init__(self, kind="vqvae", code_dim=256, channels=64, num_codes=4096, groups=2):
        super().__init__()
        assert kind in ("vqvae", "gdr"), kind
        self.kind, self.code_dim, self.num_scales = kind, code_dim, 1
        self.encoder, self.decoder = Encoder(code_dim, channels), Decoder(code_dim, channels)
        if kind == "vqvae":
            self.codebooks = nn.ModuleList([Codebook(num_codes, code_dim)])
            self.weight = None
        else:
            per_group = round(num_codes ** (1 / groups))
            self.codebooks = nn.ModuleList([Codebook(per_group, code_dim) for _ in range(groups)])
            self.weight = init_projection(code_dim, groups)  # W (2c, c)
        self.vocab = [cb.weight.shape[0] for cb in self.codebooks]  # classes per index, e.g. [64, 64]

    def projection(self):
        """W as Eq. 3 and 5 use it: with orthonormal columns (orthonormal); None for the plain VQ-VAE."""
        return None if self.weight is None else orthonormal(self.weight)

    def quantize(self, zs, tau=0.0, alpha=0.0, noise=0.0):
        """zs: list with one (b, c, h, w) -> indices [(b, g, h, w)], xs [(b, c, h, w)], parts."""
        idx, x, parts = quantize_grouped(zs[0], list(self.codebooks), self.projection(), tau, alpha, noise)
        return [idx], [x], [parts]

    def forward(self, image, tau=0.0, alpha=0.0):
        return vae_forward(self, [image], tau, alpha)

    @torch.no_grad()
    def guidance(self, image, noise=0.0):
        """Frozen stage-2 guidance: indices [(b, g, h, w)] and discrete representation X [(b, c, h, w)]; noise > 0:
        Gumbel-sampled codes, as the authors' stage 2 (match)."""
        idxs, xs, _ = self.quantize([self.encoder(image)], noise=noise)
        return idxs, xs

    @torch.no_grad()
    def x_from_indices(self, idx, scale=1):
        """X rebuilt from its code indices (b, g, h, w): codebook lookups (Eq. 2), concat and W (Eq. 5)."""
        q = torch.cat([cb.select(idx[:, k]) for k, cb in enumerate(self.codebooks)], 1)  # (b, g*c, h, w)
        return q if self.weight is None else project(q, self.projection())  # (b, c, h, w)


def vae_forward(model, images, tau, alpha, zs=None):
    """Shared by VQVAE and msf.MSFVAE: encode every scale, quantize, decode every scale, add up the losses
    (Sect. 3.2: "there are N sets of reconstruction and quantization losses")."""
    if zs is None:
        zs = [model.encoder(t) for t in images]  # N x (b, c, h_n, w_n)
    idxs, xs, parts = model.quantize(zs, tau, alpha)
    recons = [model.decoder(x) for x in xs]  # N x (b, 3, H_n, W_n)
    logs, loss = {}, 0.0
    for n, (t, r, p) in enumerate(zip(images, recons, parts), start=1):
        mse = F.mse_loss(r, t)
        codebook_loss, commit_loss = 0.0, 0.0
        for zk, qk in zip(p["z"], p["q"]):
            a, b = vq_losses(zk, qk, alpha=alpha)
            codebook_loss, commit_loss = codebook_loss + a, commit_loss + b
        loss = loss + mse + codebook_loss + commit_loss
        logs[f"recon{n}"], logs[f"codebook{n}"], logs[f"commit{n}"] = mse.detach(), codebook_loss.detach(), commit_loss.detach()
    return {"loss": loss, "logs": logs, "recons": recons, "indices": idxs, "xs": xs, "parts": parts}


def count_codebook_params(model):
    """Codebook-related parameters of Sect. 3.4: all codebooks plus the projection W."""
    n = sum(cb.weight.numel() for cb in model.codebooks)
    if getattr(model, "weight", None) is not None:
        n += model.weight.numel()
    return n
