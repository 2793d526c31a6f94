"""tokenreduce's ATS against the official ATS code: float64 fixtures, and a side-by-side timing.

The official code (adaptivetokensampling/ATS, commit 9271257adc7ea9695c2ccd75e25e3a86432fd65a:
`libs/models/transformers/vit.py` `ViT`, `ats_block.py` `ATSBlock`/`AdaptiveTokenSampler`,
`transformer_block.py`) is not a dependency: clone it into a temporary folder and pass that
folder. Nothing of it is copied; the glue, all here:

1. Imports: `libs/__init__.py` (iopath environment set-up) and `libs/models/__init__.py`
   (fvcore's registry, model building) are skipped by registering the two packages by path, and
   `libs.models.build` is a stub whose `MODEL_REGISTRY.register()` returns the class unchanged.
   `vit.py` then imports as is (timm 1.0's deprecated `timm.models.layers`/`registry` shims; its
   `@register_model` functions overwrite timm's `vit_*` names in this process, which is why the
   timm models here are built first and are `deit_*`).
2. The model is the official `ViT` built from a config namespace (its `@initializer` reads
   `cfg.VIT.*`) with the timm model's dimensions, the official ATS defaults `ATS_BLOCKS`
   3..11 (or those given), `NUM_TOKENS` 197 everywhere (or those given) and `DROP_TOKENS=True`
   (configs/ImageNet/DeiT_S.yaml), and the timm model's state dict (the same key names; only
   the official `out_zero_mask` buffers, zeros, are missing).
3. Fixtures only (`--record`): `Attention.softmax_with_policy` (every block's softmax) casts the
   logits to float32 and adds eps = 1e-6 (`(e^a p + eps/N) / (sum e^a p + eps)`, a training
   aid). For a float64 comparison it is replaced by the exact masked softmax in the model's
   dtype, i.e. the same function with eps = 0 and no float32 cast. Each image runs alone
   (batch 1): there the policy is all ones, and the official batched result depends on the
   batch (padding takes part in the CDF's normalisation, eps/N uses the padded length), while
   ours gives every image its batch-1 result (docs/methods.md §1.6, §3.12). The timing keeps the
   official softmax.
4. Instrumentation only: pass-through wrappers around `AdaptiveTokenSampler.score_assignment_step`
   and `get_unique_indices` record the sorted indices and the unique sampled positions, from
   which the kept original tokens follow; a forward hook per block reads the token count.

    git clone https://github.com/adaptivetokensampling/ATS /tmp/ats  # or any copy of it
    python benchmarks/ats_official.py /tmp/ats --record tests/methods/fixtures
    python benchmarks/ats_official.py /tmp/ats --batch-size 1   # timing, CPU fp32
    python benchmarks/ats_official.py /tmp/ats --batch-size 32

`--record` needs the shared fixture weights and images (`--fixtures`, see its README).
"""

import argparse
import sys
import types
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

import tokenreduce
from tokenreduce import flops
from tokenreduce.bench import side_by_side

OFFICIAL_COMMIT = "9271257adc7ea9695c2ccd75e25e3a86432fd65a"
SETTINGS = {
    # the official DeiT-S inference setting (configs/ImageNet/DeiT_S.yaml)
    "ats_default": {"ats_blocks": tuple(range(3, 12)), "num_tokens": None},
    # other blocks and budgets below 197 that still cover every image's tokens
    "ats_blocks1357911_k150": {
        "ats_blocks": (1, 3, 5, 7, 9, 11),
        "num_tokens": (197, 150, 150, 150, 150, 150),
    },
}


def import_official(checkout: Path) -> types.ModuleType:
    """The official `libs.models.transformers.vit` module, imported without its environment."""
    for name in ("libs", "libs.models"):
        package = types.ModuleType(name)
        package.__path__ = [str(checkout / name.replace(".", "/"))]
        sys.modules[name] = package
    build = types.ModuleType("libs.models.build")
    build.MODEL_REGISTRY = types.SimpleNamespace(register=lambda: lambda cls: cls)
    sys.modules["libs.models.build"] = build
    sys.path.insert(0, str(checkout))
    import libs.models.transformers.vit as vit

    return vit


