"""tokenreduce's PiToMe against the official PiToMe code: fixtures, and both side by side.

The official code (hchautran/PiToMe, commit 550b5deed94aadfeac28bfbe381d87e672044a40; the timm
patch `algo/pitome/patch/deit.py` and `timm.py`, the merges `algo/pitome/merge.py`) is not a
dependency: clone it into a temporary folder and pass that folder.

Glue (no line of the official code is copied or changed):

1. Import: `algo/pitome/__init__.py` and `algo/pitome/patch/__init__.py` import the patches of
   every model family (LAVIS, transformers, ...). Empty package modules `algo`, `algo.pitome`,
   `algo.pitome.patch` pointing at the checkout's folders are registered, so that importing
   `algo.pitome.patch.deit` loads only `deit.py`, `timm.py` and `merge.py`.
2. `forward_features`: the official `PiToMeVisionTransformer.forward_features` is written for
   timm < 0.9 (it reads `dist_token` and `pre_logits`, which timm 1.0's VisionTransformer lacks,
   and returns pooled features that timm 1.0's `forward_head` would pool again). Its only other
   content is a FLOP counter. The patched model's class is subclassed once more with timm's own
   `VisionTransformer.forward_features`; the official `forward` (which sets the per-block ratios,
   the bsm/pitome split and resets size and source) and the official blocks and attention run as
   they are. The official forward returns (logits, flops): `return_flop=False` is passed.
3. `PiToMeBlock`/`PiToMeAttention` replace timm's forward methods and so skip timm 1.0's
   LayerScale and q/k norms: identities on DeiT.

With --record OUT_DIR it writes fixtures (float64, `torch.set_default_dtype(torch.float64)`:
the official code makes its source map with `torch.eye` of the default dtype) of the fixture
DeiT-Tiny (FIXTURES/deit_tiny_random.safetensors, FIXTURES/images.safetensors) for the official
default ratio 0.9125 (main_ic.py), ratio 0.8, and ratio 0.9125 on the same weights without a
class token (timm `class_token=False, global_pool="avg", fc_norm=False`, the patch rows of the
position embedding):

    python benchmarks/pitome_official.py /tmp/pitome --record tests/methods/fixtures \
        --fixtures ../shared/data/fixtures

Keys: `logits` [4, 1000] f64, `tokens_per_block` [4, L] i64, `owner_blk{i}` [4, N0] i16 (the row
of the official source map after block i that holds each original token: the whole map, as every
original token is in exactly one row), `size_final` [4, N_L, 1] f64, `features_mean` [4, C] f64
(the plain mean over the final normed tokens: without a class token the official model pools
this unweighted mean, where tokenreduce pools by size, docs/methods.md §1.3).

Without --record: the dense, official and our model on random weights and one random batch,
timed in rounds whose order alternates (`tokenreduce.bench.round_robin`); prints the logit
difference of the two PiToMe models (stops above 1e-4) and each model's median time:

    python benchmarks/pitome_official.py /tmp/pitome --batch-size 1
    python benchmarks/pitome_official.py /tmp/pitome --batch-size 32
"""

import argparse
import copy
import importlib
import sys
import types
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

import tokenreduce
from tokenreduce import flops
from tokenreduce.bench import side_by_side

RECORDED = {"pitome_r0.9125": (0.9125, True), "pitome_r0.8": (0.8, True)}
RECORDED_NO_CLASS_TOKEN = {"pitome_nocls_r0.9125": 0.9125}


def official_patch(checkout: Path) -> types.ModuleType:
    """The official `algo.pitome.patch.deit` module, without the other families' patches."""
    for name, folder in (
        ("algo", "algo"),
        ("algo.pitome", "algo/pitome"),
        ("algo.pitome.patch", "algo/pitome/patch"),
    ):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(checkout / folder)]
            sys.modules[name] = package
    return importlib.import_module("algo.pitome.patch.deit")


def official_model(checkout: Path, model: torch.nn.Module, ratio: float, trace_source: bool):
    """`model` patched by the official code at `ratio`, with timm's own forward_features."""
    official_patch(checkout).apply_patch(model, trace_source=trace_source)
    patched = model.__class__
    model.__class__ = type(
        patched.__name__, (patched,), {"forward_features": VisionTransformer.forward_features}
    )
    model.ratio = ratio
    return model


