"""tokenreduce's GTP against the official GTP-ViT code: fixtures (float64) and timing.

The official code (Ackesnal/GTP-ViT at commit 97a117814d0ff99edbbe34bec12e851db4be2eb5,
`models_v3.py`: `GraphPropagationTransformer`, `GraphPropagationBlock`, `select`, `propagate`)
is not a dependency: copy it into a temporary folder and pass that folder. It is imported from
there, unmodified; the glue below only lets it run on current timm, on a CPU and in float64:

- `GraphPropagationTransformer.__init__` moves its spatial graph with `.to("cuda")` (its own
  comment says to remove that on a CPU): while the model is built, `Tensor.to("cuda")` is the
  identity when the model is to run elsewhere.
- With `--record`, `Tensor.float()` means the default dtype (float64) while the official model
  runs: the official Mixed graph is made `.float()` (float32) and its product with float64 tokens
  would fail; in float32 (timing) nothing changes.
- `propagate` appends a line to a file named "missing" in the working directory at every block
  (the batch-mean fraction of propagated tokens no kept token receives from): the official model
  runs in a temporary working directory, whose file is read back as a fixture.
- The weights of a timm ViT are loaded into it (same parameter names).

With `--record OUT_DIR` it runs the official model on the fixture DeiT-Tiny (random weights,
`deit_tiny_random.safetensors`, and the 4 images of `images.safetensors` from FIXTURES_DIR) in
float64 for each setting of `SETTINGS` and writes `OUT_DIR/gtp_<setting>.safetensors`: `logits`
[4, 1000], `tokens_per_block` [4, 12], `kept_blk{i}` [4, N_i] (int32: the original token held by
each output row of block i, class token 0, patch j+1), `scales_blk{i}` [4, N_i] (the token
scales after block i, settings with token_scale) and `missing` [12] (the official file's
fractions, GraphProp settings).

By default it times the official model and ours side by side (float32, random weights, one
random batch, rounds whose order alternates: `tokenreduce.bench.round_robin`) after checking that
their logits agree; the official model's timing includes its "missing" file writes (and the host
sync each needs).

    mkdir -p /tmp/gtp && git --git-dir=<mirror> archive HEAD | tar -x -C /tmp/gtp
    python benchmarks/gtp_official.py /tmp/gtp --record tests/methods/fixtures \
        --fixtures ../shared/data/fixtures
    python benchmarks/gtp_official.py /tmp/gtp --batch-size 1
    python benchmarks/gtp_official.py /tmp/gtp --batch-size 32
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import tokenreduce
from tokenreduce import flops
from tokenreduce.bench import side_by_side

OFFICIAL_COMMIT = "97a117814d0ff99edbbe34bec12e851db4be2eb5"

SETTINGS: dict[str, dict[str, Any]] = {
    # the official README's DeiT setting for P = 8 (our defaults)
    "default": {
        "num_prop": 8,
        "selection": "MixedAttnMax",
        "propagation": "GraphProp",
        "graph_type": "Mixed",
        "num_neighbours": 8,
        "sparsity": 0.6,
        "alpha": 0.1,
        "token_scale": True,
    },
    "semantic_p13": {
        "num_prop": 13,
        "selection": "MixedAttnMean",
        "propagation": "GraphProp",
        "graph_type": "Semantic",
        "num_neighbours": 5,
        "sparsity": 1.0,
        "alpha": 0.4,
        "token_scale": False,
    },
    "spatial_cls_p5": {
        "num_prop": 5,
        "selection": "CLSAttnMax",
        "propagation": "GraphProp",
        "graph_type": "Spatial",
        "num_neighbours": 8,
        "sparsity": 0.8,
        "alpha": 0.3,
        "token_scale": True,
    },
}
"""Recorded settings, as options of both the official model and `tokenreduce.apply`."""


@contextlib.contextmanager
def _patched(name: str, replacement: Any) -> Iterator[None]:
    original = getattr(torch.Tensor, name)
    setattr(torch.Tensor, name, replacement)
    try:
        yield
    finally:
        setattr(torch.Tensor, name, original)


def _to_not_cuda(original: Any) -> Any:
    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args and args[0] == "cuda":
            return self
        return original(self, *args, **kwargs)

    return to


def _float_is_default(self: torch.Tensor) -> torch.Tensor:
    return self.to(torch.get_default_dtype())


def official_model(checkout: Path, dense: nn.Module, options: dict[str, Any]) -> nn.Module:
    """The official GraphPropagationTransformer shaped like `dense` (a timm DeiT/ViT with a
    class token), with its weights, running the given options."""
    sys.path.insert(0, str(checkout))
    import models_v3

    with _patched("to", _to_not_cuda(torch.Tensor.to)):
        official = models_v3.GraphPropagationTransformer(
            img_size=dense.patch_embed.img_size[0],
            patch_size=dense.patch_embed.patch_size[0],
            embed_dim=dense.embed_dim,
            depth=len(dense.blocks),
            num_heads=dense.blocks[0].attn.num_heads,
            mlp_ratio=4,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_classes=dense.num_classes,
            **options,
        )
    official.load_state_dict(dense.state_dict())
    return official.to(next(dense.parameters()).dtype).eval()


def run_official(official: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits and, per block, kept original tokens, token scales and the "missing" fractions."""
    import models_v3

    select = models_v3.select
    kept: list[torch.Tensor] = []

    def recording_select(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        index_kept, index_prop = select(*args, **kwargs)
        kept.append(index_kept)
        return index_kept, index_prop

    scales: list[torch.Tensor | None] = []
    hooks = [
        block.register_forward_hook(lambda _m, _i, out: scales.append(out[2]))
        for block in official.blocks
    ]
    previous = os.getcwd()
    models_v3.select = recording_select
    try:
        with tempfile.TemporaryDirectory() as folder, _patched("float", _float_is_default):
            os.chdir(folder)
            with torch.no_grad():
                logits = official(images)
            missing_file = Path(folder, "missing")
            missing = missing_file.read_text().split() if missing_file.exists() else []
    finally:
        os.chdir(previous)
        models_v3.select = select
        for hook in hooks:
            hook.remove()
    out = {"logits": logits}
    ids = torch.arange(official.patch_embed.num_patches + 1).expand(images.shape[0], -1)
    counts = []
    for block, index in enumerate(kept):
        ids = torch.cat([ids[:, :1], ids.gather(1, index)], dim=1)
        counts.append(ids.shape[1])
        out[f"kept_blk{block}"] = ids.to(torch.int32)
        if scales[block] is not None:
            out[f"scales_blk{block}"] = scales[block]
    out["tokens_per_block"] = torch.tensor([counts] * images.shape[0], dtype=torch.int64)
    if missing:
        out["missing"] = torch.tensor([float(v) for v in missing], dtype=torch.float64)
    return out


def record(checkout: Path, fixtures: Path, out_dir: Path) -> None:
    torch.set_default_dtype(torch.float64)
    dense = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    dense.load_state_dict(load_file(fixtures / "deit_tiny_random.safetensors"))
    dense = dense.double().eval()
    images = load_file(fixtures / "images.safetensors")["x"].double()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, options in SETTINGS.items():
        tensors = run_official(official_model(checkout, dense, options), images)
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(out_dir / f"gtp_{name}.safetensors"),
            metadata={"official_commit": OFFICIAL_COMMIT, "options": repr(options)},
        )
        print(f"gtp_{name}: tokens {tensors['tokens_per_block'][0].tolist()}")


