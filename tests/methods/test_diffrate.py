"""DiffRate (docs/methods.md §3.9): the official code's float64 outputs, the published
schedules, the rule that carries them to any model, and the options.

Fixtures tests/methods/fixtures/diffrate_*.safetensors were recorded by
`benchmarks/diffrate_official.py --record` with OpenGVLab/DiffRate at commit
91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e on the shared random-weight DeiT-Tiny and its 4 images.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import tokenreduce
from tests.conftest import reduced_forward, tiny_vit
from tokenreduce.methods.diffrate import PRESETS, DiffRateConfig, kept_counts

OURS = Path(__file__).parent / "fixtures"
SETTINGS = ["s2.9", "t1.0", "custom"]


def recorded(name: str) -> tuple[dict[str, torch.Tensor], list[int], list[int]]:
    path = OURS / f"diffrate_{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    prune, merge = (json.loads(metadata[f"{kind}_kept_num"]) for kind in ("prune", "merge"))
    return load_file(str(path)), prune, merge


def owner_map(source: torch.Tensor) -> torch.Tensor:
    """[B, N0] row of the traced `source` [B, T, N0] holding each original token, -1: none."""
    return torch.where(source.any(dim=1), source.double().argmax(dim=1), -1)


def per_token(owner: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Row-order-free view of per-row values rows [B, T, k]: each original token's row values
    (0 where pruned), and the smallest original token sharing its row (-1 where pruned)."""
    index = owner.clamp_min(0).unsqueeze(-1).expand(-1, -1, rows.shape[-1])
    values = torch.where(owner.unsqueeze(-1) >= 0, rows.gather(1, index), 0.0)
    first = torch.full((owner.shape[0], rows.shape[1] + 1), owner.shape[1], dtype=torch.long)
    columns = torch.arange(owner.shape[1]).expand_as(owner)
    first = first.scatter_reduce(1, owner.clamp_min(-1) + 1, columns, "amin")[:, 1:]
    group = torch.where(owner >= 0, first.gather(1, owner.clamp_min(0)), -1)
    return values, group


@pytest.mark.parametrize("name", SETTINGS)
def test_matches_official(fixture_model, images, name):
    """Logits within 1e-10, tokens per block and every decision (which original tokens each
    output row holds: pruning and merge partners) equal, sizes within 1e-12. Where a block
    reduces, the rows are in the official order; where it keeps every token the official code
    still sorts them (ours does not, §3.9), so the partition and sizes are compared per token."""
    ref, prune, merge = recorded(name)
    logits, info = reduced_forward(
        fixture_model, images, "diffrate", prune_kept_num=prune, merge_kept_num=merge,
        trace_source=True,
    )  # fmt: skip
    assert (logits - ref["logits"]).abs().max() <= 1e-10
    assert torch.equal(info.tokens_per_block, ref["tokens_per_block"])
    assert info.reduce_blocks, "the setting reduces"
    for block in range(12):
        owner, size = owner_map(info.source_blk[block]), info.sizes[block]
        if size is None:
            size = torch.ones(owner.shape[0], info.source_blk[block].shape[1], 1).double()
        if block in info.reduce_blocks:
            assert torch.equal(owner, ref[f"owner_blk{block}"]), block
            torch.testing.assert_close(size, ref[f"size_blk{block}"], atol=1e-12, rtol=0)
        else:
            ours_values, ours_group = per_token(owner, size)
            ref_values, ref_group = per_token(ref[f"owner_blk{block}"], ref[f"size_blk{block}"])
            assert torch.equal(ours_group, ref_group), block
            torch.testing.assert_close(ours_values, ref_values, atol=1e-12, rtol=0)


def test_fixture_settings_reduce_as_intended():
    """t1.0 has a block that keeps everything between reducing ones (block 7: merge 156 above
    the 148 tokens left); custom has pure merging (block 1) and pure pruning (block 2)."""
    assert recorded("t1.0")[0]["tokens_per_block"][0, 6:8].tolist() == [148, 148]
    ref, prune, merge = recorded("custom")
    assert prune[1] == 197 > merge[1] and prune[2] == merge[2] < 180


def test_presets_on_their_own_model_are_the_published_counts():
    dims = tokenreduce.describe(tiny_vit("deit_small_patch16_224"))
    for name, (prune, merge) in PRESETS.items():
        assert DiffRateConfig(preset=name).kept_nums(dims) == (list(prune), list(merge)), name
    assert DiffRateConfig().preset == "ViT-S-DeiT/2.9"


