"""Bad input gives errors that name the option, the value and what is accepted."""

from __future__ import annotations

import pytest
import timm
import torch

import tokenreduce
from tests.conftest import tiny_vit


@pytest.mark.parametrize(
    "method,options,pattern",
    [
        ("nope", {}, r"method='nope'.*accepted: \['asvit', 'bat', 'evit'"),
        ("tome", {"rr": 3}, r"option 'rr'.*accepted: \['trace_source', 'r'"),
        ("tome", {"r": -1}, r"r=-1 .*accepted"),
        ("tome", {"r": 2.5}, r"r=2.5 .*accepted"),
        ("tome", {"r": (13, 2.0)}, r"inflect"),
        ("evit", {"keep_rate": 0.0}, r"keep_rate=0.0 .*\(0, 1\]"),
        ("evit", {"keep_rate": 1.5}, r"keep_rate=1.5"),
        ("topk", {"keep_rate": "0.7"}, r"keep_rate='0.7'"),
        ("evit", {"layers": (3, 12)}, r"layers=\(3, 12\).*0\.\.11"),
        ("evit", {"layers": (3, 3)}, r"layers=\(3, 3\).*distinct"),
        ("ppt", {"r": (50, 50)}, r"r=\(50, 50\) has 2 values.*3 reducing layers"),
        ("ppt", {"threshold": "x"}, r"threshold='x'"),
        ("tome", {"prop_attn": 1}, r"prop_attn=1 must be True or False"),
        ("tome", {"r": [1] * 13}, r"13 per-block values.*12 blocks"),
    ],
)
def test_bad_options(method, options, pattern):
    with pytest.raises(ValueError, match=pattern):
        tokenreduce.apply(tiny_vit(), method, **options)


@pytest.mark.parametrize("method", ["evit", "topk", "ppt", "bat"])
def test_class_attention_methods_need_a_class_token(method):
    model = tiny_vit("vit_tiny_patch16_224", class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match=f"method '{method}'.*class token"):
        tokenreduce.apply(model, method)


def test_unsupported_model_class():
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(TypeError, match="unsupported model class ResNet; supported: timm Vision"):
        tokenreduce.apply(model, "tome")


def test_unsupported_block_class():
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        block_fn=timm.models.vision_transformer.ResPostBlock,
    )
    with pytest.raises(TypeError, match="unsupported block 0 .*ResPostBlock"):
        tokenreduce.apply(model, "tome")


def test_method_type_error():
    with pytest.raises(TypeError, match="method must be a method name"):
        tokenreduce.apply(tiny_vit(), 3)


def test_remove_without_apply():
    with pytest.raises(ValueError, match="no token reduction"):
        tokenreduce.remove(tiny_vit())


def test_methods_lists_registered_names():
    assert tokenreduce.methods() == ["asvit", "bat", "evit", "ltmp", "ppt", "tome", "topk"]


def test_failed_apply_leaves_model_untouched():
    model = tiny_vit()
    with pytest.raises(ValueError):
        tokenreduce.apply(model, "evit", layers=(99,))
    assert type(model) is timm.models.vision_transformer.VisionTransformer
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
