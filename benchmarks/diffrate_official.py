"""tokenreduce's DiffRate against the official DiffRate inference code, side by side.

The official code (OpenGVLab/DiffRate, commit 91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e:
`DiffRate/patch/deit.py`, `DiffRate/merge.py`, `DiffRate/ddp.py`, `compression_rate.json`) is not
a dependency: clone it into a temporary folder and pass that folder.

Default: times the dense model, the official DiffRate model and ours on one random batch (CPU
fp32 unless --device), in rounds whose order alternates (`tokenreduce.bench.round_robin`), after
checking that the two DiffRate models agree (stops above 1e-4). The schedule is a published
preset of `compression_rate.json` (--preset, the official `--model`/`--target_flops` pair).

With --record OUT_DIR: runs the official code on the fixture DeiT-Tiny (random weights and the
4 images of the shared fixture folder, --fixtures) in float64 and writes one safetensors file
per setting, diffrate_<setting>.safetensors: `logits` [4, 1000], `tokens_per_block` [4, 12],
and after every block i `owner_blk{i}` [4, 197] (int64: the row of the block's output that
holds original token j, from the official traced `source`; -1 once pruned) and `size_blk{i}`
[4, T_i, 1] (the official `size`), in the official token order.

With --record-search OUT_DIR: runs a few steps of the official search (the rates of
`DiffRate/ddp.py`, the training branch of `DiffRate/patch/deit.py` and its FLOPs, the loop of
`main.py`/`engine.py`) on the same model and images in float64 with fixed labels and writes
diffrate_search_<setting>.safetensors per setting of `SEARCHES`: the initial rate logits
(`prune_logits_init`, `merge_logits_init` [11, 49], blocks 1-11), and per step t the training
forward's `logits_step{t}` [4, 1000], its final key mask `mask_step{t}` [4, 197] (the official
`_diffrate_info["mask"]`), the rate logits after the step's update (`prune_logits_step{t}`,
`merge_logits_step{t}`), their gradients at step 0 (`prune_grad_step0`, `merge_grad_step0`), and
over the steps `loss`, `ce`, `gflops` [T] and the rounded `prune_kept`, `merge_kept` [T, 12]; the
metadata holds the setting and the official GFLOPs of the dense model (`dense_gflops`: its
patch-embedding and head terms differ from ours, a constant).

Glue (no line of the official algorithm is changed; the official files are imported as they are):
1. `timm.models.layers.helpers` no longer exists in timm 1.0; the official package imports
   `to_2tuple` from it (caformer.py, through `DiffRate/__init__.py`), so a module with timm's
   `to_2tuple` is registered under that name before the import.
2. `DiffRateBlock.forward` calls `self.drop_path`, which timm 1.0 names `drop_path1` (an identity
   at inference): each block gets `drop_path = drop_path1`. It also skips timm 1.0's `ls1`/`ls2`
   and `DiffRateAttention` skips `q_norm`/`k_norm`/`norm`: identities for DeiT.
3. The official model returns (logits, flops) unless called with `return_flop=False`.
4. `torch.set_default_dtype(torch.float64)` while recording: the official size, mask and source
   are created by `torch.ones`/`torch.eye` without a dtype.
5. Counts are set with the official `set_kept_num`, as its `main.py --load_compression_rate` does.
Search only:
6. The official rate modules are created in float32 (`torch.arange(...).float()`): the model is
   cast to float64 after the patch. Its float32 casts for mixed precision (`softmax_with_policy`'s
   `.to(torch.float32)`, `calculate_flop_training`'s `.float()`) keep float64 while recording:
   the patch module's `torch` is a copy whose `float32` is `torch.float64`, and `Tensor.float`
   leaves a float64 tensor as it is.
7. The loop is `engine.train_one_epoch` without its logging, amp autocast and loss scaler (both
   identities on the CPU): `loss = lamb * ((flops / 1e9) - target_flops) ** 2 + criterion(outputs,
   targets)`, `optimizer.zero_grad()`, `loss.backward()`, `optimizer.step()`, with `main.py`'s
   optimizer (`AdamW(arch_parameters(), lr=arch_lr, weight_decay=0)`), criterion
   (`LabelSmoothingCrossEntropy(0.1)`: mixup off) and scheduler (`CosineLRScheduler(t_initial=
   epochs, lr_min=arch_min_lr)`, `step(epoch)` after each epoch; timm 1.0 no longer takes
   `decay_rate`, which acts between cycles only). The backbone is frozen as there: only the rates
   are in the optimizer.
Instrumentation only: a forward hook on each block reads `_diffrate_info["size"]` and
`["source"]` (`trace_source=True`) after it.

    git clone https://github.com/OpenGVLab/DiffRate /tmp/diffrate  # or any copy of it
    python benchmarks/diffrate_official.py /tmp/diffrate --batch-size 1
    python benchmarks/diffrate_official.py /tmp/diffrate --batch-size 32
    python benchmarks/diffrate_official.py /tmp/diffrate --record tests/methods/fixtures \
        --fixtures ../shared/data/fixtures
    python benchmarks/diffrate_official.py /tmp/diffrate --record-search tests/methods/fixtures \
        --fixtures ../shared/data/fixtures
"""

