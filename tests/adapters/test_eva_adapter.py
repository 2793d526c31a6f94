"""The timm Eva family (DINOv3, EVA-02, Perception Encoder, RoPE ViTs): every method runs, a
reduction that reduces nothing is bit-exact, pruning equals masking keys in timm's own blocks,
rotary positions travel with the tokens, GMACs match the FLOP counter."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, RotaryEmbeddingDinoV3
from timm.models.eva import Eva

import tokenreduce
from tests.adapters.test_flops import counted_gmacs
from tests.conftest import apply_unless_refused, tiny_vit
from tokenreduce.errors import UnsupportedModelError
from tokenreduce.patch.rope import RotaryPositions, RotaryTable

DEPTH = 3
"""Blocks per test model: every block type and code path, at a fraction of the full depth."""

MODELS = {
    "dinov3_s": ("vit_small_patch16_dinov3", {}),
    "dinov3_b": ("vit_base_patch16_dinov3", {}),
    "eva02_t": ("eva02_tiny_patch14_224", {}),
    "eva02_b": ("eva02_base_patch14_224", {}),
    "pe_core_s": ("vit_pe_core_small_patch16_384", {}),
    "rope_axial_b": ("vit_base_patch16_rope_224", {}),
    "rope_mixed_b": ("vit_base_patch16_rope_mixed_224", {}),
}
VARIANTS = {
    "post_norm": ("eva02_tiny_patch14_224", {"use_post_norm": True}),
    "qk_norm": ("eva02_tiny_patch14_224", {"qk_norm": True}),
    "no_class_token": ("eva02_tiny_patch14_224", {"class_token": False, "global_pool": "avg"}),
    "grouped_kv": ("vit_base_patch16_rope_224", {"qkv_fused": False, "num_kv_heads": 4}),
}

METHODS = [
    ("tome", {"r": 16}),
    ("tome", {"r": 16, "rope_position": "destination"}),
    ("evit", {"keep_rate": 0.7}),
    ("topk", {"keep_rate": 0.7}),
    ("ppt", {"r": 40}),
    ("ppt", {"r": 40, "threshold": math.inf}),
    ("bat", {"keep_rate": 0.7}),
    ("ltmp", {"merge_thresholds": 0.3, "prune_thresholds": 0.0}),
    ("asvit", {"thresholds": 0.98}),
    ("asvit", {"thresholds": 0.98, "fuse": True}),
    ("pitome", {"ratio": 0.8}),
    ("diffrate", {}),
    ("diffrate", {"rope_position": "destination"}),
    ("ats", {}),
    ("tofu", {"r": 16}),
    ("gtp", {}),
    ("mctf", {"r": 12}),
]


def eva(name: str, dtype: torch.dtype = torch.float32, **kwargs) -> torch.nn.Module:
    return tiny_vit(name, depth=DEPTH, **kwargs).to(dtype)


def images(model: torch.nn.Module, batch: int, dtype: torch.dtype = torch.float32):
    return torch.randn(batch, 3, *model.patch_embed.img_size, dtype=dtype)


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    for block in model.blocks:
        block.attn.fused_attn = fused


@pytest.mark.parametrize("key", sorted(MODELS) + sorted(VARIANTS))
def test_every_method_runs_and_remove_restores(key):
    name, kwargs = {**MODELS, **VARIANTS}[key]
    model = eva(name, **kwargs)
    cls = type(model)
    dense_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    for batch in (2, 8):
        x = images(model, batch)
        with torch.no_grad():
            dense = model(x)
        for method, options in METHODS:
            if not apply_unless_refused(model, method, **options):
                continue
            with torch.no_grad():
                out = model(x)
            counts = tokenreduce.last_info(model).tokens_per_block
            assert out.shape == dense.shape and torch.isfinite(out).all(), (method, options)
            assert counts.shape == (batch, DEPTH)
            assert (counts[:, -1] < dense_tokens).any(), (method, options, counts)
        tokenreduce.remove(model)
        assert type(model) is cls
        with torch.no_grad():
            assert torch.equal(model(x), dense)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("key", sorted(MODELS) + sorted(VARIANTS))
def test_nothing_reduced_is_bit_identical(key, fused):
    """keep_rate 1 runs the adapter's own attention path at every reducing block; r=0 runs
    timm's blocks: both give timm's output bit for bit, fused and explicit attention."""
    name, kwargs = {**MODELS, **VARIANTS}[key]
    model = eva(name, torch.float64, **kwargs)
    set_fused(model, fused)
    x = images(model, 2, torch.float64)
    with torch.no_grad():
        dense = model(x)
    noops = [("tome", {"r": 0})]
    if model.cls_token is not None:
        noops += [("ppt", {"r": 0}), ("evit", {"keep_rate": 1.0}), ("topk", {"keep_rate": 1.0})]
    for method, options in noops:
        tokenreduce.apply(model, method, **options)
        with torch.no_grad():
            out = model(x)
        tokenreduce.remove(model)
        assert torch.equal(out, dense), (method, options)


def masked_reference(model: torch.nn.Module, x: torch.Tensor, kept: list[torch.Tensor]):
    """timm's own blocks on every token, each token removed as a key (attn_mask -inf) from the
    block after the one that pruned it. kept: per block, bool [B, N0] of tokens alive after it."""
    tokens = model.patch_embed(x)
    tokens, rope = model._pos_embed(tokens)
    tokens = model.norm_pre(tokens)
    alive = torch.ones(tokens.shape[:2], dtype=torch.bool)
    for i, block in enumerate(model.blocks):
        bias = torch.zeros(alive.shape, dtype=tokens.dtype).masked_fill(~alive, -math.inf)
        block_rope = rope[i] if getattr(model, "rope_mixed", False) else rope
        tokens = block(tokens, rope=block_rope, attn_mask=bias[:, None, None, :])
        alive = kept[i]
    return model.norm(tokens)


@pytest.mark.parametrize("method", [("topk", {"keep_rate": 0.6}), ("asvit", {"thresholds": 0.98})])
@pytest.mark.parametrize("key", ["dinov3_s", "eva02_t", "pe_core_s", "rope_mixed_b", "grouped_kv"])
def test_pruning_equals_masking_keys_in_timm_blocks(key, method):
    """Pruned tokens take their rotary positions with them: the reduced class token equals
    timm's blocks on all tokens with the pruned ones masked out as keys (float64)."""
    name, kwargs = {**MODELS, **VARIANTS}[key]
    model = eva(name, torch.float64, **kwargs)
    x = images(model, 3, torch.float64)
    tokenreduce.apply(model, method[0], trace_source=True, **method[1])
    with torch.no_grad():
        reduced = model.forward_features(x)
    info = tokenreduce.last_info(model)
    tokenreduce.remove(model)
    kept = [source.any(dim=1) for source in info.source_blk]
    assert not kept[-1].all()
    with torch.no_grad():
        reference = masked_reference(model, x, kept)
    assert (reduced[:, 0] - reference[:, 0]).abs().max() < 1e-10


