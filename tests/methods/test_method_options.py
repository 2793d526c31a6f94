"""Bad input gives errors that name the option, the value and what is accepted."""

from __future__ import annotations

import pytest

import tokenreduce
from tests.conftest import tiny_vit


@pytest.mark.parametrize(
    "method,options,pattern",
    [
        ("nope", {}, r"method='nope'.*accepted: \['asvit', 'bat', 'evit'"),
        ("tome", {"rr": 3}, r"option 'rr'.*accepted: \['trace_source', 'rope_position', 'r'"),
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


@pytest.mark.parametrize("method", ["evit", "topk", "ppt", "bat", "asvit"])
def test_class_attention_methods_need_a_class_token(method):
    model = tiny_vit("vit_tiny_patch16_224", class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match=f"method '{method}'.*class token"):
        tokenreduce.apply(model, method)


def test_method_type_error():
    with pytest.raises(TypeError, match="method must be a method name"):
        tokenreduce.apply(tiny_vit(), 3)


def test_methods_lists_registered_names():
    assert tokenreduce.methods() == ["asvit", "bat", "evit", "ltmp", "mctf", "ppt", "tome", "topk"]
