"""Patch-grid outputs of a reduced model: forward_intermediates and tokenreduce.patch_features
(every original token gets the feature of the token holding it; pruned ones their exit feature)."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from tests.conftest import peaky_vit, tiny_vit
from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.evit import attentive_keep
from tokenreduce.ops.merging import (
    Matching,
    bipartite_soft_matching,
    matching_destinations,
    merge_tokens,
)
from tokenreduce.ops.owners import (
    fill_from_nearest,
    follow,
    follow_rows,
    gather_destinations,
    held_features,
    record_exits,
)
from tokenreduce.patch import attached_engine
from tokenreduce.state import TokenState

METHODS = [
    ("tome", {"r": 12}),
    ("evit", {"keep_rate": 0.6, "layers": (1, 2)}),
    ("topk", {"keep_rate": 0.6, "layers": (1, 2)}),
    ("ppt", {"r": 30, "layers": (1, 2), "threshold": 0.0}),  # every image prunes
    ("ppt", {"r": 30, "layers": (1, 2), "threshold": float("inf")}),  # every image pools
    ("bat", {"keep_rate": 0.6, "layers": (1, 2)}),
    ("pitome", {"ratio": 0.7}),
    ("diffrate", {}),
    ("tofu", {"r": 12, "switch_block": 2}),
    ("gtp", {"num_prop": 4}),
    ("mctf", {"r": 12}),
]
LEARNED = [
    ("ltmp", {"merge_thresholds": 0.6, "prune_thresholds": 0.01}),
    ("asvit", {"thresholds": 0.3}),
    ("asvit", {"thresholds": 0.3, "fuse": True}),
    ("ats", {}),
]


def one_hot_owner(source: torch.Tensor) -> torch.Tensor:
    """Owner map from a 0/1 source map [B, N, N0] whose columns hold at most one 1."""
    held = source.sum(dim=1) > 0
    return torch.where(held, source.argmax(dim=1), -1)


# ---- hand-made cases ------------------------------------------------------------------------
def test_merged_tokens_go_to_their_destination():
    """N = 7 with one prefix token: A = rows 0, 2, 4, 6 and B = rows 1, 3, 5; A rows 2 and 6
    merge into B rows 1 and 5, A row 4 stays."""
    matching = Matching(
        unm_idx=torch.tensor([[0, 2]]),  # A positions 0 (row 0, the prefix) and 2 (row 4)
        src_idx=torch.tensor([[1, 3]]),  # rows 2 and 6
        dst_idx=torch.tensor([[0, 2]]),  # into B positions 0 and 2: rows 1 and 5
        order=None,
    )
    # outputs: [row 0, row 4, row 1 (+2), row 3, row 5 (+6)]
    assert matching_destinations(matching, 7).tolist() == [[0, 2, 2, 3, 1, 4, 4]]
    owner = torch.arange(7).unsqueeze(0)
    owner = follow(owner, matching_destinations(matching, 7))
    x = torch.arange(7.0).view(1, 7, 1)
    merged = merge_tokens(x, matching, "amax")  # [0, 4, 2, 3, 6]
    features, held = held_features(merged, owner, None)
    assert held.all()
    assert features.view(-1).tolist() == [0, 2, 2, 3, 4, 6, 6]


def test_matching_destinations_agree_with_merging_a_source_map():
    torch.manual_seed(0)
    for num_tokens, prefix in [(9, 0), (9, 1), (10, 2), (11, 3)]:
        metric = torch.randn(2, num_tokens, 4)
        matching = bipartite_soft_matching(metric, 3, prefix, sort_unmerged=prefix > 0)
        source = merge_tokens(torch.eye(num_tokens).expand(2, -1, -1), matching, "amax")
        expected = one_hot_owner(source)
        assert torch.equal(matching_destinations(matching, num_tokens), expected)


def test_pruned_token_keeps_its_feature_at_exit():
    x = torch.tensor([[[10.0], [11.0], [12.0], [13.0]]])
    owner = torch.tensor([[0, 1, 2, 3, 3]])  # original token 4 was merged into row 3 earlier
    kept = torch.tensor([[0, 2]])  # rows 1 and 3 are pruned
    after = follow_rows(owner, kept, 4)
    assert after.tolist() == [[0, -1, 1, -1, -1]]
    exited = record_exits(x, owner, after, None)
    assert exited.view(-1).tolist() == [0, 11, 0, 13, 13]
    later = torch.tensor([[[20.0], [22.0]]])
    features, held = held_features(later, after, exited)
    assert features.view(-1).tolist() == [20, 11, 22, 13, 13]
    assert held.tolist() == [[True, False, True, False, False]]


def test_fused_token_holds_nothing_and_its_members_exit():
    """EViT: the dropped tokens leave the sequence (their feature is recorded), the fused token
    that sums them holds no patch."""
    x = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [5.0]]])
    cls_attn = torch.tensor([[[0.0, 0.1, 0.5, 0.05, 0.35]]])  # [B, H, N]
    state = TokenState(num_prefix=1, owner=torch.arange(5).unsqueeze(0))
    x_new, state_new, _ = attentive_keep(x, state, cls_attn, keep_rate=0.5, fuse=True)
    assert x_new.shape[1] == 4  # class, two kept (rows 2 and 4), the fused token
    assert state_new.owner.tolist() == [[0, -1, 1, -1, 2]]
    exited = record_exits(x, state.owner, state_new.owner, None)
    features, held = held_features(x_new, state_new.owner, exited)
    assert features.view(-1).tolist() == [1, 2, 3, 4, 5]
    assert held.tolist() == [[True, False, True, False, True]]


def test_nearest_held_patch_fills_the_pruned_ones():
    """A 2 x 3 grid after one prefix token, features = patch index. Image 0 holds patches 0 and
    5; image 1 holds 0 and 2 (patch 1 is as near to both: the earlier wins); image 2 holds none
    and keeps its features."""
    features = torch.arange(7.0).view(1, 7, 1).repeat(3, 1, 1)
    held = torch.zeros(3, 7, dtype=torch.bool)
    held[:, 0] = True
    held[0, [1, 6]] = True
    held[1, [1, 3]] = True
    filled = fill_from_nearest(features, held, (2, 3), num_prefix=1)
    patches = filled[:, 1:, 0] - 1
    assert patches[0].tolist() == [0, 0, 5, 0, 5, 5]
    assert patches[1].tolist() == [0, 0, 2, 0, 0, 2]
    assert patches[2].tolist() == [0, 1, 2, 3, 4, 5]
    assert filled[:, 0, 0].tolist() == [0, 0, 0]


def test_padding_slots_hold_nothing():
    """A packed gather pads with arbitrary rows (here: row 1, which was dropped): padding must
    not make that row look kept."""
    index = torch.tensor([[0, 2, 3], [0, 1, 1]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    assert gather_destinations(index, 4, valid).tolist() == [[0, -1, 1, 2], [0, -1, -1, -1]]


# ---- whole models ---------------------------------------------------------------------------
def models():
    vit = tiny_vit(depth=4).double()
    eva = tiny_vit("eva02_tiny_patch14_224", depth=4).double()
    return {"deit": vit, "eva02": eva, "peaky": peaky_vit(depth=4)}


@pytest.fixture(scope="module")
def model_pair():
    return models()


def image_batch(model: torch.nn.Module, batch: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, *model.patch_embed.img_size, dtype=torch.float64)


@pytest.mark.parametrize("key", ["deit", "eva02"])
def test_nothing_reduced_grid_is_the_dense_tokens_bit_for_bit(model_pair, key):
    model = model_pair[key]
    x = image_batch(model, 2)
    with torch.no_grad():
        dense = model.forward_features(x)
        dense_intermediates = model.forward_intermediates(x, indices=[0, 2, 3], norm=True)
        dense_nlc = model.forward_intermediates(
            x, indices=2, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
        )
        assert torch.equal(tokenreduce.patch_features(model, x), dense)
        for method, options in [("tome", {"r": 0}), ("topk", {"keep_rate": 1.0})]:
            tokenreduce.apply(model, method, **options)
            try:
                assert torch.equal(tokenreduce.patch_features(model, x), dense), method
                final, grids = model.forward_intermediates(x, indices=[0, 2, 3], norm=True)
                assert torch.equal(final, dense)
                for grid, expected in zip(grids, dense_intermediates[1], strict=True):
                    assert torch.equal(grid, expected), method
                nlc = model.forward_intermediates(
                    x,
                    indices=2,
                    output_fmt="NLC",
                    return_prefix_tokens=True,
                    intermediates_only=True,
                )
                for (patches, prefix), (want_patches, want_prefix) in zip(
                    nlc, dense_nlc, strict=True
                ):
                    assert torch.equal(patches, want_patches) and torch.equal(prefix, want_prefix)
            finally:
                tokenreduce.remove(model)


HELD_CASES = [(key, m) for key in ("deit", "eva02") for m in METHODS] + [
    ("peaky", m) for m in LEARNED
]


@pytest.mark.parametrize(
    ("key", "method"), HELD_CASES, ids=[f"{k}-{m[0]}-{sorted(m[1].items())}" for k, m in HELD_CASES]
)
def test_held_patches_take_their_tokens_feature(model_pair, key, method):
    """Against the traced source map: a patch that a final token holds gets exactly that token's
    (normed) feature, which is ToMe's unmerge (source^T @ tokens); a patch no token holds was
    pruned or fused and keeps a feature recorded before its last block."""
    model = model_pair[key]
    x = image_batch(model, 4)
    tokenreduce.apply(model, method[0], trace_source=True, **method[1])
    try:
        with torch.no_grad():
            tokens = model.forward_features(x)
            grid = tokenreduce.patch_features(model, x)
        state = attached_engine(model).final_state()
    finally:
        tokenreduce.remove(model)
    source = state.source
    owner = state.owner
    held = owner >= 0
    assert torch.equal(owner[held], one_hot_owner(source)[held])
    # every held column of the source map has exactly one 1
    unmerged = source.transpose(1, 2) @ tokens
    assert torch.equal(grid[held], unmerged[held])
    assert grid.shape[1] == model.patch_embed.num_patches + model.num_prefix_tokens
    if method[0] in ("tome", "bat", "pitome", "mctf") or method[1].get("threshold") == float("inf"):
        assert held.all()  # merging only: every patch is held
    else:
        assert not held.all()
        assert torch.isfinite(grid).all()


def test_exit_feature_is_the_token_at_its_pruning_block():
    """top-k at block 1 of 2: a pruned patch's grid feature is its token after block 1's
    attention (the reduction's input), through the final norm; pruned="zero" gives 0."""
    model = tiny_vit(depth=2).double()
    x = image_batch(model, 2)
    with torch.no_grad():
        tokens = model.patch_embed(x)
        tokens = model.norm_pre(model._pos_embed(tokens))
        tokens = model.blocks[0](tokens)
        block = model.blocks[1]
        at_pruning = tokens + block.ls1(block.attn(block.norm1(tokens)))
        tokenreduce.apply(model, "topk", keep_rate=0.5, layers=(1,), trace_source=True)
        grid = tokenreduce.patch_features(model, x)
        zeroed = tokenreduce.patch_features(model, x, pruned="zero")
        nearest = tokenreduce.patch_features(model, x, pruned="nearest")
        held = attached_engine(model).final_state().owner >= 0
        tokenreduce.remove(model)
    pruned = ~held
    assert pruned.sum() == 2 * 98
    torch.testing.assert_close(grid[pruned], model.norm(at_pruning)[pruned], rtol=0, atol=1e-12)
    assert torch.equal(zeroed[held], grid[held])
    assert (zeroed[pruned] == 0).all()
    assert torch.equal(nearest[held], grid[held])
    for b in range(2):  # every pruned patch copies a held one
        copies = (nearest[b, pruned[b]][:, None] == grid[b, held[b]][None]).all(-1).any(-1)
        assert copies.all()


@pytest.mark.parametrize("method", LEARNED, ids=lambda m: f"{m[0]}-{sorted(m[1].items())}")
def test_mixed_batch_grid_equals_each_image_alone_in_every_batching_mode(method):
    """Learned thresholds keep different counts per image: the grids of a mixed batch (ragged,
    packed, masked) equal each image's grid run alone, and intermediates at every block too."""
    model = peaky_vit(depth=4)
    torch.manual_seed(2)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    name, options = method
    alone = []
    for image in x:
        tokenreduce.apply(model, name, **options)
        with torch.no_grad():
            alone.append(model.forward_intermediates(image[None], norm=True, output_fmt="NLC")[1])
    tokenreduce.remove(model)
    counts = None
    for batching in ("ragged", "packed", "masked"):
        tokenreduce.apply(model, name, batching=batching, **options)
        with torch.no_grad():
            _, grids = model.forward_intermediates(x, norm=True, output_fmt="NLC")
        counts = tokenreduce.last_info(model).tokens_per_block
        tokenreduce.remove(model)
        for block, grid in enumerate(grids):
            for i in range(len(x)):
                torch.testing.assert_close(
                    grid[i], alone[i][block][0], rtol=0, atol=1e-10, msg=f"{batching} {block} {i}"
                )
    assert len(set(counts[:, -1].tolist())) > 1, counts  # the batch really is mixed


@pytest.mark.parametrize("key", ["deit", "eva02"])
def test_intermediates_formats_and_stop_early(model_pair, key):
    model = model_pair[key]
    x = image_batch(model, 2)
    tokenreduce.apply(model, "tome", r=10)
    try:
        with torch.no_grad():
            final, grids = model.forward_intermediates(x, indices=[3, 1])
            early = model.forward_intermediates(x, indices=[1], stop_early=True)
            early_counts = tokenreduce.last_info(model).tokens_per_block
            as_dict = model.forward_intermediates(
                x, indices=2, output_dict=True, return_prefix_tokens=True
            )
    finally:
        tokenreduce.remove(model)
    rows, cols = model.patch_embed.grid_size
    assert [tuple(g.shape) for g in grids] == [(2, model.embed_dim, rows, cols)] * 2
    assert final.shape[1] < rows * cols  # the final features stay reduced
    assert torch.equal(early[1][0], grids[0])
    assert early_counts.shape == (2, 2)  # blocks 0 and 1 ran
    assert early[0].shape[1] == early_counts[0, -1]
    assert set(as_dict) == {"image_intermediates", "image_intermediates_prefix", "image_features"}
    assert len(as_dict["image_intermediates"]) == 2


def test_bad_grid_options_are_refused(model_pair):
    model = model_pair["deit"]
    x = image_batch(model, 1)
    tokenreduce.apply(model, "tome", r=4)
    try:
        with pytest.raises(
            InvalidOptionError, match="pruned='mean'.*'exit' or 'zero' or 'nearest'"
        ):
            tokenreduce.patch_features(model, x, pruned="mean")
        with pytest.raises(InvalidOptionError, match="output_fmt='NHWC'"):
            model.forward_intermediates(x, output_fmt="NHWC")
    finally:
        tokenreduce.remove(model)
    learned = peaky_vit(depth=2)
    tokenreduce.apply(learned, "ltmp", merge_thresholds=0.9, prune_thresholds=0.01)
    learned.train()
    with pytest.raises(InvalidOptionError, match="soft-mask training forward"):
        learned.forward_intermediates(torch.randn(1, 3, 64, 64, dtype=torch.float64))
