"""Bad input gives errors that name the option, the value and what is accepted."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from tests.conftest import tiny_vit
from tokenreduce.methods.base import learned_method_names, make_config, method_names


@pytest.mark.parametrize(
    "method,options,pattern",
    [
        ("nope", {}, r"method='nope'.*accepted: \['asvit', 'ats', 'bat', .*'tome'"),
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


@pytest.mark.parametrize("method", ["evit", "topk", "ppt", "bat", "asvit", "diffrate"])
def test_class_attention_methods_need_a_class_token(method):
    model = tiny_vit("vit_tiny_patch16_224", class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match=f"method '{method}'.*class token"):
        tokenreduce.apply(model, method)


def test_method_type_error():
    with pytest.raises(TypeError, match="method must be a method name"):
        tokenreduce.apply(tiny_vit(), 3)


def test_methods_lists_registered_names():
    names = [
        "asvit",
        "ats",
        "bat",
        "diffrate",
        "evit",
        "gtp",
        "ltmp",
        "mctf",
        "pitome",
        "ppt",
        "tofu",
        "tome",
        "topk",
    ]
    assert tokenreduce.methods() == names


@pytest.mark.parametrize("depth", [4, 6, 24])
@pytest.mark.parametrize("method", method_names())
def test_every_method_by_name_alone_fits_any_depth(method, depth):
    """`apply(model, name)` with the defaults: every block count gets a schedule, and every
    method that is not learned (learned defaults are the identity) reduces the model."""
    model = tiny_vit("vit_tiny_patch16_224", depth=depth, img_size=64)
    tokenreduce.apply(model, method)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    info = tokenreduce.last_info(model)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    assert info.tokens_per_block.shape == (2, depth)
    learned = method in learned_method_names()
    assert learned or (info.tokens_per_block[:, -1] < 17).all()


@pytest.mark.parametrize("method", method_names())
def test_every_method_runs_without_a_class_token_or_refuses_in_one_line(method):
    model = tiny_vit("vit_tiny_patch16_224", class_token=False, global_pool="avg", img_size=64)
    if type(make_config(method)).requires_class_token:
        with pytest.raises(
            ValueError, match=f"method '{method}'.*needs a model with a class token"
        ) as refused:
            tokenreduce.apply(model, method)
        # the methods it suggests are those that run here (the other branch of this test)
        runs = [m for m in method_names() if not type(make_config(m)).requires_class_token]
        assert str(refused.value).endswith(f"a method that needs none: {', '.join(runs)}")
        assert runs == ["gtp", "ltmp", "mctf", "pitome", "tofu", "tome"]
        return
    tokenreduce.apply(model, method)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 64, 64))).all()


@pytest.mark.parametrize("method", method_names())
def test_a_config_takes_its_options_by_keyword_only(method):
    """Every config is keyword-only: a positional value or an unknown keyword is one line
    naming the config and its options (not the dataclass __init__'s TypeError)."""
    from tokenreduce.errors import InvalidOptionError, InvalidTypeError
    from tokenreduce.methods.base import _REGISTRY

    config_class = _REGISTRY[method]
    with pytest.raises(InvalidTypeError, match=rf"{config_class.__name__}\(8,\): options are gi"):
        config_class(8)
    with pytest.raises(InvalidOptionError, match=r"option\(s\) bogus are not options of method"):
        config_class(bogus=1)
    assert config_class() == make_config(method)
