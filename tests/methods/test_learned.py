"""LTMP and AS-ViT: threshold semantics, per-image batching, soft training, budget loss,
threshold files and `tokenreduce train`."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import tokenreduce
from tests.conftest import make_image_folder, peaky_vit, reduced_forward, tiny_vit
from tokenreduce import data, train
from tokenreduce.data import ImageFolder
from tokenreduce.methods import ltmp
from tokenreduce.methods.base import make_config
from tokenreduce.methods.learned import ThresholdParameters, write_threshold_file
from tokenreduce.methods.ltmp import LTMPConfig
from tokenreduce.ops.attention import received_attention
from tokenreduce.ops.packing import pack_kept
from tokenreduce.state import AttentionOutputs, TokenState

VARIABLE = {
    "asvit": {"thresholds": (0.9, 1.0, 1.1)},
    "ltmp": {"merge_thresholds": 0.6, "prune_thresholds": 0.05},
}


# ---- threshold semantics on hand-made scores -------------------------------------------------
def asvit_step(threshold: float, min_keep: int = 1):
    """AS-ViT on one image: prefix + 4 tokens whose mean-1 scores are exactly 0.5, 1, 1.5, 1."""
    config = make_config("asvit", min_keep=min_keep)
    x = torch.arange(5, dtype=torch.float64).view(1, 5, 1).expand(1, 5, 2).clone()
    cls_attn = torch.tensor([0.5, 0.0625, 0.125, 0.1875, 0.125], dtype=torch.float64)
    attn = AttentionOutputs(
        cls_attn=cls_attn.view(1, 1, 5).expand(1, 2, 5),
        values=torch.ones(1, 2, 5, 3, dtype=torch.float64),
    )
    out, state, _ = config.reduce(x, TokenState(num_prefix=1), attn, {"thresholds": threshold})
    return out[0, :, 0].tolist(), state


def test_asvit_threshold_is_strict_and_keeps_the_prefix():
    assert asvit_step(1.0)[0] == [0.0, 3.0]  # the two tokens exactly at 1.0 are pruned
    assert asvit_step(0.25)[0] == [0.0, 1.0, 2.0, 3.0, 4.0]  # all above: nothing pruned
    assert asvit_step(2.0)[0] == [0.0, 3.0]  # all below: the best token (min_keep=1) stays
    kept, state = asvit_step(2.0, min_keep=0)
    assert kept == [0.0, 3.0]  # min_keep=0 too: no image loses its last patch token
    assert state.size.flatten().tolist() == [1.0, 1.0]


def test_ltmp_merge_threshold_is_strict_and_prune_keeps_the_prefix():
    """Tokens 1 and 2 have identical keys (cosine exactly 1): merged only when 1 > threshold."""
    config = make_config("ltmp")
    keys = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 1.0]])
    attn = torch.full((1, 1, 5, 5), 0.25, dtype=torch.float64)
    outputs = AttentionOutputs(
        received=received_attention(attn, None), key_mean=keys[None].double()
    )
    x = torch.arange(5, dtype=torch.float64).view(1, 5, 1)

    def step(merge, prune):
        step = {"merge_thresholds": merge, "prune_thresholds": prune}
        out, state, record = config.reduce(x, TokenState(num_prefix=1), outputs, step)
        return out[0, :, 0].tolist(), state.size[0, :, 0].tolist(), record

    assert step(1.0, 0.0)[0] == [0.0, 2.0, 4.0, 1.0, 3.0]  # [prefix, A, B]: no merge at 1.0
    tokens, sizes, record = step(0.999, 0.0)
    assert tokens == [0.0, 4.0, 1.5, 3.0] and sizes == [1.0, 1.0, 2.0, 1.0]
    assert record.merged.tolist() == [1]
    # every importance is exactly 0.25, none above: the prefix and the best patch token stay
    # (ties: the first in output order), so that no image loses its last patch token
    tokens, _, record = step(1.0, 0.25)
    assert tokens == [0.0, 2.0] and record.pruned.tolist() == [3]


# ---- per-image batching ------------------------------------------------------------------------
@pytest.mark.parametrize("trace_source", [False, True])
@pytest.mark.parametrize("batching", ["auto", "ragged", "packed", "masked"])
@pytest.mark.parametrize("method", ["asvit", "ltmp"])
def test_every_batching_mode_gives_each_image_its_result_alone(method, batching, trace_source):
    """Logits, token counts, sources and records of every image in a mixed batch equal those of
    the image run alone, in every batching mode (float64)."""
    model = peaky_vit()
    images = torch.randn(5, 3, 64, 64, dtype=torch.float64)
    options = dict(VARIABLE[method], trace_source=trace_source)
    batched, info = reduced_forward(model, images, method, batching=batching, **options)
    counts = info.tokens_per_block
    assert len({tuple(row) for row in counts.tolist()}) > 2, "counts must differ per image"
    assert counts[:, -1].min() < info.tokens_in
    for i in range(len(images)):
        alone, single = reduced_forward(model, images[i : i + 1], method, **options)
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-9, atol=1e-9)
        assert counts[i].tolist() == single.tokens_per_block[0].tolist()
        assert all(
            s is None or s.shape[1] == n for s, n in zip(single.sizes, counts[i], strict=True)
        )
        for field in dataclasses.fields(single.records):
            value = getattr(single.records, field.name)
            if value is not None:
                assert torch.equal(getattr(info.records, field.name)[i], value[0]), field.name
        for size, size_alone in zip(info.sizes, single.sizes, strict=True):
            if size_alone is not None:
                n = size_alone.shape[1]
                assert torch.equal(size[i, :n], size_alone[0])
                assert not size[i, n:].any()  # padding has size 0
        if trace_source:
            for src, src_alone in zip(info.source_blk, single.source_blk, strict=True):
                n = src_alone.shape[1]
                assert torch.equal(src[i, :n], src_alone[0])
                assert not src[i, n:].any()
    gmacs = tokenreduce.flops.gmacs(model, info).gmacs
    assert len(set(gmacs.tolist())) > 1  # per-image GMACs


@pytest.mark.parametrize("prune", [0.05, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("name", "prefix"),
    [("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2), ("no_class_token", 0)],
)
def test_ltmp_one_image_path_equals_the_slot_maps_bit_for_bit(
    name, prefix, dtype, prune, monkeypatch
):
    """One image on the CPU takes LTMP's one-image merge (in place, then gathered); with it
    turned off, the batched slot maps. Tokens, sizes and records are the same bit for bit, with
    zero, one and two prefix tokens, and where every patch token is pruned but the best."""
    if name == "no_class_token":
        model = peaky_vit(class_token=False, global_pool="avg", dtype=dtype)
    else:
        model = peaky_vit(name, dtype=dtype)
    assert tokenreduce.describe(model).num_prefix == prefix
    image = torch.randn(1, 3, 64, 64, dtype=dtype)
    options = {"merge_thresholds": 0.1, "prune_thresholds": prune}
    calls = []
    one_image = ltmp.merge_and_prune_one_image
    monkeypatch.setattr(
        ltmp, "merge_and_prune_one_image", lambda *args: calls.append(1) or one_image(*args)
    )
    fast, fast_info = reduced_forward(model, image, "ltmp", **options)
    # every block that gets more than one token (a lone token stays as it is)
    entering = [fast_info.tokens_in, *fast_info.tokens_per_block[0, :-1].tolist()]
    assert len(calls) == sum(n > 1 for n in entering) > 0
    monkeypatch.setattr(LTMPConfig, "one_image_on_cpu", lambda *args: False)
    slots, info = reduced_forward(model, image, "ltmp", **options)
    assert len(calls) == sum(n > 1 for n in entering)
    assert torch.equal(fast, slots)
    assert fast_info.records.merged.sum() > 0 and fast_info.records.pruned.sum() > 0
    assert torch.equal(fast_info.tokens_per_block, info.tokens_per_block)
    if prune == 1.0:  # nothing is important enough: the best patch token stays
        assert (fast_info.tokens_per_block == prefix + 1).all()
    for field in ("merged", "pruned"):
        assert torch.equal(getattr(fast_info.records, field), getattr(info.records, field))
    for size, size_slots in zip(fast_info.sizes, info.sizes, strict=True):
        assert (size is None) == (size_slots is None)
        assert size is None or torch.equal(size, size_slots)


@pytest.mark.parametrize("method", ["asvit", "ltmp"])
def test_ragged_per_token_work_runs_on_the_real_tokens_only(method):
    """Each block's MLP sees each image's own tokens (ragged) or the padded batch (packed)."""
    model = peaky_vit()
    images = torch.randn(5, 3, 64, 64, dtype=torch.float64)
    rows = {"ragged": [], "packed": []}
    for batching, seen in rows.items():
        hooks = [
            block.mlp.register_forward_hook(
                lambda module, args, out, seen=seen: seen.append(args[0].shape[:-1].numel())
            )
            for block in model.blocks
        ]
        _, info = reduced_forward(model, images, method, batching=batching, **VARIABLE[method])
        for hook in hooks:
            hook.remove()
    counts = info.tokens_per_block
    assert rows["ragged"] == counts.sum(dim=0).tolist()
    assert rows["packed"] == (len(images) * counts.max(dim=0).values).tolist()
    assert rows["ragged"] != rows["packed"]


def test_a_batch_of_equal_counts_has_no_padding():
    """Ragged/packed read the counts: when every image keeps the same count, no padding."""
    model = peaky_vit()
    image = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    _, info = reduced_forward(model, image.expand(3, -1, -1, -1), "ltmp", **VARIABLE["ltmp"])
    assert info.tokens_per_block[:, -1].min() < info.tokens_in
    assert all(
        s is None or s.shape[1] == n
        for s, n in zip(info.sizes, info.tokens_per_block[0], strict=True)
    )


@pytest.mark.parametrize("method", ["asvit", "ltmp"])
def test_masked_path_equals_packed_path(method):
    model = peaky_vit()
    images = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    options = dict(VARIABLE[method], trace_source=True)
    packed, packed_info = reduced_forward(model, images, method, **options)
    masked, masked_info = reduced_forward(model, images, method, batching="masked", **options)
    torch.testing.assert_close(masked, packed, rtol=1e-9, atol=1e-9)
    assert masked_info.tokens_per_block.tolist() == packed_info.tokens_per_block.tolist()
    # masked keeps static shapes: every block holds all N0 slots, padding included
    assert {s.shape[1] for s in masked_info.sizes if s is not None} == {masked_info.tokens_in}
    for packed_src, masked_src in zip(packed_info.source_blk, masked_info.source_blk, strict=True):
        width = packed_src.shape[1]
        assert torch.equal(masked_src[:, :width], packed_src)
        assert not masked_src[:, width:].any()  # padding represents no original token


@pytest.mark.parametrize("method", ["asvit", "ltmp"])
def test_masked_path_block_compiles_without_graph_breaks(method):
    """The masked path of a reducing block on padded input: static shapes, no host sync."""
    model = peaky_vit().float()
    tokenreduce.apply(model, method, batching="masked", **VARIABLE[method])
    engine = tokenreduce.patch.attached_engine(model)
    index = next(i for i, s in enumerate(engine.steps) if s is not None)
    block, step = model.blocks[index], engine.steps[index]
    size = torch.ones(2, 17, 1)
    size[1, 12:] = 0  # the second image holds 12 real tokens and 5 padding slots

    def run(x, size):
        state = TokenState(
            num_prefix=1, size=size, valid=size[..., 0] > 0, batching=engine.batching
        )
        out, new, _, _, _ = engine.block_forward(block, x, state, step)
        return out, new.size, new.valid

    x = torch.randn(2, 17, 192)
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="eager")
    with torch.no_grad():
        got, want = compiled(x, size), run(x, size)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert got[0].shape == x.shape  # static: padded to the length it came in with


def test_padding_never_changes_real_tokens():
    """Extra padding slots (a second image that keeps everything) leave the first's output."""
    model = peaky_vit()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    alone, _ = reduced_forward(
        model, images[:1], "asvit", batching="masked", thresholds=(0.9, 1.0, 1.1)
    )
    both, _ = reduced_forward(model, images, "asvit", batching="masked", thresholds=(0.9, 1.0, 1.1))
    torch.testing.assert_close(both[:1], alone, rtol=1e-9, atol=1e-9)


