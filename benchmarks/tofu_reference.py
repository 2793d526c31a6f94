"""tokenreduce's ToFu against a public re-implementation, and timed against our ToMe.

ToFu (Kim et al., WACV 2024) has no official code. The one public re-implementation that runs on
timm is Westlake-AI/OpenToMe, `opentome/timm/tofu.py` with `opentome/tome/tome.py`, read at
commit 4b791cbc6bcef55040236c1852ff2f4102d82725. It is not a dependency: fetch it into a
temporary folder and pass that folder as REF_DIR.

With `--record OUT_DIR` (needs REF_DIR) it runs the re-implementation on the fixture DeiT-Tiny
(random weights `deit_tiny_random.safetensors`, the 4 images of `images.safetensors`, in the
folder --fixtures) in float64 (`model.double()`, `torch.set_default_dtype(torch.float64)`) and
writes `tofu_ref_<setting>.safetensors` with
  logits [4, 1000] float64, tokens_per_block [4, 12] int64 (class token included), and
  destination_blk{i} [4, N_i] int64 for every block i: the output row of each of the block's
  N_i input tokens (the re-implementation's `token_map`), -1 for a token the block drops
  (pruning blocks: the A tokens matched away).
Settings: `prune_r13` (r = 13, every block prunes), `default_r13` and `default_r8` (the
re-implementation's own rule: blocks i <= 12 // 2 prune, the later ones merge with its "tofu"
mode).

Where the re-implementation differs from ours (docs/methods.md §3.11): its "tofu" merge divides
the merged average by the norm the destination had before the merge, not by the average's own
norm, so a merged token does not get the largest member norm; it never updates the token sizes,
so its averages are unweighted and proportional attention never acts. Our pruning blocks equal
it exactly; from the first merging block on the logits differ (the decisions of that block still
agree, as its matching is taken before its merge).

Glue (no line of the re-implementation is changed): the `opentome` package's `__init__` files
import every method it holds (scikit-learn, flash-attn, ...), so `opentome/tome/tome.py`,
`opentome/timm/attention.py` and `opentome/timm/tofu.py` are loaded as modules of stub
packages; `tofu_apply_patch(model)` then `model.r = r`, and for `prune_r13` every block's
strategy is set to "prune" with its own `init_strategy`. Instrumentation only: a pass-through
wrapper around the `bipartite_soft_matching` that `tofu.py` calls records each block's
`token_map`. Its blocks skip timm's LayerScale and q/k norms, identities on DeiT.

By default (no --record) it times the dense model, our ToMe and our ToFu (same r, random
weights, one random batch, interleaved rounds: `tokenreduce.bench.round_robin`), CPU fp32.

    python benchmarks/tofu_reference.py /tmp/opentome --record tests/methods/fixtures \
        --fixtures FIXTURES  # the folder of deit_tiny_random.safetensors, images.safetensors
    python benchmarks/tofu_reference.py --batch-size 1
    python benchmarks/tofu_reference.py --batch-size 32
"""

import argparse
import importlib.util
import math
import sys
import types
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

import tokenreduce
from tokenreduce import flops
from tokenreduce.bench import side_by_side

SETTINGS = {"prune_r13": (13, True), "default_r13": (13, False), "default_r8": (8, False)}
"""Recorded settings: name -> (r, every block prunes)."""


