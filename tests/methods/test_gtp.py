"""GTP against fixtures of the official GTP-ViT code (Ackesnal/GTP-ViT at commit
97a117814d0ff99edbbe34bec12e851db4be2eb5, recorded by benchmarks/gtp_official.py in float64 on
the fixture DeiT-Tiny), and its options, schedule, invariants and costs."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tokenreduce
from tests.adapters.test_flops import counted_gmacs
from tests.conftest import reduced_forward, tiny_vit
from tokenreduce.errors import InvalidOptionError
from tokenreduce.ops.attention import sparsify_attention

gtp = importlib.import_module("tokenreduce.methods.gtp")  # tokenreduce.methods is also a function

HERE = Path(__file__).parent / "fixtures"

# the options of each recorded fixture (benchmarks/gtp_official.py SETTINGS)
SETTINGS = {
    "default": {},
    "semantic_p13": {
        "num_prop": 13,
        "selection": "MixedAttnMean",
        "graph_type": "Semantic",
        "num_neighbours": 5,
        "sparsity": 1.0,
        "alpha": 0.4,
        "token_scale": False,
    },
    "spatial_cls_p5": {
        "num_prop": 5,
        "selection": "CLSAttnMax",
        "graph_type": "Spatial",
        "sparsity": 0.8,
        "alpha": 0.3,
    },
}


def assert_total_gmacs_match(model, counted):
    """GMACs with GTP's own products (propagation, cosine similarities) within 1% of a counter's;
    on these small models they are over 1% of the network."""
    report = tokenreduce.flops.gmacs(model, tokenreduce.last_info(model))
    assert abs(report.mean_total - counted) / counted < 0.01, (report, counted)


def run_recording_kept(model, x, monkeypatch, **options):
    """Logits, info and the original token held by each output row of every reducing block."""
    kept = []
    split = gtp.split_by_score

    def recording(score, num_prop):
        out = split(score, num_prop)
        kept.append(out[0])
        return out

    monkeypatch.setattr(gtp, "split_by_score", recording)
    logits, info = reduced_forward(model, x, "gtp", **options)
    monkeypatch.setattr(gtp, "split_by_score", split)
    ids = torch.arange(x.shape[-1] // 16 * x.shape[-2] // 16 + 1).expand(x.shape[0], -1)
    held = []
    for index in kept:
        ids = torch.cat([ids[:, :1], ids[:, 1:].gather(1, index)], dim=1)
        held.append(ids)
    return logits, info, held


@pytest.mark.parametrize("setting", SETTINGS)
def test_matches_official(fixture_model, images, monkeypatch, setting):
    """Logits within 1e-10 (they agree to ~2e-15), the same tokens per block, the same kept
    tokens in the same order, token scales within 1e-12, the official "missing" fractions."""
    ref = load_file(HERE / f"gtp_{setting}.safetensors")
    options = SETTINGS[setting]
    logits, info, held = run_recording_kept(fixture_model, images, monkeypatch, **options)
    assert (logits - ref["logits"]).abs().max() < 1e-10
    assert torch.equal(info.tokens_per_block, ref["tokens_per_block"])
    for block, ids in enumerate(held):
        assert torch.equal(ids.to(torch.int32), ref[f"kept_blk{block}"]), block
        if f"scales_blk{block}" in ref:
            torch.testing.assert_close(
                info.sizes[block][..., 0], ref[f"scales_blk{block}"], atol=1e-12, rtol=0
            )
    # the official fraction is computed in float32 (`.to(torch.float)`)
    num_prop = options.get("num_prop", 8)
    fraction = info.records.missing.double().div(num_prop).mean(dim=0)
    torch.testing.assert_close(fraction, ref["missing"], atol=1e-6, rtol=0)


def test_defaults_and_any_depth(caplog):
    defaults = gtp.GTPConfig()
    assert (defaults.num_prop, defaults.selection, defaults.graph_type) == (
        8,
        "MixedAttnMax",
        "Mixed",
    )
    assert (defaults.sparsity, defaults.alpha, defaults.token_scale) == (0.6, 0.1, True)
    x = torch.randn(2, 3, 224, 224)
    _, info = reduced_forward(tiny_vit("vit_tiny_patch16_224", depth=24), x, "gtp")
    assert info.tokens_per_block[0].tolist() == [197 - 8 * (i + 1) for i in range(24)]
    small = tiny_vit("vit_tiny_patch16_224", depth=4, img_size=64)
    with caplog.at_level(logging.WARNING):
        _, info = reduced_forward(small, torch.randn(2, 3, 64, 64), "gtp")
    assert "num_prop=8 asks more tokens" in caplog.text and "(8, 7, 0, 0)" in caplog.text
    assert info.tokens_per_block[0].tolist() == [9, 2, 2, 2]


def test_no_class_token_and_prefix_tokens():
    x = torch.randn(2, 3, 64, 64)
    gap = tiny_vit(
        "vit_tiny_patch16_224", depth=4, img_size=64, class_token=False, global_pool="avg"
    )
    logits, info = reduced_forward(gap, x, "gtp", num_prop=3)
    assert torch.isfinite(logits).all() and info.tokens_per_block[0].tolist() == [13, 10, 7, 4]
    with pytest.raises(
        InvalidOptionError, match="selection='CLSAttnMax' .* needs a model with a class"
    ):
        tokenreduce.apply(gap, "gtp", selection="CLSAttnMax")
    regs = tiny_vit("vit_tiny_patch16_224", depth=4, img_size=64, reg_tokens=2)
    _, info = reduced_forward(regs, x, "gtp", num_prop=3, trace_source=True)
    for source in info.source_blk:  # the three prefix tokens stay first and untouched
        assert torch.equal(source[:, :3, :3], torch.eye(3, dtype=torch.bool).expand(2, -1, -1))
        assert not source[:, 3:, :3].any()


def test_batch_equals_each_image_alone():
    model = tiny_vit("vit_tiny_patch16_224", depth=4, img_size=64).double()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    batched, info = reduced_forward(model, x, "gtp", num_prop=3)
    for i in range(3):
        alone, _ = reduced_forward(model, x[i : i + 1], "gtp", num_prop=3)
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-12, rtol=0)


def test_sources_and_scales():
    """A kept token stands for itself and the propagated tokens it received from; a token whose
    graph neighbours were all propagated too is lost. Scales grow by alpha * W @ scales."""
    model = tiny_vit("vit_tiny_patch16_224", depth=4, img_size=64).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    _, info = reduced_forward(model, x, "gtp", num_prop=3, trace_source=True)
    missing = info.records.missing
    for block, source in enumerate(info.source_blk):
        held = source[:, 1:, 1:].any(dim=1).sum(dim=1)
        assert (held <= 16).all() and (held >= info.tokens_per_block[:, block] - 1).all()
        size = info.sizes[block]
        assert (size[:, 1:] >= 1).all() and (size[:, 0] == 1).all()
    lost = 16 - info.source_blk[0][:, 1:, 1:].any(dim=1).sum(dim=1)
    assert torch.equal(lost, missing[:, 0])


def test_pruning_without_graph():
    model = tiny_vit("vit_tiny_patch16_224", depth=4, img_size=64)
    logits, info = reduced_forward(
        model, torch.randn(2, 3, 64, 64), "gtp", num_prop=3, propagation="None", token_scale=False
    )
    assert torch.isfinite(logits).all() and info.records.missing is None
    assert info.tokens_per_block[0].tolist() == [14, 11, 8, 5]


def test_sparsify_attention_zeroes_the_k_minus_one_smallest():
    attn = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    out = sparsify_attention(attn, 0.6)  # k = int(25 * 0.4) = 10: the 9 below the 10th go
    assert ((out == 0).flatten(2).sum(-1) == 9).all()
    kept = out != 0
    assert torch.equal(out[kept], attn[kept])
    assert sparsify_attention(attn, 0.99) is attn  # k = 0: nothing filtered


def test_sparsify_attention_in_place_gives_the_same_bits_and_spares_attention_under_grad():
    attn = torch.rand(2, 3, 7, 7).softmax(-1)
    expected = sparsify_attention(attn, 0.6)
    work = attn.clone()
    assert sparsify_attention(work, 0.6, in_place=True) is work
    assert torch.equal(work, expected)
    graded = attn.clone().requires_grad_()
    out = sparsify_attention(graded, 0.6, in_place=True)
    assert out is not graded and torch.equal(graded.detach(), attn)
    out.sum().backward()
    kth = attn.flatten(2).kthvalue(int(7 * 7 * (1 - 0.6)), -1).values[..., None, None]
    assert torch.equal(graded.grad, (attn >= kth).float())  # the kept weights pass their grad


def test_sparsity_acts_in_blocks_that_do_not_reduce():
    model = tiny_vit("vit_tiny_patch16_224", depth=4, img_size=64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dense = model(x)
    same, _ = reduced_forward(model, x, "gtp", num_prop=0, sparsity=1.0)
    assert torch.equal(same, dense)
    sparse, info = reduced_forward(model, x, "gtp", num_prop=0, sparsity=0.5)
    assert not torch.allclose(sparse, dense) and info.reduce_blocks == ()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_prop": -1}, "num_prop=-1 is not accepted"),
        ({"num_prop": (1, 2)}, r"num_prop=\(1, 2\) has 2 values but the model has 4 blocks"),
        ({"selection": "Random"}, "selection='Random' is not accepted; accepted: 'MixedAttnMax'"),
        ({"propagation": "Mean"}, "propagation='Mean' is not accepted"),
        ({"graph_type": "None"}, "graph_type='None' is not accepted"),
        ({"num_neighbours": 0}, "num_neighbours=0 is not accepted"),
        ({"sparsity": 0.0}, r"sparsity=0.0 is not accepted; accepted: a number in \(0, 1\]"),
        ({"alpha": "x"}, "alpha='x' is not accepted"),
        ({"alpha": float("inf")}, "alpha=inf is not accepted; accepted: a finite number"),
        ({"alpha": float("nan")}, "alpha=nan is not accepted; accepted: a finite number"),
        ({"sparsity": float("-inf")}, "sparsity=-inf is not accepted; accepted: a finite"),
        ({"token_scale": 1}, "token_scale=1 must be True or False"),
    ],
)
def test_invalid_options(options, match):
    model = tiny_vit("vit_tiny_patch16_224", depth=4, img_size=64)
    with pytest.raises(InvalidOptionError, match=match):
        tokenreduce.apply(model, "gtp", **options)


def test_gmacs_and_overhead(deit_small):
    _, info = reduced_forward(deit_small, torch.randn(1, 3, 224, 224), "gtp")
    report = tokenreduce.flops.gmacs(deit_small, info)
    assert round(tokenreduce.flops.dense_gmacs(deit_small), 3) == 4.599
    assert round(report.mean, 3) == 3.416  # -25.7%: the paper's "up to 26%" (P = 8)
    # per block H * N * (N - 1) + K * 8 * (C + 1); the cosine similarities 196^2 * C once
    n = torch.tensor([197 - 8 * i for i in range(12)], dtype=torch.float64)
    expected = (6 * n * (n - 1) + (n - 9) * 8 * 385).sum() + 196**2 * 384
    assert report.overhead_gmacs.item() == pytest.approx(expected.item() / 1e9)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("eva02_tiny_patch14_224", {"img_size": 56}),
        ("vit_tiny_patch16_224", {"img_size": 64, "class_token": False, "global_pool": "avg"}),
    ],
)
def test_gmacs_match_flop_counter(name, options):
    """On a rotary Eva model and on a model without class token (DeiT-S: test_flops.py)."""
    model = tiny_vit(name, depth=3, **options)
    x = torch.randn(1, 3, options["img_size"], options["img_size"])
    tokenreduce.apply(model, "gtp", num_prop=4)
    counted = counted_gmacs(model, x)
    info = tokenreduce.last_info(model)
    assert (info.tokens_per_block[:, -1] < info.tokens_in).all()
    assert_total_gmacs_match(model, counted)


@pytest.mark.parametrize("family", ["transformers", "open_clip"])
def test_gmacs_match_flop_counter_on_other_families(family):
    """A transformers ViT classifier (eager attention) and an open_clip tower (math kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from tests.conftest import pixels

    if family == "transformers":
        pytest.importorskip("transformers")
        from tests.adapters.test_hf_adapter import build

        model = build("ViTForImageClassification", "eager", num_labels=5)

        def run(x):
            return model(pixel_values=x)
    else:
        pytest.importorskip("open_clip")
        from tests.adapters.test_openclip_adapter import tower

        model = tower()
        run = model
    x = pixels(2)
    tokenreduce.apply(model, "gtp", num_prop=3)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run(x)
    info = tokenreduce.last_info(model)
    assert (info.tokens_per_block[:, -1] < info.tokens_in).all()
    # FLOPs of the batch of 2 -> multiply-accumulates per image
    assert_total_gmacs_match(model, counter.get_total_flops() / 2 / 2 / 1e9)