def official_model(
    vit: types.ModuleType,
    dense: torch.nn.Module,
    ats_blocks: tuple[int, ...],
    budgets: tuple[int, ...] | None,
) -> torch.nn.Module:
    """The official ATS ViT with the timm model's dimensions and weights; budgets: one per ATS
    block (None: 197 everywhere, the official setting)."""
    depth = len(dense.blocks)
    num_tokens = [197] * depth
    for block, budget in zip(ats_blocks, budgets or (), strict=False):
        num_tokens[block] = budget
    config = types.SimpleNamespace(
        VIT=types.SimpleNamespace(
            IMG_SIZE=dense.patch_embed.img_size[0],
            PATCH_SIZE=dense.patch_embed.patch_size[0],
            IN_CHANNELS=3,
            NUM_CLASSES=dense.num_classes,
            EMBED_DIM=dense.embed_dim,
            DEPTH=depth,
            NUM_HEADS=dense.blocks[0].attn.num_heads,
            MLP_RATIO=4.0,
            QKV_BIAS=True,
            QK_SCALE=None,
            REPRESENTATION_SIZE=None,
            DROP_RATE=0.0,
            ATTN_DROP_RATE=0.0,
            DROP_PATH_RATE=0.0,
            HYBRID_BACKBONE=None,
            NORM_LAYER=None,
            ATS_BLOCKS=list(ats_blocks),
            NUM_TOKENS=num_tokens,
            DROP_TOKENS=True,
        )
    )
    official = vit.ViT(config)
    missing, unexpected = official.load_state_dict(dense.state_dict(), strict=False)
    if unexpected or not all(key.endswith("out_zero_mask") for key in missing):
        raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    return official.to(next(dense.parameters()).dtype).eval()


