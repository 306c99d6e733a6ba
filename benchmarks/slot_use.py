"""Does a trained decoder use its slots? The decoder's loss on the same images with each image's own slots, with
another image's slots (the batch rolled by one) and with all-zero slots, on the same targets and the same noise. A
decoder that reconstructs as well from another image's slots has learnt to do without them, and then nothing pushes
Slot Attention to bind objects. SlotDiffusion: per diffusion time step t (which noise levels carry the slot signal);
SLATE: the cross-entropy of the code indices. Also how the slots split each image (Slot Attention's masks).

Run: python benchmarks/slot_use.py --ckpt runs/ocl_shapes_diffusion_msf/best.pt [--images 64] [--timesteps 0,100,500]
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import decoders  # noqa: E402
import ocl  # noqa: E402
import checkpoints  # noqa: E402
import train_common  # noqa: E402


@torch.no_grad()
def slot_use(model, images, timesteps=(0, 25, 100, 250, 500, 750, 999), seed=0):
    """images (b, 3, H, W), b >= 2 -> {"rows": [(label, own, other, zero)], "cover", "largest"}: the decoder's loss
    with own / another image's / zero slots (diffusion: one row per time step t, the same noise for the three), the
    mean number of slots that hold > 5% of an image's cells and the mean share of the largest slot."""
    indices, xs = model.targets(images)
    slots, masks = model.encode(images)  # the query means, as at evaluation: (b, s, d), (b, s, h, w)
    contexts = [model.context(s) for s in (slots, slots.roll(1, 0), torch.zeros_like(slots))]
    # with --mask-gate the slots reach the UNet through their masks too: own slots with their masks, another image's
    # with that image's masks, zero slots with uniform masks (under which the gate changes nothing)
    gates = [masks, masks.roll(1, 0), torch.full_like(masks, 1.0 / masks.shape[1])]  # (b, s, h, w) each
    rows = []
    if model.decoder_kind == "diffusion":
        dec = model.decoder
        x0 = xs[0] * dec.scale  # (b, c, h, w) as the decoder trains on it
        g = torch.Generator().manual_seed(seed)
        for t in timesteps:
            tt = torch.full((x0.shape[0],), t, dtype=torch.long)  # (b,)
            noise = torch.randn(x0.shape, generator=g)  # (b, c, h, w), shared by the three contexts
            xt = decoders.q_sample(x0, tt, noise, dec.alpha_bar)
            target = noise if dec.prediction == "eps" else x0  # what the decoder was trained to predict
            rows.append((f"t = {t}", *(F.mse_loss(dec.unet(xt, tt, c, dec._gate(m)), target).item()
                                       for c, m in zip(contexts, gates))))
    elif model.decoder_kind == "transformer":
        rows.append(("cross-entropy", *(model.decoder.loss(model.decoder(xs, c), indices).item() for c in contexts)))
    else:
        raise SystemExit(f"--ckpt: a {model.decoder_kind} decoder; this measures the transformer or diffusion decoder")
    flat = masks.flatten(2)  # (b, s, n)
    share = F.one_hot(flat.argmax(1), flat.shape[1]).float().mean(1)  # (b, s): each slot's share of the cells
    return {"rows": rows, "cover": (share > 0.05).sum(1).float().mean().item(),
            "largest": share.max(1).values.mean().item()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="an OCL checkpoint (SLATE or SlotDiffusion, images)")
    p.add_argument("--data-root", default=None, help="default: the run's")
    p.add_argument("--split", default="val")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--timesteps", default="0,25,100,250,500,750,999", help="diffusion time steps to measure")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model, ckpt = ocl.load_ocl(checkpoints.load_checkpoint(args.ckpt, "ocl"))
    if model.video:
        raise SystemExit("--ckpt: a video model; this measures image models")
    a = ckpt["args"]
    ds = data.load_dataset(a["dataset"], args.split, args.data_root or a["data_root"])
    if min(args.images, len(ds)) < 2:  # with one image, "another image's slots" would be its own
        raise SystemExit(f"--images {args.images} of {a['dataset']}/{args.split} ({len(ds)} there): another image's "
                         f"slots need 2 or more; give --images 2 or more")
    images = torch.stack([torch.as_tensor(ds[i]["image"]) for i in range(min(args.images, len(ds)))])
    out = slot_use(model, images, [int(t) for t in args.timesteps.split(",")], args.seed)
    print(f"{args.ckpt}: {model.decoder_kind} decoder, {len(images)} {a['dataset']}/{args.split} images")
    print("| | own slots | another image's slots | zero slots | another / own |\n|---|---|---|---|---|")
    for label, own, other, zero in out["rows"]:
        print(f"| {label} | {own:.4f} | {other:.4f} | {zero:.4f} | {other / own:.3f} |")
    print(f"slots holding > 5% of an image: {out['cover']:.2f} on average; the largest slot holds "
          f"{100 * out['largest']:.1f}% of an image")
    return out


if __name__ == "__main__":
    main()