@pytest.mark.parametrize(
    "preset,counts,gmacs",
    [
        ("ViT-S-DeiT/2.9", [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3], 2.905),
        ("ViT-S-DeiT/2.3", [197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3], 2.327),
    ],
)
def test_deit_small_counts_and_gmacs(deit_small, preset, counts, gmacs):
    """The official README reports 2.905 GFLOPs for ViT-S-DeiT/2.9 (its FLOPs are our
    matmul-only MACs)."""
    tokenreduce.apply(deit_small, "diffrate", preset=preset)
    with torch.no_grad():
        deit_small(torch.randn(2, 3, 224, 224))
    info = tokenreduce.last_info(deit_small)
    report = tokenreduce.flops.gmacs(deit_small, info)
    tokenreduce.remove(deit_small)
    assert info.tokens_per_block.tolist() == [counts, counts]
    assert round(report.mean, 3) == gmacs
    assert (report.overhead_gmacs > 0).all()


@pytest.mark.parametrize("depth", [4, 24])
def test_default_on_any_depth(depth):
    """The default preset carried to another depth by relative depth and kept fraction:
    4 blocks read the 12-block schedule at blocks 0, 11/3, 22/3 and 11."""
    model = tiny_vit("vit_tiny_patch16_224", depth=depth, img_size=64, num_classes=10)
    tokenreduce.apply(model, "diffrate")
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(out).all()
    info = tokenreduce.last_info(model)
    counts = info.tokens_per_block[0].tolist()
    assert counts == sorted(counts, reverse=True) and counts[-1] == 2  # one patch token left
    if depth == 4:
        # merge fractions at t = 0, 11/3, 22/3, 11 of (197, 194, ..., 3) over 16 patches
        assert counts == [17, 13, 10, 2]


def test_kept_counts_rule():
    dims = tokenreduce.describe(tiny_vit("deit_small_distilled_patch16_224"))  # P = 2
    prune, merge = PRESETS["ViT-S-DeiT/2.9"]
    assert kept_counts(prune, 1, 196, dims, 1.0) == [c + 1 for c in prune]  # same patches kept
    assert kept_counts(prune, 1, 196, dims, 0.0) == [198] * 12
    # 384²: 576 patches, the same fractions
    dims = tokenreduce.describe(tiny_vit("deit_small_patch16_224", img_size=384))
    counts = kept_counts(prune, 1, 196, dims, 1.0)
    assert counts[0] == 577 and counts[9] == 1 + 227  # ceil(77 / 196 * 576) = ceil(226.3)


def test_distilled_model_keeps_prefix_in_place():
    model = tiny_vit("deit_small_distilled_patch16_224")
    tokenreduce.apply(model, "diffrate", trace_source=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    info = tokenreduce.last_info(model)
    published = [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3]  # ViT-S-DeiT/2.9
    assert info.tokens_per_block[0].tolist() == [c + 1 for c in published]
    for source in info.source_blk:
        assert source[:, 0, 0].all() and source[:, 1, 1].all()
        assert not source[:, 2:, :2].any(), "a prefix token was merged"
        assert (source.sum(dim=1) <= 1).all()


def test_rate_scale_zero_is_the_dense_model_and_larger_reduces_more():
    model = tiny_vit("vit_tiny_patch16_224", depth=6, img_size=64, num_classes=10).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        dense = model(x)
    logits, info = reduced_forward(model, x, "diffrate", rate_scale=0.0)
    assert torch.equal(logits, dense) and not info.reduce_blocks
    costs = []
    for scale in (0.5, 1.0, 1.5, 3.0):
        tokenreduce.apply(model, "diffrate", rate_scale=scale)
        with torch.no_grad():
            model(x)
        costs.append(tokenreduce.flops.gmacs(model, tokenreduce.last_info(model)).mean)
        tokenreduce.remove(model)
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]