def exact_softmax_with_policy(attn: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """Glue 3: softmax over the keys the policy keeps (a dropped token attends to itself only,
    as officially), in the logits' dtype, without eps."""
    batch, tokens, _ = policy.shape
    eye = torch.eye(tokens, dtype=torch.bool, device=attn.device)
    keys = (policy.reshape(batch, 1, 1, tokens) > 0) | eye
    return attn.masked_fill(~keys, -torch.inf).softmax(dim=-1)


def record(checkout: Path, fixtures: Path, out: Path) -> None:
    """Run the official code on the fixture DeiT-Tiny in float64, one image at a time, and write
    one safetensors file per setting."""
    torch.set_default_dtype(torch.float64)
    dense = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    dense.load_state_dict(load_file(fixtures / "deit_tiny_random.safetensors"))
    dense = dense.double()
    images = load_file(fixtures / "images.safetensors")["x"].double()
    vit = import_official(checkout)
    sampler = sys.modules["libs.models.transformers.ats_block"].AdaptiveTokenSampler
    attention = sys.modules["libs.models.transformers.transformer_block"].Attention
    attention.softmax_with_policy = staticmethod(exact_softmax_with_policy)
    seen: list[tuple[str, torch.Tensor]] = []
    score_step, unique = sampler.score_assignment_step, sampler.get_unique_indices

    def scores_seen(attn: torch.Tensor, v: torch.Tensor):
        sorted_scores, sorted_indices = score_step(attn, v)
        seen.append(("sorted", sorted_indices))
        return sorted_scores, sorted_indices

    def unique_seen(indices: torch.Tensor, max_value: int) -> torch.Tensor:
        result = unique(indices=indices, max_value=max_value)
        seen.append(("unique", result[:, :max_value]))
        return result

    sampler.score_assignment_step = staticmethod(scores_seen)
    sampler.get_unique_indices = staticmethod(unique_seen)
    counts: list[int] = []

    def count_tokens(module: torch.nn.Module, args: tuple, output: object) -> None:
        counts.append((output[0] if isinstance(output, tuple) else output).shape[1])

    with torch.no_grad():  # sanity: the official model without ATS blocks is the dense model
        plain = official_model(vit, dense, (), None)(images)[0]
        worst = (plain - dense(images)).abs().max()
        print(f"no ATS block vs dense: max abs logit diff {worst:.1e}")
    out.mkdir(parents=True, exist_ok=True)
    for name, options in SETTINGS.items():
        official = official_model(vit, dense, options["ats_blocks"], options["num_tokens"])
        hooks = [block.register_forward_hook(count_tokens) for block in official.blocks]
        logits, per_block, kept = [], [], {i: [] for i in options["ats_blocks"]}
        with torch.no_grad():
            for image in images:
                counts.clear()
                seen.clear()
                logits.append(official(image[None])[0])
                per_block.append(list(counts))
                ids = torch.arange(197)  # original token of each current token
                for block, ((_, order), (_, picks)) in zip(
                    options["ats_blocks"], zip(seen[::2], seen[1::2], strict=True), strict=True
                ):
                    picks = picks[0][picks[0] < order.shape[1]]
                    ids = torch.cat([ids[:1], ids[order[0][picks] + 1]])
                    kept[block].append(ids)
        for hook in hooks:
            hook.remove()
        tensors = {
            "logits": torch.cat(logits),
            "tokens_per_block": torch.tensor(per_block, dtype=torch.int64),
        }
        for block, rows in kept.items():
            width = max(len(row) for row in rows)
            padded = torch.full((len(rows), width), -1, dtype=torch.int64)
            for i, row in enumerate(rows):
                padded[i, : len(row)] = row
            tensors[f"kept_blk{block}"] = padded
        save_file(tensors, str(out / f"{name}.safetensors"), metadata={"commit": OFFICIAL_COMMIT})
        print(name, tensors["tokens_per_block"].tolist())


def timing(checkout: Path, model_name: str, batch_size: int, rounds: int) -> None:
    """Dense, official and ours on one random batch, interleaved (`round_robin`), CPU fp32."""
    torch.manual_seed(0)
    dense = timm.create_model(model_name, pretrained=False).eval()
    ours = timm.create_model(model_name, pretrained=False).eval()
    ours.load_state_dict(dense.state_dict())
    tokenreduce.apply(ours, "ats")
    vit = import_official(checkout)
    depth = len(dense.blocks)
    official = official_model(vit, dense, tuple(range(depth // 4, depth)), None)
    images = torch.randn(batch_size, 3, 224, 224)
    forwards = {
        "dense": dense,
        "official": lambda x: official(x)[0],
        "ours": ours,
    }
    with torch.inference_mode():
        ours(images)
        # ATS keeps a different number of tokens per image: the ideal of the batch's mean GMACs
        ideal = flops.dense_gmacs(dense) / flops.gmacs(ours, tokenreduce.last_info(ours)).mean
        counts = tokenreduce.last_info(ours).tokens_per_block.float().mean(dim=0)
        lines = side_by_side(forwards, images, rounds, {"official": ideal, "ours": ideal})
    print(f"{model_name} batch {batch_size}, {rounds} rounds; mean tokens per block (ours):")
    print("  " + " ".join(f"{c:.1f}" for c in counts.tolist()))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a clone of adaptivetokensampling/ATS")
    parser.add_argument("--record", type=Path, default=None, help="write fixtures to this folder")
    parser.add_argument("--fixtures", type=Path, default=Path("../shared/data/fixtures"))
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm ViT (timing)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    if args.record is not None:
        record(args.checkout, args.fixtures, args.record)
    else:
        timing(args.checkout, args.model, args.batch_size, args.rounds)


if __name__ == "__main__":
    main()
