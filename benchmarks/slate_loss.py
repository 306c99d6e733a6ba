"""SLATE's loss in two memory layouts: the transformer decoder's logits token-major (b, h*w, m), as its classifiers
write them and as `decoders.TransformerDecoder` returns them, against code-major (b, m, h, w), the layout of an
image-shaped cross-entropy. The numbers are the same; the cost is not: cross-entropy takes the softmax over the last
dimension of the token-major tensor in place, while the code-major view of the same memory has its classes strided
and is copied first, forward and backward. Over 4,096 codes (the VQ-VAE's guidance) that copy is a large part of the
step on a CPU; over MSF's two groups of 64 it is small.

One timed step is the decoder's forward from the guide tokens and the slots, the loss and its backward (the frozen
VAE and Slot Attention are left out: they are the same in both layouts). Layouts are interleaved, so machine noise
hits both alike; each prints the median of --repeats and the ratio (code-major / token-major), for the step and for
the loss and its backward alone (from the logits as a leaf), and how far the two losses differ.

Run: OMP_NUM_THREADS=1 python benchmarks/slate_loss.py          # the quick start's decoder ("cpu" size)
     python benchmarks/slate_loss.py --size paper --repeats 5
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decoders  # noqa: E402
import ocl  # noqa: E402


def code_major_loss(logits, indices, grids):
    """The same loss with every group's logits viewed as (b, m, h, w) (image-shaped cross-entropy)."""
    per_scale = []
    for lgs, idx, (h, w) in zip(logits, indices, grids):
        per_scale.append(sum(F.cross_entropy(lg.transpose(1, 2).reshape(lg.shape[0], -1, h, w), idx[:, k])
                             for k, lg in enumerate(lgs)))  # (b, m, h, w) against (b, h, w)
    return sum(per_scale) / len(per_scale)


def loss_fn(layout, dec):
    return dec.loss if layout == "token-major" else lambda logits, indices: code_major_loss(logits, indices, dec.grids)


def timed_step(dec, xs, slots, indices, layout):
    """The decoder's forward, the loss and its backward: (seconds, loss)."""
    dec.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss = loss_fn(layout, dec)(dec(xs, slots), indices)  # logits per scale, per group (b, h*w, m)
    loss.backward()
    return time.perf_counter() - start, loss.item()


def timed_loss(dec, logits, indices, layout):
    """The loss and its backward alone, from the logits as a leaf: seconds."""
    leaves = [[lg.detach().requires_grad_() for lg in lgs] for lgs in logits]
    start = time.perf_counter()
    loss_fn(layout, dec)(leaves, indices).backward()
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="cpu", choices=sorted(ocl.SIZES), help="decoder width and depth (ocl.SIZES)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grid", type=int, default=16, help="guide tokens per side (shapes at 64 px: 16)")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1 or args.grid < 1:
        p.error("--repeats, --batch-size and --grid must be at least 1")
    size = ocl.SIZES[args.size]
    torch.manual_seed(0)
    print(f"decoder size {args.size} (dim {size['dec_dim']}, {size['dec_layers']} layer(s)), batch {args.batch_size}, "
          f"{args.grid}x{args.grid} tokens, {torch.get_num_threads()} thread(s); median of {args.repeats}")
    print("| guidance | codes per group | step s, token-major | step s, code-major | step ratio | loss alone ms, "
          "token-major | loss alone ms, code-major | loss ratio | loss difference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, vocab in (("MSF (two groups)", [64, 64]), ("VQ-VAE", [4096])):
        dec = decoders.TransformerDecoder(32, vocab, [(args.grid, args.grid)], size["slot_dim"], size["dec_dim"],
                                          size["dec_layers"], size["dec_heads"])
        xs = [torch.randn(args.batch_size, 32, args.grid, args.grid)]  # one guide scale (b, c, h, w)
        slots = torch.randn(args.batch_size, 7, size["slot_dim"])  # (b, s, d_slot)
        indices = [torch.stack([torch.randint(0, m, (args.batch_size, args.grid, args.grid)) for m in vocab], 1)]
        with torch.no_grad():
            logits = dec(xs, slots)
        layouts = ("token-major", "code-major")
        step, alone, losses = {k: [] for k in layouts}, {k: [] for k in layouts}, {}
        timed_step(dec, xs, slots, indices, "token-major")  # warm-up: first-call allocations
        for _ in range(args.repeats):
            for layout in layouts:
                seconds, losses[layout] = timed_step(dec, xs, slots, indices, layout)
                step[layout].append(seconds)
                alone[layout].append(timed_loss(dec, logits, indices, layout))
        st, sc = (statistics.median(step[k]) for k in layouts)
        at, ac = (statistics.median(alone[k]) * 1000 for k in layouts)
        print(f"| {name} | {'/'.join(map(str, vocab))} | {st:.4f} | {sc:.4f} | {sc / st:.2f} | {at:.2f} | {ac:.2f} | "
              f"{ac / at:.2f} | {abs(losses['token-major'] - losses['code-major']):.1e} |")

if __name__ == "__main__":
    main()