def time_side_by_side(
    checkout: Path, model_name: str, batch_size: int, rounds: int, setting: str
) -> None:
    options = SETTINGS[setting]
    torch.manual_seed(0)
    dense = timm.create_model(model_name, pretrained=False).eval()
    official = official_model(checkout, dense, options)
    ours = tokenreduce.apply(
        timm.create_model(model_name, pretrained=False).eval(), "gtp", **options
    )
    ours.load_state_dict(dense.state_dict())
    images = torch.randn(batch_size, 3, *dense.patch_embed.img_size)
    previous = os.getcwd()
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        os.chdir(folder)  # the official "missing" file
        try:
            worst = (official(images) - ours(images)).abs().max().item()
            if worst > 1e-3:
                raise SystemExit(f"official and ours disagree: logits differ by {worst}")
            ideal = flops.dense_gmacs(dense) / flops.gmacs(ours, tokenreduce.last_info(ours)).mean
            forwards = {"dense": dense, "official": official, "ours": ours}
            lines = side_by_side(forwards, images, rounds, {"official": ideal, "ours": ideal})
        finally:
            os.chdir(previous)
    print(
        f"{model_name} GTP {setting} {options}, batch {batch_size}, cpu float32, {rounds} "
        f"rounds; logits max diff {worst:.1e}"
    )
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a copy of Ackesnal/GTP-ViT")
    parser.add_argument("--record", type=Path, default=None, help="write fixtures here")
    parser.add_argument("--fixtures", type=Path, default=Path("../shared/data/fixtures"))
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm ViT (timing)")
    parser.add_argument("--setting", default="default", choices=sorted(SETTINGS))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if args.record is not None:
        record(args.checkout, args.fixtures, args.record)
    else:
        time_side_by_side(args.checkout, args.model, args.batch_size, args.rounds, args.setting)


if __name__ == "__main__":
    main()
