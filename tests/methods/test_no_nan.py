"""No image loses its last patch token (docs/methods.md §1.6): LTMP and AS-ViT keep each image's
best patch token in every batching mode, compiled and in training, so a pooling of patch tokens
never averages over nothing; and LTMP runs on models without a class token (§3.5)."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from tests.conftest import peaky_vit
from tokenreduce.methods.base import make_config
from tokenreduce.ops.attention import received_attention
from tokenreduce.ops.selection import keep_best_
from tokenreduce.state import AttentionOutputs, TokenState

PRUNE_ALL = {
    "ltmp": {"prune_thresholds": 1.0},  # received attention is never above 1
    "asvit": {"thresholds": 1e9, "min_keep": 0, "layers": (0, 1, 2, 3)},
}
BATCHINGS = ["ragged", "packed", "masked"]


def images(batch: int = 3) -> torch.Tensor:
    torch.manual_seed(5)
    return torch.randn(batch, 3, 64, 64, dtype=torch.float64)


def avg_vit(class_token: bool = True) -> torch.nn.Module:
    """A 4-block float64 ViT that averages its patch tokens (64x64 images, 16 patches)."""
    options = {} if class_token else {"class_token": False}
    return peaky_vit(global_pool="avg", depth=4, **options)


@pytest.mark.parametrize("batching", BATCHINGS)
@pytest.mark.parametrize(
    ("method", "class_token"), [("ltmp", True), ("ltmp", False), ("asvit", True)]
)
def test_thresholds_that_prune_everything_keep_the_best_patch(method, batching, class_token):
    model = tokenreduce.apply(avg_vit(class_token), method, batching=batching, **PRUNE_ALL[method])
    with torch.no_grad():
        logits = model(images())
    assert torch.isfinite(logits).all()
    prefix = tokenreduce.describe(model).num_prefix
    counts = tokenreduce.last_info(model).tokens_per_block
    assert (counts == prefix + 1).all(), counts  # the prefix and one patch token, every block


@pytest.mark.parametrize("method", ["ltmp", "asvit"])
def test_one_image_keeps_the_token_it_keeps_in_a_batch(method):
    """The single-image path (LTMP's own on the CPU) keeps the same token as the batched one."""
    x = images()
    model = tokenreduce.apply(avg_vit(), method, batching="packed", **PRUNE_ALL[method])
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(x.shape[0])])
    torch.testing.assert_close(alone, batched, rtol=0, atol=1e-10)


def test_compiled_masked_forward_keeps_the_best_patch():
    """Under torch.compile (one graph, fullgraph=True) the protection needs no host sync."""
    model = tokenreduce.apply(avg_vit(), "ltmp", batching="masked", **PRUNE_ALL["ltmp"])
    x = images(2)
    with torch.no_grad():
        eager = model(x)
        compiled = tokenreduce.compile(model, backend="eager")(x)
    assert torch.isfinite(compiled).all()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-12)


def test_ltmp_training_mask_keeps_the_best_active_patch():
    """The soft-mask training forward keeps one active patch token per image: finite pooled
    logits."""
    model = tokenreduce.apply(avg_vit(), "ltmp", **PRUNE_ALL["ltmp"]).train()
    logits = model(images())
    assert torch.isfinite(logits).all()
    kept = tokenreduce.last_info(model).kept_fraction  # [B, L], prefix included
    assert torch.allclose(kept.detach(), torch.full_like(kept, 2 / 17))


def test_keep_best_changes_nothing_where_a_patch_is_kept():
    score = torch.tensor([[9.0, 0.1, 0.7, 0.3], [9.0, 0.2, 0.1, -torch.inf]])
    keep = score > 0.5  # image 0 keeps its best patch, image 1 none
    assert keep_best_(keep.clone(), score, 1).tolist() == [
        [True, False, True, False],
        [True, True, False, False],  # the best real patch, never padding (-inf)
    ]


# ---- LTMP without a class token (§3.5) -----------------------------------------------------
def test_ltmp_without_class_token_scores_received_attention_over_all_queries():
    """No prefix: every token's importance is the attention it receives, mean over the heads
    and every query; a token is pruned when that is not above the threshold."""
    attn = torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 4, dtype=torch.float64)  # columns 0.1 .. 0.4
    attn[0] = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)  # column means change
    outputs = AttentionOutputs(
        received=received_attention(attn.view(1, 1, 4, 4), None),
        key_mean=torch.eye(4, dtype=torch.float64)[None],  # orthogonal: nothing merges
    )
    x = torch.arange(4, dtype=torch.float64).view(1, 4, 1)
    step = {"merge_thresholds": 1.0, "prune_thresholds": 0.26}
    out, _, record = make_config("ltmp").reduce(x, TokenState(num_prefix=0), outputs, step)
    # received: 0.175, 0.225, 0.275, 0.325; order [A: 0, 2, B: 1, 3]: tokens 2 and 3 stay
    assert out[0, :, 0].tolist() == [2.0, 3.0] and record.pruned.tolist() == [2]


@pytest.mark.parametrize("batching", BATCHINGS)
def test_ltmp_without_class_token_batched_equals_each_image_alone(batching):
    x = images()
    options = {"merge_thresholds": 0.5, "prune_thresholds": 0.05}
    model = tokenreduce.apply(avg_vit(False), "ltmp", batching=batching, **options)
    with torch.no_grad():
        batched = model(x)
        counts = tokenreduce.last_info(model).tokens_per_block
        alone = torch.cat([model(x[i : i + 1]) for i in range(x.shape[0])])
    assert counts[:, -1].min() < 16 and len(set(counts[:, -1].tolist())) > 1  # it reduces
    torch.testing.assert_close(alone, batched, rtol=0, atol=1e-10)
