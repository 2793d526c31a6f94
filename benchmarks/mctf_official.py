"""tokenreduce's MCTF against the official MCTF code: golden fixtures (float64) and a timing.

The official code (mlvlab/MCTF, commit 2004da0cad3231fa74cbd60b6042b0bd133aacde: `models/deit.py`,
`models/modules/blocks.py`, `utils/mctf.py`) is not a dependency: clone it into a temporary folder
and pass that folder. Glue, all of it in this script: the checkout goes first on `sys.path` (its
packages are `models` and `utils`); its DeiT is built with its own keyword arguments
(`use_mctf`, `mctf_type`, `task_type`, `activate_layer`) and called as `model(x, r_eval=r)`, as
its `main.py --eval` does; the timm state dict loads into it unchanged (same key names). Nothing
of the official code is copied. Its `mctf_type` list is
[r, r_teacher_max, trace_source, prop_attn, one_step_ahead, tau_sim, tau_info, tau_size,
bidirection, pooling_type, (unused)]; the released DeiT evaluation is
[16, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0] on blocks 1..11 (run/eval_deit_{t,s}_mctf.sh).

With --record OUT_DIR --fixtures DIR: runs the official model on the fixture DeiT-Tiny
(`DIR/deit_tiny_random.safetensors`, the 4 images of `DIR/images.safetensors:x`) in float64
(`torch.set_default_dtype(torch.float64)`, `model.double()`: the official code makes some
tensors in the default dtype) for each setting of `SETTINGS` and writes `OUT_DIR/mctf_NAME
.safetensors` with `logits` [4, 1000] float64, `tokens_per_block` [4, 12] int64 (tokens after
each block) and `owner_blk{i}` [4, 197] int32 (the output row of block i that holds each original
token, from the official source map, `trace_source`), and checks that ours agrees.

Without --record: the dense model, the official MCTF and ours (random weights, one random batch of
--batch-size, CPU float32) run side by side in rounds whose order alternates
(`tokenreduce.bench.round_robin`); prints each one's median time and the largest logit
difference (stops above 1e-4).

    git clone https://github.com/mlvlab/MCTF /tmp/mctf  # or any copy of it
    python benchmarks/mctf_official.py /tmp/mctf --batch-size 1
    python benchmarks/mctf_official.py /tmp/mctf --batch-size 32
    python benchmarks/mctf_official.py /tmp/mctf --record tests/methods/fixtures \
        --fixtures /path/to/fixtures
"""

import argparse
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file

import tokenreduce
from tokenreduce import flops
from tokenreduce.bench import side_by_side

RELEASED = {
    "r": 16,
    "trace_source": 0,
    "prop_attn": 1,
    "one_step_ahead": 1,
    "tau_sim": 1,
    "tau_info": 20,
    "tau_size": 40,
    "bidirection": 1,
    "pooling_type": 1,
}
"""The released DeiT evaluation setting, by the official names of `mctf_type`'s entries."""

SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "fast": {"r": 0.35, "activate_layer": (3, 6, 9)},
    "osa0": {"one_step_ahead": 0},
    "osa2_unidir_size": {"one_step_ahead": 2, "bidirection": 0, "pooling_type": 0, "r": 12},
    "max": {"pooling_type": 2, "tau_sim": 2, "tau_info": 10, "tau_size": 0},
    "mean_noprop": {"pooling_type": 3, "prop_attn": 0},
}
"""Recorded settings: official names, changes to `RELEASED`; activate_layer default 1..11."""

OFFICIAL_MODELS = {
    "deit_tiny_patch16_224": "deit_tiny",
    "deit_small_patch16_224": "deit_small",
    "deit_base_patch16_224": "deit_base",
}


def official_options(setting: dict[str, Any]) -> tuple[list, list[int], float]:
    """The official `mctf_type` list, `activate_layer` and `r_eval` of a setting."""
    o = {**RELEASED, **setting}
    mctf_type = [
        o["r"], 0, o["trace_source"], o["prop_attn"], o["one_step_ahead"],
        o["tau_sim"], o["tau_info"], o["tau_size"], o["bidirection"], o["pooling_type"], 0,
    ]  # fmt: skip
    layers = list(o.get("activate_layer", range(1, 12)))
    return mctf_type, layers, o["r"]


def our_options(setting: dict[str, Any]) -> dict[str, Any]:
    """tokenreduce's options of a setting (the same names; booleans as bool)."""
    options = {k: v for k, v in setting.items() if k != "trace_source"}
    for flag in ("prop_attn", "bidirection"):
        if flag in options:
            options[flag] = bool(options[flag])
    return options