import argparse
import contextlib
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import timm
import timm.layers
import torch

import tokenreduce
from tokenreduce import flops
from tokenreduce.bench import side_by_side
from tokenreduce.runtime import precision_context

# recorded settings: name -> (prune_kept_num, merge_kept_num) or the preset they come from
CUSTOM = (
    [197, 197, 150, 150, 120, 120, 90, 90, 60, 60, 30, 10],
    [197, 180, 150, 130, 120, 100, 90, 70, 60, 40, 30, 10],
)
SETTINGS = {
    "s2.9": "ViT-S-DeiT/2.9",  # the default preset on the 12-block DeiT-Tiny
    "t1.0": "ViT-T-DeiT/1.0",  # milder; block 7 keeps everything (merge 156 > 148 tokens)
    "custom": CUSTOM,  # pure merging (block 1) and pure pruning (blocks 2, 4, 6, 8, 10, 11)
}


# recorded searches: name -> settings. Initial logits: zeros (the official start), or a bump
# around a kept patch count per searched block ("centres", rows prune and merge, blocks 1-11)
# plus seeded noise, so that blocks prune and merge from the first step; block 4 only merges
# (its prune count is above the tokens left), block 7 does nothing
SEARCHES = {
    "default": {  # the official start and recipe: lr 0.01 -> 0.001, lambda 5, 3 epochs
        "centres": None, "noise": 0.0, "arch_lr": 0.01, "target_flops": 0.8, "lamb": 5.0,
        "epochs": 3, "steps_per_epoch": 1,
    },
    "profile": {
        "centres": (
            (176, 162, 150, 196, 136, 124, 196, 110, 96, 80, 60),
            (166, 150, 140, 130, 126, 112, 196, 100, 86, 70, 50),
        ),
        "noise": 0.3, "arch_lr": 0.05, "target_flops": 0.6, "lamb": 5.0,
        "epochs": 3, "steps_per_epoch": 2,
    },
}  # fmt: skip
SEARCH_LABELS = [3, 141, 592, 653]


def import_official(checkout: Path) -> types.ModuleType:
    """The official `DiffRate` package of `checkout` (glue 1)."""
    helpers = types.ModuleType("timm.models.layers.helpers")
    helpers.to_2tuple = timm.layers.to_2tuple
    sys.modules.setdefault("timm.models.layers.helpers", helpers)
    sys.path.insert(0, str(checkout))
    import DiffRate

    return DiffRate


def official_counts(checkout: Path, preset: str) -> tuple[list[int], list[int]]:
    """(prune_kept_num, merge_kept_num) of "<model>/<target_flops>" in compression_rate.json."""
    model, target = preset.split("/")
    entry = json.loads((checkout / "compression_rate.json").read_text())[model][target]
    return json.loads(entry["prune_kept_num"]), json.loads(entry["merge_kept_num"])


def official_model(
    package: types.ModuleType,
    model: torch.nn.Module,
    counts: tuple[list[int], list[int]],
    trace: bool,
) -> torch.nn.Module:
    """`model` patched by the official `DiffRate.patch.deit` with the given kept counts."""
    package.patch.deit(model, trace_source=trace)
    for block in model.blocks:
        block.drop_path = block.drop_path1  # glue 2
    model.set_kept_num(*counts)
    return model.eval()


def ours(model: torch.nn.Module, counts: tuple[list[int], list[int]]) -> torch.nn.Module:
    return tokenreduce.apply(
        model, "diffrate", prune_kept_num=counts[0], merge_kept_num=counts[1], trace_source=True
    )


def owner_map(source: torch.Tensor) -> torch.Tensor:
    """[B, N0] row of `source` [B, T, N0] holding each original token, -1 where none does."""
    held = source.amax(dim=1) > 0
    return torch.where(held, source.argmax(dim=1), -1)