def load_reference(ref_dir: Path) -> types.ModuleType:
    """The re-implementation's `opentome/timm/tofu.py`, loaded under stub packages (see Glue)."""

    def load(name: str, path: Path) -> types.ModuleType:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    root = ref_dir / "opentome"
    for name, folder in (("opentome", root), ("opentome.tome", root / "tome")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    load("opentome.tome.tome", root / "tome" / "tome.py")
    attention = load("opentome.timm.attention", root / "timm" / "attention.py")
    stub = types.ModuleType("opentome.timm")
    stub.__path__ = [str(root / "timm")]
    stub.Attention, stub.Block = attention.Attention, attention.Block
    sys.modules["opentome.timm"] = stub
    return load("opentome.timm.tofu", root / "timm" / "tofu.py")


def run_recorded(
    tofu: types.ModuleType, model: torch.nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
    """Logits of the re-implementation's patched `model`, the token count after each block and
    each block's `token_map` (read by a pass-through wrapper of its matching)."""
    matching = tofu.bipartite_soft_matching
    maps: list[torch.Tensor] = []
    counts: list[int] = []

    def recording(metric, r, *args, **kwargs):
        merge, unmerge, token_map = matching(metric, r, *args, **kwargs)
        maps.append(token_map)
        return merge, unmerge, token_map

    tofu.bipartite_soft_matching = recording
    hooks = [
        block.register_forward_hook(lambda _m, _i, out: counts.append(out.shape[1]))
        for block in model.blocks
    ]
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        tofu.bipartite_soft_matching = matching
        for hook in hooks:
            hook.remove()
    return logits, counts, maps


def record(ref_dir: Path, fixtures: Path, out_dir: Path) -> None:
    torch.set_default_dtype(torch.float64)
    tofu = load_reference(ref_dir)
    images = load_file(fixtures / "images.safetensors")["x"].double()
    weights = load_file(fixtures / "deit_tiny_random.safetensors")
    for setting, (r, prune_only) in SETTINGS.items():
        model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
        model.load_state_dict(weights)
        model = model.double().eval()
        tofu.tofu_apply_patch(model)
        model.r = r
        if prune_only:
            for block in model.blocks:
                block.init_strategy("prune")
        logits, counts, maps = run_recorded(tofu, model, images)
        out = {"logits": logits, "tokens_per_block": torch.tensor([counts] * len(images))}
        for block, (token_map, module) in enumerate(zip(maps, model.blocks, strict=True)):
            destination = token_map.clone()
            if module.strategy == "prune":
                # matched A tokens (even positions) point at their B partner's row: dropped
                num_in = token_map.shape[1]
                num_unmerged = math.ceil(num_in / 2) - (num_in - counts[block])
                dropped = destination[:, ::2] >= num_unmerged
                destination[:, ::2] = destination[:, ::2].masked_fill(dropped, -1)
            out[f"destination_blk{block}"] = destination.contiguous()
        path = out_dir / f"tofu_ref_{setting}.safetensors"
        save_file(out, str(path), metadata={"reference": "Westlake-AI/OpenToMe@4b791cbc"})
        print(f"{path}: tokens per block {counts}")


def time_side_by_side(model_name: str, r: int, batch_size: int, rounds: int) -> None:
    torch.manual_seed(0)
    dense = timm.create_model(model_name, pretrained=False).eval()
    tome = tokenreduce.apply(timm.create_model(model_name, pretrained=False).eval(), "tome", r=r)
    tofu = tokenreduce.apply(timm.create_model(model_name, pretrained=False).eval(), "tofu", r=r)
    tome.load_state_dict(dense.state_dict())
    tofu.load_state_dict(dense.state_dict())
    images = torch.randn(batch_size, 3, *dense.patch_embed.img_size)
    ideal = {"dense": 1.0}
    with torch.inference_mode():
        for name, model in (("tome", tome), ("tofu", tofu)):
            model(images)
            ideal[name] = (
                flops.dense_gmacs(dense) / flops.gmacs(model, tokenreduce.last_info(model)).mean
            )
        forwards = {"dense": dense, "tome": tome, "tofu": tofu}
        lines = side_by_side(forwards, images, rounds, ideal)
    print(f"{model_name} r={r}, batch {batch_size}, cpu fp32, {rounds} rounds")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref_dir", type=Path, nargs="?", help="a copy of Westlake-AI/OpenToMe")
    parser.add_argument("--record", type=Path, default=None, help="write fixtures here")
    parser.add_argument(
        "--fixtures",
        type=Path,
        default=None,
        help="folder with deit_tiny_random.safetensors and images.safetensors (--record)",
    )
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm ViT (timing)")
    parser.add_argument("--r", type=int, default=13, help="tokens removed per block (timing)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if args.record is not None:
        if args.ref_dir is None or args.fixtures is None:
            parser.error("--record needs REF_DIR (a copy of Westlake-AI/OpenToMe) and --fixtures")
        record(args.ref_dir, args.fixtures, args.record)
    else:
        time_side_by_side(args.model, args.r, args.batch_size, args.rounds)


if __name__ == "__main__":
    main()