def test_static_cap_drops_the_lowest_scores_and_records_the_overflow():
    keep = torch.tensor([[True, True, False, True, True]])
    score = torch.tensor([[9.0, 1.0, 5.0, 3.0, 2.0]])
    packing = pack_kept(keep, 3, score)
    assert packing.index[0].tolist() == [0, 3, 4] and packing.overflow.tolist() == [1]
    model = peaky_vit()
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    _, info = reduced_forward(
        model, images, "asvit", batching="masked", max_tokens=8, thresholds=0.0
    )
    assert info.records.overflow.sum() > 0
    assert info.tokens_per_block[:, 3:].max() <= 8


@pytest.mark.parametrize("method", ["asvit", "ltmp"])
def test_untrained_thresholds_are_the_dense_model(method):
    model = tiny_vit("vit_tiny_patch16_224", img_size=64)
    images = torch.randn(2, 3, 64, 64)
    dense = model(images)
    out, info = reduced_forward(model, images, method)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    assert (info.tokens_per_block == info.tokens_in).all()


@pytest.mark.parametrize("model_name", ["deit_small_distilled_patch16_224", "vit_reg"])
@pytest.mark.parametrize("method", ["asvit", "ltmp"])
def test_prefix_tokens_stay_first(method, model_name):
    if model_name == "vit_reg":
        model = tiny_vit("vit_base_patch16_224", img_size=64, reg_tokens=4, depth=4, num_heads=2)
    else:
        model = tiny_vit(model_name, img_size=64, depth=4)
    prefix = model.num_prefix_tokens
    options = {"asvit": {"thresholds": 1.0}, "ltmp": {"merge_thresholds": 0.2}}[method]
    _, info = reduced_forward(
        model, torch.randn(2, 3, 64, 64), method, trace_source=True, **options
    )
    for source in info.source_blk:
        assert (source[:, :prefix, :prefix] == torch.eye(prefix, dtype=torch.bool)).all()
        assert not source[:, prefix:, :prefix].any()