@pytest.mark.parametrize("key", ["dinov3_s", "eva02_t", "pe_core_s", "rope_mixed_b"])
@pytest.mark.parametrize(
    "method", [("tome", {"r": 16}), ("evit", {}), ("ppt", {}), ("bat", {}), ("tofu", {"r": 16})]
)
def test_gmacs_match_flop_counter(key, method):
    name, kwargs = MODELS[key]
    model = eva(name, **kwargs)
    x = images(model, 1)
    assert abs(counted_gmacs(model, x) - tokenreduce.flops.dense_gmacs(model)) < 0.01 * (
        tokenreduce.flops.dense_gmacs(model)
    )
    tokenreduce.apply(model, method[0], **method[1])
    counted = counted_gmacs(model, x)
    analytic = tokenreduce.flops.gmacs(model, tokenreduce.last_info(model)).mean_total
    assert abs(counted - analytic) / analytic < 0.01, (counted, analytic)


ROPES = {
    "cat_index": lambda offset: RotaryEmbeddingCat(
        32, in_pixels=False, feat_shape=[6, 5], grid_offset=offset, ref_feat_shape=[4, 4]
    ),
    "cat_xy": lambda offset: RotaryEmbeddingCat(
        32, in_pixels=False, feat_shape=[6, 5], grid_offset=offset, grid_indexing="xy"
    ),
    "dinov3": lambda offset: RotaryEmbeddingDinoV3(32, feat_shape=[6, 5], grid_offset=offset),
}


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_rotary_embedding_at_fractional_positions(kind):
    """Off the grid, the embedding is timm's at shifted coordinates: timm's module built with
    grid_offset 0.25 gives the embedding at every (row + 0.25, column + 0.25); on the grid it is
    timm's table row itself."""
    rope, shifted = ROPES[kind](0.0), ROPES[kind](0.25)
    positions = RotaryPositions(rope)
    table = RotaryTable(rope.get_embed().double(), (6, 5))
    grid = torch.stack(torch.meshgrid(torch.arange(6), torch.arange(5), indexing="ij"), -1)
    grid = grid.reshape(1, -1, 2).double()
    on_grid = positions.embed(grid, table, 0)
    assert torch.equal(on_grid[0, 0], table.table)
    moved = positions.embed(grid + 0.25, table, 0)
    torch.testing.assert_close(moved[0, 0], shifted.get_embed().double(), atol=2e-6, rtol=0)