def test_batch_equals_each_image_alone(fixture_model, images):
    batched, _ = reduced_forward(fixture_model, images, "diffrate")
    for i in range(images.shape[0]):
        alone, _ = reduced_forward(fixture_model, images[i : i + 1], "diffrate")
        torch.testing.assert_close(alone, batched[i : i + 1], atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "options,pattern",
    [
        ({"preset": "ViT-S-DeiT/3.0"}, r"preset='ViT-S-DeiT/3.0' is not accepted; accepted: ViT-T"),
        ({"prune_kept_num": [197] * 12}, r"given together or not at all"),
        ({"prune_kept_num": [197] * 11, "merge_kept_num": [197] * 11}, r"11 per-block.*12"),
        ({"prune_kept_num": [1] * 12, "merge_kept_num": [197] * 12}, r"prune_kept_num=\[1, "),
        ({"prune_kept_num": [True] * 12, "merge_kept_num": [197] * 12}, r"ints >= 2"),
        ({"merge_kept_num": 100, "prune_kept_num": 100}, r"prune_kept_num=100"),
        ({"rate_scale": -0.5}, r"rate_scale=-0.5 is not accepted; accepted: a finite number"),
        ({"rate_scale": True}, r"rate_scale=True"),
        ({"rate_scale": float("inf")}, r"rate_scale=inf"),
        ({"preset": []}, r"preset=\[\] is not accepted; accepted: ViT-T"),
    ],
)
def test_bad_options(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        tokenreduce.apply(tiny_vit(), "diffrate", **options)


def test_needs_a_class_token():
    model = tiny_vit("vit_tiny_patch16_224", class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="method 'diffrate'.*class token"):
        tokenreduce.apply(model, "diffrate")


def test_counts_below_prefix_and_one_patch_are_clamped(caplog):
    model = tiny_vit("deit_small_distilled_patch16_224", depth=2)  # P = 2
    x = torch.randn(1, 3, 224, 224)
    with caplog.at_level(logging.WARNING, logger="tokenreduce"):
        clamped, _ = reduced_forward(
            model, x, "diffrate", prune_kept_num=[198, 2], merge_kept_num=[100, 3]
        )
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert message.endswith("using prune_kept_num=(198, 3) instead")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokenreduce"):
        used, info = reduced_forward(
            model, x, "diffrate", prune_kept_num=[198, 3], merge_kept_num=[100, 3]
        )
    torch.testing.assert_close(clamped, used, atol=0, rtol=0)
    assert info.tokens_per_block[0].tolist() == [100, 3]


def test_a_rate_scale_that_clears_the_first_reducing_block_warns_with_the_counts(caplog):
    """rate_scale so large that the first block that reduces would keep no patch token: every
    block keeps one, and the warning names the counts that run, which given run the same."""
    model = tiny_vit("vit_tiny_patch16_224", depth=4, img_size=64)  # 17 tokens
    x = torch.randn(2, 3, 64, 64)
    with caplog.at_level(logging.WARNING, logger="tokenreduce"):
        scaled, _ = reduced_forward(model, x, "diffrate", rate_scale=1e6)
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert message.startswith("diffrate: option rate_scale=1000000.0 removes more than all")
    assert message.endswith("using prune_kept_num=(17, 2, 2, 2), merge_kept_num=(17, 2, 2, 2) "
                            "instead")  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokenreduce"):
        given, _ = reduced_forward(
            model, x, "diffrate", prune_kept_num=[17, 2, 2, 2], merge_kept_num=[17, 2, 2, 2]
        )
    assert not caplog.records
    torch.testing.assert_close(scaled, given, atol=0, rtol=0)


def test_gmacs_match_flop_counter_on_every_family():
    """Analytic GMACs (with the decision's own MACs) within 1% of torch's FlopCounterMode on a
    small model of each family beside timm's ViT (DeiT-S: tests/adapters/test_flops.py)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from tests.adapters import test_eva_adapter, test_hf_adapter, test_openclip_adapter
    from tests.adapters.test_flops import counted_gmacs
    from tests.conftest import assert_gmacs_match, pixels

    name, kwargs = test_eva_adapter.MODELS["eva02_t"]
    model = tokenreduce.apply(test_eva_adapter.eva(name, **kwargs), "diffrate")
    counted = counted_gmacs(model, test_eva_adapter.images(model, 1))
    assert_gmacs_match(model, counted, "diffrate")
    for name in ("ViTForImageClassification", "Dinov2Model"):
        model = test_hf_adapter.build(name, "eager", **test_hf_adapter.CLASSES[name])
        tokenreduce.apply(model, "diffrate")
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(pixel_values=pixels(2))
        assert_gmacs_match(model, counter.get_total_flops() / 2 / 2 / 1e9, "diffrate")
    model = test_openclip_adapter.tower(**test_openclip_adapter.TOWERS["tok"])
    tokenreduce.apply(model, "diffrate")
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(pixels(2))
    assert_gmacs_match(model, counter.get_total_flops() / 2 / 2 / 1e9, "diffrate")