# ---- training forward and budget loss --------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("asvit", {"thresholds": (0.9, 1.0, 1.1)}),
        ("ltmp", {"layers": (2,), "merge_thresholds": 0.3, "prune_thresholds": 0.0}),
        ("ltmp", {"layers": (2,), "merge_thresholds": 1.0, "prune_thresholds": 0.06}),
    ],
)
def test_training_forward_with_hard_masks_matches_inference(method, options):
    """Soft-mask training (all tokens kept, masked attention) == inference on the kept tokens,
    up to the masked softmax's epsilon."""
    model = peaky_vit()
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    tokenreduce.apply(model, method, **options)
    model.eval()
    inference = model(images)
    counts = tokenreduce.last_info(model).tokens_per_block
    model.train()
    training = model(images)
    info = tokenreduce.last_info(model)
    assert info.tokens_per_block.tolist() == counts.tolist()
    assert counts[:, -1].max() < info.tokens_in
    torch.testing.assert_close(training, inference, rtol=1e-3, atol=1e-3)
    kept = info.kept_fraction
    assert kept.requires_grad and kept.shape == (3, 12)


@pytest.mark.parametrize("method", ["asvit", "ltmp"])
@pytest.mark.parametrize("direction", [-1, 1])
def test_budget_loss_moves_thresholds_the_right_way(method, direction):
    """Above the budget, a gradient step makes the method reduce more; below it, less."""
    model = peaky_vit()
    config = make_config(method, tau=1.0)
    tokenreduce.apply(model, config)
    dims = tokenreduce.describe(model)
    start = {
        "asvit": {"thresholds": 0.8},
        "ltmp": {"merge_thresholds": 0.3, "prune_thresholds": 0.0},
    }[method]
    layers = len(config.reduce_layers(dims))
    parameters = ThresholdParameters({k: [v] * layers for k, v in start.items()})
    tokenreduce.patch.attached_engine(model).set_trainable(model, parameters)
    model.train()
    model(torch.randn(4, 3, 64, 64, dtype=torch.float64))
    kept = tokenreduce.last_info(model).kept_fraction.mean(dim=0)
    fraction = tokenreduce.flops.budget_fraction(dims, kept)
    target = fraction.detach() + 0.2 * direction  # above the budget when direction = -1
    (10 * (fraction - target) ** 2).backward()
    kind = next(iter(start))
    step = -parameters.values[kind].grad.sum()  # the direction SGD moves the thresholds
    reduce_more = step > 0 if method == "asvit" else step < 0
    assert bool(reduce_more) == (direction == -1)