def run_official(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits, tokens per block, owner maps per block and final sizes of an official model."""
    records: list[tuple[int, torch.Tensor]] = []

    def after_block(block, inputs, output):
        source = model._info["source"]
        owner = source.argmax(dim=1) if source is not None else None
        records.append((output.shape[1], owner))

    final: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(after_block) for block in model.blocks]
    hooks.append(model.norm.register_forward_hook(lambda module, i, output: final.append(output)))
    try:
        with torch.no_grad():
            logits = model(images, return_flop=False)
    finally:
        for hook in hooks:
            hook.remove()
    batch, num_tokens = images.shape[0], records[0][1].shape[-1]
    identity = torch.arange(num_tokens).expand(batch, -1)
    out = {
        "logits": logits,
        "tokens_per_block": torch.tensor([n for n, _ in records]).expand(batch, -1).contiguous(),
        "size_final": model._info["size"],
        "features_mean": final[0].mean(dim=1),
    }
    for i, (_, owner) in enumerate(records):
        out[f"owner_blk{i}"] = (identity if owner is None else owner).to(torch.int16).contiguous()
    return out


def fixture_model(fixtures: Path, class_token: bool) -> torch.nn.Module:
    """The fixture DeiT-Tiny in float64; without a class token: average pooling and the patch
    rows of its position embedding."""
    weights = load_file(fixtures / "deit_tiny_random.safetensors")
    options = {} if class_token else {"class_token": False, "global_pool": "avg", "fc_norm": False}
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, **options)
    if not class_token:
        del weights["cls_token"]
        weights["pos_embed"] = weights["pos_embed"][:, 1:]
    model.load_state_dict(weights)
    return model.double().eval()


def record(checkout: Path, fixtures: Path, out_dir: Path) -> None:
    torch.set_default_dtype(torch.float64)
    images = load_file(fixtures / "images.safetensors")["x"].double()
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = {name: (ratio, True) for name, (ratio, _) in RECORDED.items()}
    cases |= {name: (ratio, False) for name, ratio in RECORDED_NO_CLASS_TOKEN.items()}
    for name, (ratio, class_token) in cases.items():
        model = official_model(checkout, fixture_model(fixtures, class_token), ratio, True)
        result = run_official(model, images)
        save_file(result, str(out_dir / f"{name}.safetensors"))
        print(name, result["tokens_per_block"][0].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a clone of hchautran/PiToMe")
    parser.add_argument("--record", type=Path, default=None, help="write fixtures here")
    parser.add_argument("--fixtures", type=Path, default=Path("../shared/data/fixtures"))
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm ViT (random)")
    parser.add_argument("--ratio", type=float, default=0.9125)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if args.record is not None:
        record(args.checkout, args.fixtures, args.record)
        return

    torch.manual_seed(0)
    dense = timm.create_model(args.model).eval()
    official = timm.create_model(args.model).eval()
    official.load_state_dict(dense.state_dict())
    official_model(args.checkout, official, args.ratio, False)
    ours = tokenreduce.apply(timm.create_model(args.model).eval(), "pitome", ratio=args.ratio)
    ours.load_state_dict(dense.state_dict())
    images = torch.randn(args.batch_size, 3, *dense.patch_embed.img_size)
    worst = agreement_float64(official, ours, images)
    if worst > 1e-9:
        raise SystemExit(f"official and ours disagree in float64: logits differ by {worst}")
    with torch.inference_mode():
        ours(images)
        ideal = flops.dense_gmacs(dense) / flops.gmacs(ours, tokenreduce.last_info(ours)).mean
        forwards = {
            "dense": dense,
            "official": lambda x: official(x, return_flop=False),
            "ours": ours,
        }
        lines = side_by_side(forwards, images, args.rounds, {"official": ideal, "ours": ideal})
    print(
        f"{args.model} PiToMe ratio={args.ratio}, batch {args.batch_size}, cpu fp32, "
        f"{args.rounds} rounds; logits max diff in float64 {worst:.1e}"
    )
    print("\n".join(lines))


def agreement_float64(official: torch.nn.Module, ours: torch.nn.Module, images: torch.Tensor):
    """Max |logit difference| of float64 copies: in float32 a near tie between two energy
    scores of a random-weight model can flip one merge of one image between the two codes."""
    torch.set_default_dtype(torch.float64)
    try:
        with torch.inference_mode():
            reference = copy.deepcopy(official).double()(images.double(), return_flop=False)
            return (reference - copy.deepcopy(ours).double()(images.double())).abs().max().item()
    finally:
        torch.set_default_dtype(torch.float32)


if __name__ == "__main__":
    main()