def official_model(
    checkout: Path, name: str, setting: dict[str, Any], state: dict[str, torch.Tensor]
) -> tuple[torch.nn.Module, float]:
    """The official DeiT with MCTF (a setting of `SETTINGS`), the given weights, eval mode;
    and its r_eval."""
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from models import deit

    mctf_type, layers, r_eval = official_options(setting)
    model = getattr(deit, OFFICIAL_MODELS[name])(
        use_mctf=True, mctf_type=mctf_type, task_type=[1, 0, 0, 0], activate_layer=layers
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"weights do not fit the official model: {missing} {unexpected}")
    return model.eval(), r_eval


def owners_per_block(model: torch.nn.Module) -> list[torch.Tensor]:
    """Forward hooks on the official blocks: after each block, the row holding each original
    token ([B, N0] int32), read from the official source map."""
    owners: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        source = model.info["student_source"]
        if source is None:  # no block reduced yet: every token is its own row
            batch, tokens = output.shape[:2]
            owners.append(torch.arange(tokens, dtype=torch.int32).expand(batch, -1).clone())
        else:
            owners.append(source.argmax(dim=1).to(torch.int32))

    for block in model.blocks:
        block.register_forward_hook(hook)
    return owners


def record(checkout: Path, out_dir: Path, fixtures: Path) -> None:
    torch.set_default_dtype(torch.float64)
    state = load_file(fixtures / "deit_tiny_random.safetensors")
    images = load_file(fixtures / "images.safetensors")["x"].double()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, setting in SETTINGS.items():
        official, r_eval = official_model(
            checkout, "deit_tiny_patch16_224", {**setting, "trace_source": 1}, state
        )
        official.double()
        owners = owners_per_block(official)
        with torch.no_grad():
            logits = official(images, r_eval=r_eval)
        counts = [int((owner.max(dim=1).values + 1)[0]) for owner in owners]
        tensors = {
            "logits": logits,
            "tokens_per_block": torch.tensor([counts] * images.shape[0], dtype=torch.int64),
        }
        tensors.update({f"owner_blk{i}": owner for i, owner in enumerate(owners)})
        path = out_dir / f"mctf_{name}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        ours = timm.create_model("deit_tiny_patch16_224")
        ours.load_state_dict(state)
        tokenreduce.apply(ours.double().eval(), "mctf", **our_options(setting))
        with torch.no_grad():
            worst = (ours(images) - logits).abs().max().item()
        info = tokenreduce.last_info(ours)
        print(
            f"{path}: tokens {counts}; ours: logits max diff {worst:.1e}, tokens "
            f"{'equal' if info.tokens_per_block[0].tolist() == counts else 'DIFFER'}"
        )


def timing(checkout: Path, model_name: str, batch_size: int, rounds: int) -> None:
    torch.manual_seed(0)
    dense = timm.create_model(model_name).eval()
    official, r_eval = official_model(checkout, model_name, {}, dense.state_dict())
    ours = tokenreduce.apply(timm.create_model(model_name).eval(), "mctf")
    ours.load_state_dict(dense.state_dict())
    images = torch.randn(batch_size, 3, 224, 224)

    def run_official(x: torch.Tensor) -> torch.Tensor:
        return official(x, r_eval=r_eval)

    with torch.inference_mode():
        worst = (run_official(images) - ours(images)).abs().max().item()
        if worst > 1e-4:
            raise SystemExit(f"official and ours disagree: logits differ by {worst}")
        ideal = flops.dense_gmacs(dense) / flops.gmacs(ours, tokenreduce.last_info(ours)).mean
        forwards = {"dense": dense, "official": run_official, "ours": ours}
        lines = side_by_side(forwards, images, rounds, {"official": ideal, "ours": ideal})
    print(
        f"{model_name} MCTF (released setting), batch {batch_size}, cpu fp32, {rounds} rounds; "
        f"logits max diff {worst:.1e}"
    )
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a clone of mlvlab/MCTF")
    parser.add_argument("--record", type=Path, default=None, help="write fixtures here")
    parser.add_argument("--fixtures", type=Path, default=None, help="fixture weights and images")
    parser.add_argument("--model", default="deit_small_patch16_224", choices=OFFICIAL_MODELS)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if args.record is not None:
        if args.fixtures is None:
            parser.error("--record needs --fixtures (the folder of deit_tiny_random.safetensors)")
        record(args.checkout, args.record, args.fixtures)
    else:
        timing(args.checkout, args.model, args.batch_size, args.rounds)


if __name__ == "__main__":
    main()
