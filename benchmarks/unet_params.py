"""SlotDiffusion's UNet at the paper's size against the authors' diffusers UNet2DConditionModel: parameter counts,
per part, and whether the two hold the same tensors (the multiset of parameter shapes).

Run:  python benchmarks/unet_params.py            # ours; theirs too where diffusers is installed (pip install diffusers)

The authors' configuration (their SlotDiffusion configs): in/out channels 4, block widths 128-256-384-512, 2 layers
per block, down [DownBlock2D, CrossAttnDownBlock2D x 3], up [CrossAttnUpBlock2D x 3, UpBlock2D], cross-attention
to slots of 256, dropout 0.1, diffusers' defaults for the rest. Without diffusers the script compares ours with the
count diffusers 0.35.1 gives for that configuration, 135,048,452.
"""
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import decoders  # noqa: E402

AUTHORS_COUNT = 135_048_452  # diffusers 0.35.1, UNet2DConditionModel in the configuration above


def authors_unet():
    """The authors' UNet built with diffusers, or None where diffusers is not installed."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        return None
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(128, 256, 384, 512), layers_per_block=2,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), cross_attention_dim=256, dropout=0.1)


def count(module):
    return sum(p.numel() for p in module.parameters())


def main():
    ours = decoders.UNet(4, 256, base=128, layers=2, heads=8)
    parts = {"time embedding": ours.time, "conv_in": ours.conv_in, "down path": ours.down, "middle": ours.mid,
             "up path": ours.up, "out": ours.out}
    print("ours, decoders.UNet at the paper's size:")
    for name, part in parts.items():
        print(f"  {name:<15} {count(part):>12,}")
    print(f"  {'total':<15} {count(ours):>12,}")
    theirs = authors_unet()
    if theirs is None:
        print(f"diffusers is not installed: the authors' UNet has {AUTHORS_COUNT:,} parameters (diffusers 0.35.1); "
              f"ours {'equals' if count(ours) == AUTHORS_COUNT else 'differs from'} it "
              f"({count(ours) - AUTHORS_COUNT:+,})")
        return
    print(f"the authors' diffusers UNet2DConditionModel: {count(theirs):,} parameters; "
          f"ours - theirs: {count(ours) - count(theirs):+,}")
    missing, extra = shapes(theirs) - shapes(ours), shapes(ours) - shapes(theirs)
    print("the same parameter tensors (shapes as a multiset, our fused key-value maps split in two)"
          if not missing and not extra else f"tensors only theirs has: {dict(missing)}; only ours: {dict(extra)}")


def shapes(module):
    """The multiset of parameter shapes; our attention's one key-value map (2d, c) counts as diffusers' to_k and
    to_v, two (d, c)."""
    found = collections.Counter()
    for name, p in module.named_parameters():
        if name.endswith("kv.weight"):
            found[(p.shape[0] // 2, p.shape[1])] += 2
        else:
            found[tuple(p.shape)] += 1
    return found


if __name__ == "__main__":
    main()
