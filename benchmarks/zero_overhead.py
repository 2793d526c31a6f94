"""How fast a reduced timm ViT could be with a method that costs nothing: the CPU's ceiling.

Runs the model's own blocks on exactly the token counts a fixed-count method leaves after each
block (the first tokens kept, nothing matched, merged or pooled) and times that "zero-overhead"
forward, the reduced model and the dense model round-robin (`tokenreduce.bench.round_robin`,
medians) at batch 1
(random weights, one random image). The ratio of the zero-overhead speedup to the ideal (the
MAC ratio) is what the CPU's matrix multiplies allow on fewer tokens; the method's own share is
the rest.

    python benchmarks/zero_overhead.py deit_small_patch16_224 tome r=13
    python benchmarks/zero_overhead.py deit_small_patch16_224 evit keep_rate=0.7
"""

import argparse
import ast

import timm
import torch

import tokenreduce
from tokenreduce import flops
from tokenreduce.bench import median_ms, round_robin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a timm ViT name (random weights)")
    parser.add_argument("method")
    parser.add_argument("options", nargs="*", help="KEY=VALUE method options")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    options = {}
    for item in args.options:
        key, _, value = item.partition("=")
        options[key] = ast.literal_eval(value)

    torch.manual_seed(0)
    dense = timm.create_model(args.model).eval()
    reduced = tokenreduce.apply(timm.create_model(args.model).eval(), args.method, **options)
    reduced.load_state_dict(dense.state_dict())
    images = torch.randn(1, 3, *dense.patch_embed.img_size)
    with torch.inference_mode():
        reduced(images)
        info = tokenreduce.last_info(reduced)
    counts = info.tokens_per_block[0].tolist()
    entering = [info.tokens_in] + counts[:-1]

    def zero_overhead(images: torch.Tensor) -> torch.Tensor:
        x = dense.norm_pre(dense.patch_drop(dense._pos_embed(dense.patch_embed(images))))
        for block, tokens_in, tokens_out in zip(dense.blocks, entering, counts, strict=True):
            x = x[:, :tokens_in]
            x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
            x = x[:, :tokens_out]
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return dense.forward_head(dense.norm(x))

    forwards = {"dense": dense, args.method: reduced, "zero-overhead": zero_overhead}
    with torch.inference_mode():
        for forward in forwards.values():
            forward(images)
        times = round_robin(forwards, [images], args.rounds)
    median = median_ms(times)
    ideal = flops.dense_gmacs(dense) / flops.gmacs(reduced, info).mean
    print(f"{args.model} {args.method} {options}: ideal {ideal:.2f}x; token counts {counts}")
    for name, ms in median.items():
        speedup = median["dense"] / ms
        print(f"  {name:14s} {ms:7.2f} ms  {speedup:.2f}x  ({speedup / ideal:.0%} of ideal)")


if __name__ == "__main__":
    main()