def test_rotary_embedding_per_depth_off_grid():
    model = eva("vit_base_patch16_rope_mixed_224", torch.float64)
    positions = RotaryPositions(model.rope)
    table = RotaryTable(model.rope.get_embed(), (14, 14))
    grid = torch.stack(torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij"), -1)
    grid = grid.reshape(1, -1, 2).double()
    for depth in range(DEPTH):
        nudged = positions.embed(grid + 1e-9, table, depth)
        assert nudged.shape == (1, 12, 196, 128)
        torch.testing.assert_close(nudged[0], table.table[depth], atol=5e-6, rtol=0)


def test_merged_position_rules_differ_and_are_recorded():
    model = eva("eva02_tiny_patch14_224", torch.float64)
    x = images(model, 2, torch.float64)
    outputs = {}
    for rule in ("mean", "destination"):
        tokenreduce.apply(model, "tome", r=40, rope_position=rule)
        with torch.no_grad():
            outputs[rule] = model(x)
        state = tokenreduce.patch.attached_engine(model).final_state()
        sizes = state.size[..., 0]
        merged = sizes > 1
        assert merged.any()
        fractional = (state.position != state.position.round()).any(dim=-1)
        # mean: merged tokens sit between their patches; destination: always on a grid point
        assert fractional[merged].any() if rule == "mean" else not fractional.any()
    tokenreduce.remove(model)
    assert not torch.equal(outputs["mean"], outputs["destination"])


def test_rope_position_needs_a_rotary_model():
    with pytest.raises(ValueError, match="rope_position='destination' applies to models with"):
        tokenreduce.apply(tiny_vit(), "tome", rope_position="destination")
    with pytest.raises(ValueError, match="rope_position='middle'.*accepted: 'mean' or"):
        tokenreduce.apply(eva("eva02_tiny_patch14_224"), "tome", rope_position="middle")


@pytest.mark.parametrize(
    "name,kwargs,cls",
    [
        ("swin_tiny_patch4_window7_224", {}, "SwinTransformer"),
        ("convnext_atto", {}, "ConvNeXt"),
        ("beit_base_patch16_224", {"depth": 1}, "Beit"),
    ],
)
def test_unsupported_models_are_named_with_what_is_supported(name, kwargs, cls):
    model = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(TypeError, match=f"unsupported model class {cls};.*timm Vision.*timm Eva"):
        tokenreduce.apply(model, "tome")


def test_other_families_are_named_with_what_is_supported():
    tower = type("ModifiedResNet", (torch.nn.Module,), {"__module__": "somelib.model"})
    with pytest.raises(TypeError, match="unsupported model class ModifiedResNet; supported: timm"):
        tokenreduce.apply(tower(), "tome")


def test_training_time_rope_augmentation_is_refused():
    model = eva("vit_small_patch16_dinov3", rope_shift_coords=0.1)
    tokenreduce.apply(model, "tome", r=4)
    model.train()
    with pytest.raises(ValueError, match="coordinate augmentation"):
        model(images(model, 1))
    model.eval()
    with torch.no_grad():
        model(images(model, 1))


def test_optional_family_adapter_is_imported_when_its_model_comes(monkeypatch):
    """A lazily registered family's adapter module is imported (and its adapter registered, first
    in line) only once a model of that family is applied."""
    import sys

    from tests.adapters.lazyfamily import LazyViT
    from tokenreduce import patch

    monkeypatch.setattr(patch, "ADAPTERS", list(patch.ADAPTERS))
    monkeypatch.setattr(patch, "LAZY_ADAPTERS", {})
    monkeypatch.delitem(sys.modules, "tests.adapters.lazyfamily.adapter", raising=False)
    monkeypatch.setattr(LazyViT, "__module__", "lazyfamily_pkg.models")
    target = "tests.adapters.lazyfamily.adapter:LazyViTAdapter"
    patch.register_lazy_adapter("lazyfamily_pkg", target)
    assert "tests.adapters.lazyfamily.adapter" not in sys.modules
    tokenreduce.apply(tiny_vit(), "tome", r=4)  # a timm model does not import it
    assert "tests.adapters.lazyfamily.adapter" not in sys.modules
    torch.manual_seed(0)
    model = LazyViT(depth=2, embed_dim=96, num_heads=2).eval()
    tokenreduce.apply(model, "tome", r=4)
    assert type(tokenreduce.patch.attached_engine(model).adapter).__name__ == "LazyViTAdapter"
    assert patch.ADAPTERS[0].__name__ == "LazyViTAdapter" and not patch.LAZY_ADAPTERS


def test_destination_rule_needs_a_merging_method():
    with pytest.raises(ValueError, match="topk merges none"):
        tokenreduce.apply(eva("eva02_tiny_patch14_224"), "topk", rope_position="destination")


def test_max_pooling_ignores_padding():
    """timm's "max" pool over a ragged batch: padding rows (zeros) never win the max."""
    model = tiny_vit("vit_tiny_patch16_224", global_pool="max", img_size=64).double()
    with torch.no_grad():
        model.head.weight.fill_(0)  # only the pooled features matter
    tokenreduce.apply(model, "asvit", thresholds=0.98, layers=(0,))
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        features = model.forward_features(x)
        valid = tokenreduce.patch.attached_engine(model).final_state().valid
        assert valid is not None and not valid.all()  # the batch really holds padding
        features = torch.where(valid[..., None], features - 100.0, 0.0)  # real rows negative
        pooled = model.pool(features)
    assert (pooled < -50).all()


def test_a_missing_optional_extra_is_named(monkeypatch):
    from tokenreduce import patch

    monkeypatch.setitem(patch.LAZY_ADAPTERS, "fakefamily", "fakefamily_not_installed:Adapter")
    monkeypatch.setitem(patch.LAZY_EXTRAS, "fakefamily", "fake")
    model = type("Tower", (torch.nn.Module,), {"__module__": "fakefamily.models"})()
    with pytest.raises(
        TypeError, match=r"optional extra 'fake': pip install 'tokenreduce\[fake\]'"
    ):
        tokenreduce.apply(model, "tome")


def test_key_heads_that_differ_by_block_are_refused_in_one_line():
    model = Eva(
        img_size=32, patch_size=8, embed_dim=96, depth=3, num_heads=6, attn_type="rope",
        num_kv_heads=(6, 2, 6), qkv_fused=False, num_classes=10, use_rot_pos_emb=True,
    ).eval()  # fmt: skip
    with pytest.raises(
        UnsupportedModelError,
        match=r"^Eva with key heads that differ by block \(num_kv_heads=\(6, 2, 6\)\) is not "
        r"supported; accepted: the same num_kv_heads in every block$",
    ):
        tokenreduce.apply(model, "tome", r=2)
