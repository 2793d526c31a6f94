"""What each method's forward asks of a GPU, counted on any device: the path its attention takes
on CUDA, the host syncs of one forward, the ATen operators it dispatches (views excluded; each
a kernel launch on a GPU) against the dense model's, per reducing block, and the graphs
`torch.compile` makes of the whole model (docs/architecture.md, "The GPU path").

Attention runs the CUDA path's choices (`tokenreduce.patch.attention.gpu_path`) on every
device, so the CPU counts what the GPU would launch.

    python benchmarks/gpu_path.py                        # DeiT-S, batch 8, a markdown table
    python benchmarks/gpu_path.py vit_base_patch16_224 --batch-size 1
"""

import argparse
import copy

import timm
import torch

import tokenreduce
from tokenreduce.options import format_options
from tokenreduce.patch import attached_engine
from tokenreduce.patch import attention as patch_attention
from tokenreduce.patch.attention import gpu_path
from tokenreduce.profiling import host_syncs, operators_per_forward

METHODS = [
    ("tome", {"r": 13}),
    ("evit", {"keep_rate": 0.7}),
    ("topk", {"keep_rate": 0.7}),
    ("ppt", {}),
    ("bat", {}),
    ("ltmp", {"merge_thresholds": 0.95, "prune_thresholds": 0.005, "batching": "masked"}),
    ("asvit", {"thresholds": 0.6, "batching": "masked"}),
    ("ltmp", {"merge_thresholds": 0.95, "prune_thresholds": 0.005}),
    ("asvit", {"thresholds": 0.6}),
]


def attention_path(model: torch.nn.Module, images: torch.Tensor) -> str:
    """How the attention of the blocks after the first reduction runs on the GPU path."""
    calls = []
    with_key_bias = patch_attention.fused_attention_with_key_bias
    patch_attention.fused_attention_with_key_bias = lambda *a: calls.append(1) or with_key_bias(*a)
    try:
        with torch.inference_mode():
            model(images)
    finally:
        patch_attention.fused_attention_with_key_bias = with_key_bias
    if not tokenreduce.last_info(model).fused_attention[-1]:
        return "explicit (needs the attention matrix)"
    return "fused, key bias as head dimensions" if calls else "fused, no bias"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="deit_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = timm.create_model(args.model, pretrained=False).eval()
    images = torch.randn(args.batch_size, 3, *dense.patch_embed.img_size)
    dense_operators = sum(operators_per_forward(dense, images).values())
    print(f"{args.model}, batch {args.batch_size}: dense {dense_operators} operators per forward")
    print()
    print(
        "| method | batching | attention on CUDA | host syncs per forward | operators per "
        "forward | added per reducing block | graphs (breaks) |"
    )
    print("|---|---|---|---|---|---|---|")
    with gpu_path():
        for name, options in METHODS:
            model = tokenreduce.apply(copy.deepcopy(dense), name, **options)
            operators_per_forward(model, images)  # builds the cached index constants
            operators = sum(operators_per_forward(model, images).values())
            info = tokenreduce.last_info(model)
            syncs = len(host_syncs(model, images))
            engine = attached_engine(model)
            torch._dynamo.reset()
            explained = torch._dynamo.explain(model)(images)
            reducing = max(len(info.reduce_blocks), 1)
            print(
                f"| {name} {format_options(options)} | "
                f"{engine.batching.value} | {attention_path(model, images)} | {syncs} | "
                f"{operators} | {(operators - dense_operators) / reducing:.0f} "
                f"({reducing} blocks) | {explained.graph_count} "
                f"({explained.graph_break_count}) |"
            )


if __name__ == "__main__":
    main()
