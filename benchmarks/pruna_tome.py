"""pruna's token merging against tokenreduce's ToMe, side by side in one process.

pruna 0.3.4's `token_merging` patches transformers 4.x's `ViTLayer` / `ViTSelfAttention` (the
latter is gone in transformers 5, which tokenreduce's transformers adapter serves), so this runs
in its own environment: transformers<5 and huggingface_hub<1 (with datasets<4, accelerate<1.11,
diffusers<0.36 for pruna's imports), plus pruna installed with --no-deps, torch, timm and
tokenreduce. A random-weight transformers ViT-B/16 (sdpa) gets pruna's ToMe; the same weights in
timm's vit_base_patch16_224 get tokenreduce's; both at r=13. Prints the logit differences and,
with --speed, the speedup of each over its own dense model at batch 1 and 32, timed
round-robin in this process (`tokenreduce.bench.round_robin`, medians).

    python benchmarks/pruna_tome.py --speed
"""

import copy
import sys

import timm
import torch
import transformers
from pruna import SmashConfig, smash

import tokenreduce
from tokenreduce.bench import median_ms, round_robin

R = 13
QKV = ("query", "key", "value")


def timm_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers 4.x ViTForImageClassification state dict in timm's ViT names."""
    names = {
        "cls_token": "vit.embeddings.cls_token",
        "pos_embed": "vit.embeddings.position_embeddings",
        "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
        "norm.weight": "vit.layernorm.weight",
        "norm.bias": "vit.layernorm.bias",
        "head.weight": "classifier.weight",
        "head.bias": "classifier.bias",
    }
    out = {k: state[v] for k, v in names.items()}
    parts = {
        "attn.proj": "attention.output.dense",
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    for i in range(12):
        layer = f"vit.encoder.layer.{i}."
        for leaf in ("weight", "bias"):
            qkv = [state[f"{layer}attention.attention.{n}.{leaf}"] for n in QKV]
            out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat(qkv)
            for timm_part, hf_part in parts.items():
                out[f"blocks.{i}.{timm_part}.{leaf}"] = state[f"{layer}{hf_part}.{leaf}"]
    return out


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = transformers.ViTConfig(num_labels=1000)
    config._attn_implementation = "sdpa"
    hf = transformers.ViTForImageClassification(config).eval()
    hf_dense = copy.deepcopy(hf)
    dense = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    dense.load_state_dict(timm_state(hf.state_dict()), strict=True)
    for norm in [dense.norm, *(n for b in dense.blocks for n in (b.norm1, b.norm2))]:
        norm.eps = config.layer_norm_eps  # transformers' ViT: 1e-12
    x = torch.randn(32, 3, 224, 224)
    smashed = smash(model=hf, smash_config=SmashConfig({"token_merging": {"r": R}}, device="cpu"))
    ours = tokenreduce.apply(copy.deepcopy(dense), "tome", r=R)
    with torch.inference_mode():
        dense_hf, dense_timm = hf_dense(pixel_values=x[:4]).logits, dense(x[:4])
        pruna_logits, ours_logits = smashed(pixel_values=x[:4]).logits, ours(x[:4])
    print(f"dense transformers vs timm: max |diff| {(dense_hf - dense_timm).abs().max():.3g}")
    print(
        f"r={R}: pruna vs tokenreduce {(pruna_logits - ours_logits).abs().max():.3g}; "
        f"pruna vs dense {(pruna_logits - dense_hf).abs().max():.3g}; "
        f"tokenreduce vs dense {(ours_logits - dense_timm).abs().max():.3g}; "
        f"tokens after each block {tokenreduce.last_info(ours).tokens_per_block[0].tolist()}"
    )
    if "--speed" not in sys.argv:
        return
    runs = {
        "transformers dense": lambda v: hf_dense(pixel_values=v),
        "pruna": lambda v: smashed(pixel_values=v),
        "timm dense": dense,
        "tokenreduce": ours,
    }
    for batch, rounds in ((1, 30), (32, 6)):
        xb = x[:batch]
        with torch.inference_mode():
            for run in runs.values():
                run(xb)
            times = round_robin(runs, [xb], rounds)
        median = median_ms(times)
        base = times["transformers dense"]
        spread = (max(base) - min(base)) * 1e3 / median["transformers dense"]
        print(
            f"b={batch}: pruna {median['transformers dense'] / median['pruna']:.3f}x over "
            f"transformers dense; tokenreduce {median['timm dense'] / median['tokenreduce']:.3f}x "
            f"over timm dense; ms: {', '.join(f'{k} {v:.1f}' for k, v in median.items())}; "
            f"dense spread {spread:.0%}"
        )


if __name__ == "__main__":
    main()