# ---- threshold files ---------------------------------------------------------------------------
def test_threshold_file_round_trip_and_bad_files(tmp_path):
    model = tiny_vit("vit_tiny_patch16_224", img_size=64)
    dims = tokenreduce.describe(model)
    config = make_config("ltmp", merge_thresholds=0.8, prune_thresholds=0.001, layers=(1, 5))
    path = write_threshold_file(tmp_path / "t.safetensors", config, dims, {"mean_gmacs": 1.0})
    loaded = make_config("ltmp", thresholds=str(path))
    assert loaded.layers == (1, 5)
    assert loaded.merge_thresholds == (0.8, 0.8) and loaded.prune_thresholds == (0.001, 0.001)
    tensor = make_config("ltmp", thresholds=torch.tensor([[0.9, 0.8], [0.0, 0.1]]), layers=(1, 2))
    assert tensor.merge_thresholds == pytest.approx((0.9, 0.8))

    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        make_config("ltmp", thresholds=str(tmp_path / "missing.safetensors"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        make_config("ltmp", thresholds=str(garbage))
    with pytest.raises(ValueError, match="holds thresholds of method 'ltmp', not 'asvit'"):
        make_config("asvit", thresholds=str(path))
    # layers other than the file's: refused naming both (used to be blamed on the count)
    with pytest.raises(ValueError, match=r"layers=\(1, 2, 3\) differs from the layers \(1, 5\)"):
        tokenreduce.apply(model, "ltmp", thresholds=str(path), layers=(1, 2, 3))
    with pytest.raises(ValueError, match="2 thresholds but the method reduces in 3 blocks"):
        tokenreduce.apply(model, "ltmp", thresholds=str(path), layers=(1, 2, 3), transfer=True)
    with pytest.raises(ValueError, match="thresholds alone"):
        make_config("ltmp", thresholds=str(path), merge_thresholds=0.5)
    with pytest.raises(ValueError, match="max_tokens"):
        make_config("asvit", max_tokens=10)
    with pytest.raises(ValueError, match="batching='compact'"):
        make_config("asvit", batching="compact")
    with pytest.raises(ValueError, match="thresholds=nan"):
        make_config("asvit", thresholds=float("nan"))


def test_train_writes_a_threshold_file(tmp_path):
    model = peaky_vit().float()
    root = make_image_folder(tmp_path / "images", 8)
    dataset = ImageFolder(root, data.eval_transform(model, input_size=(3, 64, 64))[0])
    result = train.train_thresholds(
        model,
        "asvit",
        dataset,
        target_ratio=0.5,
        batch_size=4,
        lr={"thresholds": 0.5},
        out=tmp_path / "t.safetensors",
        progress=False,
    )
    assert result.steps == 4 and len(result.epoch_seconds) == 1
    assert any(v > 0 for v in result.config.thresholds)  # moved from the initial 0
    log = json.loads((tmp_path / "t.safetensors.json").read_text())
    assert log["mean_gmacs"] == pytest.approx(result.mean_gmacs)
    loaded = make_config("asvit", thresholds=str(result.path))
    assert loaded.thresholds == pytest.approx(result.config.thresholds)
    assert tokenreduce.patch.attached_engine(model) is None and not model.training
    with pytest.raises(ValueError, match="has nothing tokenreduce train learns"):
        train.train_thresholds(model, "tome", dataset, target_ratio=0.5, r=2)
