"""tokenreduce's ToMe against the official ToMe code, side by side on a timm ViT.

The official code (facebookresearch/ToMe, `tome/patch/timm.py` and `tome/merge.py`) is not a
dependency: clone it into a temporary folder and pass that folder. The dense model, the
official ToMe model and ours share random weights and one random batch; they run in rounds
whose order alternates (`tokenreduce.bench.round_robin`). Prints the ideal speedup (MAC
ratio), each model's median time, speedup and share of the ideal, the largest logit
difference between the two ToMe models (stops above 1e-4), and the ATen operators each model
dispatches per forward (views excluded): on a GPU below batch ~256 every operator costs a
kernel launch, whatever its size.

With --width W the model keeps its depth, patch grid and token counts but has W channels and
one head: the matrix work vanishes and what remains is each implementation's own cost of
dispatching its operations (the floor no kernel tuning removes).

    git clone https://github.com/facebookresearch/ToMe /tmp/tome  # or any copy of it
    python benchmarks/tome_official.py /tmp/tome deit_small_patch16_224 13
    python benchmarks/tome_official.py /tmp/tome deit_small_patch16_224 13 --width 12
    python benchmarks/tome_official.py /tmp/tome vit_base_patch16_224 13 --batch-size 256 \
        --device cuda --amp  # on a GPU, bf16 autocast
"""

import argparse
import sys
from pathlib import Path

import timm
import torch

import tokenreduce
from tokenreduce import flops
from tokenreduce.bench import median_ms, round_robin
from tokenreduce.profiling import OperatorCount
from tokenreduce.runtime import precision_context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a clone of facebookresearch/ToMe")
    parser.add_argument("model", help="a timm ViT name (random weights)")
    parser.add_argument("r", type=int, help="tokens merged per block")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--width", type=int, default=None, help="channels (one head)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    args = parser.parse_args()
    sys.path.insert(0, str(args.checkout))
    import tome

    shape = {} if args.width is None else {"embed_dim": args.width, "num_heads": 1}
    torch.manual_seed(0)
    dense = timm.create_model(args.model, **shape).eval()
    official = timm.create_model(args.model, **shape).eval()
    official.load_state_dict(dense.state_dict())
    tome.patch.timm(official)
    official.r = args.r
    ours = tokenreduce.apply(timm.create_model(args.model, **shape).eval(), "tome", r=args.r)
    ours.load_state_dict(dense.state_dict())
    for model in (dense, official, ours):
        model.to(args.device)
    images = torch.randn(args.batch_size, 3, *dense.patch_embed.img_size, device=args.device)
    device = torch.device(args.device).type
    with torch.inference_mode():  # exactness in float32, whatever the timing's precision
        worst = (official(images) - ours(images)).abs().max().item()
        if worst > 1e-4:
            raise SystemExit(f"official and ours disagree: logits differ by {worst}")
        ideal = flops.dense_gmacs(dense) / flops.gmacs(ours, tokenreduce.last_info(ours)).mean
    with precision_context(device, args.amp, torch.bfloat16):
        forwards = {"dense": dense, "official": official, "ours": ours}
        operators = {}
        for name, model in forwards.items():
            with OperatorCount() as count:
                model(images)
            operators[name] = sum(count.counts.values())
        round_robin(forwards, [images], 3)  # warm-up
        times = round_robin(forwards, [images], args.rounds)
    median = median_ms(times)
    width = "" if args.width is None else f", width {args.width}"
    print(
        f"{args.model}{width} ToMe r={args.r}, batch {args.batch_size}, {args.device}"
        f"{' bf16' if args.amp else ''}: ideal {ideal:.2f}x; "
        f"{args.rounds} rounds; logits max diff {worst:.1e}"
    )
    for name, ms in median.items():
        speedup = median["dense"] / ms
        print(
            f"  {name:9s} {ms:7.2f} ms  {speedup:.3f}x  ({speedup / ideal:.0%} of ideal)  "
            f"{operators[name]} operators per forward"
        )


if __name__ == "__main__":
    main()