def traced_run(
    model: torch.nn.Module, images: torch.Tensor
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The official logits, owner map and size after every block, and the tokens per block."""
    tensors: dict[str, torch.Tensor] = {}
    tokens: list[int] = []

    def after_block(index: int):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            info = model._diffrate_info
            tokens.append(output.shape[1])
            tensors[f"owner_blk{index}"] = owner_map(info["source"])
            tensors[f"size_blk{index}"] = info["size"].clone()

        return hook

    handles = [b.register_forward_hook(after_block(i)) for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        tensors["logits"] = model(images, return_flop=False)  # glue 3
    for handle in handles:
        handle.remove()
    return tensors, tokens


def record(checkout: Path, fixtures: Path, out_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    package = import_official(checkout)
    torch.set_default_dtype(torch.float64)  # glue 4
    weights = load_file(fixtures / "deit_tiny_random.safetensors")
    images = load_file(fixtures / "images.safetensors")["x"].double()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, setting in SETTINGS.items():
        counts = official_counts(checkout, setting) if isinstance(setting, str) else setting
        model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
        model.load_state_dict(weights)
        model = official_model(package, model.double(), counts, trace=True)
        tensors, tokens = traced_run(model, images)
        tensors["tokens_per_block"] = torch.tensor([tokens] * images.shape[0])
        metadata = {
            "official_commit": "91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e",
            "prune_kept_num": json.dumps(counts[0]),
            "merge_kept_num": json.dumps(counts[1]),
        }
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(out_dir / f"diffrate_{name}.safetensors"),
            metadata,
        )
        print(f"{name}: tokens per block {tokens}")


@contextlib.contextmanager
def float64_casts(deit_module: types.ModuleType) -> Iterator[None]:
    """The official search's float32 casts keep float64 tensors as they are (glue 6)."""
    float_cast = torch.Tensor.float

    def keep_float64(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self if self.dtype == torch.float64 else float_cast(self, *args, **kwargs)

    deit_module.torch = types.SimpleNamespace(**{**vars(torch), "float32": torch.float64})
    torch.Tensor.float = keep_float64
    try:
        yield
    finally:
        torch.Tensor.float = float_cast
        deit_module.torch = torch


def record_search(checkout: Path, fixtures: Path, out_dir: Path) -> None:
    from safetensors.torch import load_file, save_file
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.scheduler.cosine_lr import CosineLRScheduler

    package = import_official(checkout)
    deit_module = sys.modules["DiffRate.patch.deit"]
    torch.set_default_dtype(torch.float64)  # glue 4
    weights = load_file(fixtures / "deit_tiny_random.safetensors")
    images = load_file(fixtures / "images.safetensors")["x"].double()
    labels = torch.tensor(SEARCH_LABELS)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, setting in SEARCHES.items():
        model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
        model.load_state_dict(weights)
        package.patch.deit(model, prune_granularity=4, merge_granularity=4)
        for block in model.blocks:
            block.drop_path = block.drop_path1  # glue 2
        model = model.double()  # glue 6
        model.set_kept_num([197] * 12, [197] * 12)
        dense_gflops = float(model.calculate_flop_inference()) / 1e9
        searched = model.blocks[1:]
        size = (len(searched), len(searched[0].prune_ddp.kept_token_candidate))
        tensors: dict[str, torch.Tensor] = {}
        candidates = searched[0].prune_ddp.kept_token_candidate.detach()
        for row, (kind, seed) in enumerate((("prune", 1), ("merge", 2))):
            noise = torch.randn(size, generator=torch.Generator().manual_seed(seed))
            init = noise * setting["noise"]
            if setting["centres"] is not None:
                centre = torch.tensor(setting["centres"][row], dtype=torch.float64)[:, None]
                init = init - 0.5 * ((candidates[None] - centre) / 16) ** 2
            tensors[f"{kind}_logits_init"] = init
            with torch.no_grad():
                for block, row in zip(searched, init, strict=True):
                    getattr(block, f"{kind}_ddp").selected_probability.copy_(row)
        optimizer = torch.optim.AdamW(
            model.arch_parameters(), lr=setting["arch_lr"], weight_decay=0
        )
        scheduler = CosineLRScheduler(
            optimizer, t_initial=setting["epochs"], lr_min=setting["arch_lr"] / 10
        )
        criterion = LabelSmoothingCrossEntropy(smoothing=0.1)
        rows: dict[str, list] = {key: [] for key in ("loss", "ce", "gflops", "lr")}
        kept: dict[str, list] = {"prune": [], "merge": []}
        model.train()
        step = 0
        with float64_casts(deit_module):
            for epoch in range(setting["epochs"]):
                for _ in range(setting["steps_per_epoch"]):
                    outputs, flops = model(images)  # glue 7: the loop of engine.py
                    loss_cls = criterion(outputs, labels)
                    loss_flops = ((flops / 1e9) - setting["target_flops"]) ** 2
                    loss = setting["lamb"] * loss_flops + loss_cls
                    optimizer.zero_grad()
                    loss.backward()
                    rows["lr"].append(optimizer.param_groups[0]["lr"])
                    optimizer.step()
                    info = model._diffrate_info
                    tensors[f"logits_step{step}"] = outputs.detach()
                    tensors[f"mask_step{step}"] = info["mask"].detach()
                    for kind in ("prune", "merge"):
                        kept[kind].append([int(n) for n in info[f"{kind}_kept_num"]])
                        ddps = [getattr(b, f"{kind}_ddp") for b in searched]
                        logits = torch.stack([d.selected_probability.detach() for d in ddps])
                        tensors[f"{kind}_logits_step{step}"] = logits.clone()
                        if step == 0:
                            grads = [d.selected_probability.grad for d in ddps]
                            tensors[f"{kind}_grad_step0"] = torch.stack(grads).clone()
                    rows["loss"].append(loss.item())
                    rows["ce"].append(loss_cls.item())
                    rows["gflops"].append(flops.item() / 1e9)
                    step += 1
                scheduler.step(epoch)
        for key in ("loss", "ce", "gflops"):
            tensors[key] = torch.tensor(rows[key])
        for kind in ("prune", "merge"):
            tensors[f"{kind}_kept"] = torch.tensor(kept[kind])
        tensors["labels"] = labels
        metadata = {
            "official_commit": "91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e",
            "setting": json.dumps(setting),
            "granularity": "4",
            "dense_gflops": repr(dense_gflops),
            "learning_rates": json.dumps(rows["lr"]),
        }
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(out_dir / f"diffrate_search_{name}.safetensors"),
            metadata,
        )
        print(f"{name}: prune kept per step {kept['prune']}, merge {kept['merge']}")
        print(f"  loss {rows['loss']}, GFLOPs {rows['gflops']}, lr {rows['lr']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a clone of OpenGVLab/DiffRate")
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm DeiT (random)")
    parser.add_argument("--preset", default="ViT-S-DeiT/2.9", help="<model>/<target_flops>")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--record", type=Path, default=None, help="write fixtures there")
    parser.add_argument(
        "--record-search", type=Path, default=None, help="write search fixtures there"
    )
    parser.add_argument("--fixtures", type=Path, default=Path("../shared/data/fixtures"))
    args = parser.parse_args()
    if args.record is not None:
        record(args.checkout, args.fixtures, args.record)
        return
    if args.record_search is not None:
        record_search(args.checkout, args.fixtures, args.record_search)
        return
    package = import_official(args.checkout)
    counts = official_counts(args.checkout, args.preset)
    torch.manual_seed(0)
    dense = timm.create_model(args.model).eval()
    official = timm.create_model(args.model).eval()
    official.load_state_dict(dense.state_dict())
    official = official_model(package, official, counts, trace=False)
    reduced = tokenreduce.apply(
        timm.create_model(args.model).eval(),
        "diffrate",
        prune_kept_num=counts[0],
        merge_kept_num=counts[1],
    )
    reduced.load_state_dict(dense.state_dict())
    for model in (dense, official, reduced):
        model.to(args.device)
    images = torch.randn(args.batch_size, 3, *dense.patch_embed.img_size, device=args.device)
    device = torch.device(args.device).type

    def official_forward(x: torch.Tensor) -> torch.Tensor:
        return official(x, return_flop=False)

    with torch.inference_mode():
        worst = (official_forward(images) - reduced(images)).abs().max().item()
        if worst > 1e-4:
            raise SystemExit(f"official and ours disagree: logits differ by {worst}")
        ideal = flops.dense_gmacs(dense) / flops.gmacs(reduced, tokenreduce.last_info(reduced)).mean
    with precision_context(device, args.amp, torch.bfloat16):
        forwards = {"dense": dense, "official": official_forward, "ours": reduced}
        lines = side_by_side(forwards, images, args.rounds, {"official": ideal, "ours": ideal})
    print(
        f"{args.model} DiffRate {args.preset}, batch {args.batch_size}, {args.device}"
        f"{' bf16' if args.amp else ''}, {args.rounds} rounds; logits max diff {worst:.1e}"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
