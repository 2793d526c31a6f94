"""The static path: every fixed-count method, and LTMP / AS-ViT with masked batching, run the
whole reduced model without reading a device value on the host, and compile as one graph
(`torch.compile(fullgraph=True)`), with the outputs and token counts of the eager forward. These
are the properties a CUDA graph needs; they are checked here on the CPU, on the CPU's attention
path and on the GPU's (`gpu_path`: the choices attention makes on CUDA)."""

from __future__ import annotations

import contextlib

import pytest
import timm
import torch

import tokenreduce
from tests.conftest import peaky_vit
from tests.methods.test_learned import VARIABLE
from tokenreduce.errors import InvalidOptionError, InvalidTypeError
from tokenreduce.patch.attention import gpu_path
from tokenreduce.profiling import host_syncs

PATHS = {"cpu": contextlib.nullcontext, "gpu": gpu_path}
STATIC = [
    ("tome", {"r": 4}),
    ("evit", {}),
    ("topk", {}),
    ("ppt", {"r": 8}),
    ("bat", {}),
    ("ltmp", {"batching": "masked", "prune_thresholds": 0.02}),
    ("asvit", {"batching": "masked", "thresholds": 0.8}),
    ("pitome", {"ratio": 0.8}),
    ("diffrate", {}),
    ("ats", {"batching": "masked"}),
    ("tofu", {"r": 4}),
    ("gtp", {"num_prop": 3}),
    ("mctf", {"r": 4}),
]
MODELS = {"vit": ("vit_tiny_patch16_224", 64), "eva": ("eva02_tiny_patch14_224", 56)}


def small_model(family: str) -> tuple[torch.nn.Module, int]:
    name, size = MODELS[family]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=size, depth=4).eval(), size


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize(("method", "options"), STATIC, ids=[m for m, _ in STATIC])
def test_the_static_path_reads_nothing_on_the_host(family, method, options, path):
    model, size = small_model(family)
    tokenreduce.apply(model, method, **options)
    with PATHS[path]():
        assert host_syncs(model, torch.randn(3, 3, size, size)) == []


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("batching", ["ragged", "packed"])
@pytest.mark.parametrize("method", ["ltmp", "asvit"])
def test_ragged_and_packed_read_once_per_reducing_block(method, batching, path):
    """Images that keep different counts: each reducing block reads them once (they size the
    padded batch, and the ragged layout's rows), and nothing else is read. The counter is not
    blind: these are the reads a path whose shapes follow the counts cannot avoid."""
    model = peaky_vit(dtype=torch.float32)
    options = VARIABLE[method]
    tokenreduce.apply(model, method, batching=batching, **options)
    images = torch.randn(5, 3, 64, 64)
    with PATHS[path]():
        syncs = host_syncs(model, images)
    info = tokenreduce.last_info(model)
    counts = info.tokens_per_block[:, list(info.reduce_blocks)]
    assert (counts != counts[:1]).any(), counts  # images of different counts: padding
    assert syncs == ["tolist"] * len(info.reduce_blocks)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize(("method", "options"), STATIC, ids=[m for m, _ in STATIC])
def test_the_whole_reduced_model_compiles_as_one_graph(family, method, options, path):
    model, size = small_model(family)
    tokenreduce.apply(model, method, **options)
    images = torch.randn(2, 3, size, size)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad(), PATHS[path]():
        want = model(images)
        want_counts = tokenreduce.last_info(model).tokens_per_block
        got = compiled(images)
        got_counts = tokenreduce.last_info(model).tokens_per_block
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_counts, want_counts)
    assert (got_counts[:, -1] < got_counts[:, 0]).all() or method in ("ltmp", "asvit")


def test_tokenreduce_compile_compiles_a_static_reduction_and_refuses_the_rest():
    model, size = small_model("vit")
    images = torch.randn(2, 3, size, size)
    with pytest.raises(ValueError, match="has no token reduction"):
        tokenreduce.compile(model)
    tokenreduce.apply(model, "ltmp", prune_thresholds=0.02)  # batching "auto": ragged
    with pytest.raises(ValueError, match="batching='auto' reads each image's token count"):
        tokenreduce.compile(model)
    tokenreduce.apply(model, "tome", r=4)
    for bad, match in (
        ({"mode": "bogus"}, "mode='bogus' is not accepted; accepted: 'auto', None"),
        ({"backend": "nope"}, "backend='nope' is not a torch.compile backend; accepted: "),
        ({"backend": "eager", "mode": "max-autotune"}, "applies to the inductor backend only"),
    ):
        with pytest.raises(ValueError, match=match):
            tokenreduce.compile(model, **bad)
    torch._dynamo.reset()
    compiled = tokenreduce.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-5, atol=1e-5)
    # bad images are our one line, checked before the graph (not dynamo's failure to trace it)
    for bad, error, match in (
        (images[:, :, :8], InvalidOptionError, f"size 8x{size} .*takes {size}x{size} only"),
        (images[0], InvalidOptionError, r"one image: images\[None\]"),
        (images.long(), InvalidOptionError, "dtype torch.int64"),
        (images.tolist(), InvalidTypeError, "of type list"),
    ):
        with pytest.raises(error, match=match) as caught:
            compiled(bad)
        assert caught.traceback[-1].path.name == "grids.py"


FUSED = [(m, options) for m, options in STATIC if m not in ("ltmp", "mctf", "gtp")]
"""LTMP's importance and MCTF's informativeness, the attention each token receives, need the
matrix: they have no fused path (nor has GTP, whose selection reads the matrix)."""


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("method", "options"), FUSED, ids=[m for m, _ in FUSED])
def test_fused_and_explicit_attention_agree_in_float64(method, options, path, monkeypatch):
    """The fused kernel (with the size bias of proportional attention or the padding of masked
    batching, the class-attention row and key means as by-products) gives the explicit path's
    outputs and decisions, on the CPU's path and on the GPU's (the bias as a head dimension)."""
    column_calls = []
    with_column = tokenreduce.patch.attention.fused_attention_with_key_bias
    monkeypatch.setattr(
        tokenreduce.patch.attention,
        "fused_attention_with_key_bias",
        lambda *args: column_calls.append(1) or with_column(*args),
    )
    model, size = small_model("vit")
    model = model.double()
    tokenreduce.apply(model, method, **options)
    images = torch.randn(3, 3, size, size, dtype=torch.float64)
    outputs = {}
    for fused in (True, False):
        for block in model.blocks:
            block.attn.fused_attn = fused
        with torch.no_grad(), PATHS[path]():
            logits = model(images)
        info = tokenreduce.last_info(model)
        assert all(f == fused for f in info.fused_attention[1:]), info.fused_attention
        outputs[fused] = logits, info.tokens_per_block
    torch.testing.assert_close(outputs[True][0], outputs[False][0], rtol=1e-12, atol=1e-12)
    assert torch.equal(outputs[True][1], outputs[False][1])
    biased = method in (
        "tome",
        "ppt",
        "asvit",
        "diffrate",
        "ats",
    )  # proportional attention, or padding
    assert bool(column_calls) == (path == "gpu" and biased)
