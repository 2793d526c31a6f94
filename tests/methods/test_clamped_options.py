"""One convention for option values a method cannot honour on a model (docs/methods.md §3,
"Values a method cannot honour"): the value is clamped to what the model allows and one warning
per apply names the value used. The model then runs exactly as with that value given."""

from __future__ import annotations

import logging

import pytest
import torch

import tokenreduce
from tests.conftest import peaky_vit, tiny_vit

# (method, options given, options used, what the warning names); a 4-block ViT of 64x64 images:
# 17 tokens, 1 prefix; BAT with keep_rate 0.6 at layers (1, 2): 10 attentive, 6 inattentive
BAT = {"keep_rate": 0.6, "layers": (1, 2)}
CASES = [
    ("tome", {"r": 100}, {"r": [8, 4, 2, 1]}, "r=[8, 4, 2, 1]"),
    ("tome", {"r": (6, -1.0)}, {"r": [8, 4, 2, 0]}, "r=[8, 4, 2, 0]"),  # 12, 8, 4, 0 asked
    ("ppt", {"r": 50, "layers": (1, 2)}, {"r": [8, 4], "layers": (1, 2)}, "r=[8, 4]"),
    ("bat", {**BAT, "clusters": 40}, {**BAT, "clusters": 6}, "clusters=6"),
    ("bat", {**BAT, "clusters": 0}, {**BAT, "clusters": 1}, "clusters=1"),
    ("bat", {**BAT, "attentive_matches": 9}, {**BAT, "attentive_matches": 5},
     "attentive_matches=5"),
    ("bat", {**BAT, "neighbours": 50}, {**BAT, "neighbours": 5}, "neighbours=5"),
    ("asvit", {"thresholds": 1.1, "min_keep": 0}, {"thresholds": 1.1}, "min_keep=1"),
    ("asvit", {"thresholds": 1.1, "min_keep": 99}, {"thresholds": 1.1, "min_keep": 16},
     "min_keep=16"),
    ("gtp", {"num_prop": 8}, {"num_prop": (8, 7, 0, 0)}, "num_prop=(8, 7, 0, 0)"),
    ("gtp", {"num_prop": 2, "num_neighbours": 20}, {"num_prop": 2, "num_neighbours": 15},
     "num_neighbours=15"),
    ("diffrate", {"prune_kept_num": [30, 15, 10, 5], "merge_kept_num": [17, 12, 8, 4]},
     {"prune_kept_num": [17, 15, 10, 5], "merge_kept_num": [17, 12, 8, 4]},
     "prune_kept_num=(17, 15, 10, 5)"),
    ("diffrate", {"prune_kept_num": [17, 15, 16, 5], "merge_kept_num": [17, 12, 8, 4]},
     {"prune_kept_num": [17, 15, 12, 5], "merge_kept_num": [17, 12, 8, 4]},
     "prune_kept_num=(17, 15, 12, 5)"),  # more than block 2 receives
    ("diffrate", {"prune_kept_num": [17, 15, 10, 5], "merge_kept_num": [17, 16, 8, 4]},
     {"prune_kept_num": [17, 15, 10, 5], "merge_kept_num": [17, 15, 8, 4]},
     "merge_kept_num=(17, 15, 8, 4)"),  # a merge keeping more than its pruning kept
]  # fmt: skip
MASKED = {"batching": "masked", "merge_thresholds": 0.5, "prune_thresholds": 0.05}
CASES += [
    ("ltmp", {**MASKED, "max_tokens": 1}, {**MASKED, "max_tokens": 2}, "max_tokens=2"),
    ("ltmp", {**MASKED, "max_tokens": 500}, {**MASKED, "max_tokens": 17}, "max_tokens=17"),
    ("asvit", {"batching": "masked", "max_tokens": 1}, {"batching": "masked", "max_tokens": 2},
     "max_tokens=2"),
]  # fmt: skip


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize(("method", "given", "used", "named"), CASES)
def test_a_value_the_model_cannot_honour_is_clamped_with_one_warning(
    caplog, method, given, used, named
):
    torch.manual_seed(2)
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="tokenreduce"):
        model = tokenreduce.apply(peaky_vit(depth=4), method, **given)
        with torch.no_grad():
            clamped = model(x)
            model(x)  # once per apply, not per forward
    (message,) = warnings_of(caplog)
    option = named.split("=")[0]
    assert message.startswith(f"{method}: option {option}=")
    assert message.endswith(f"using {named} instead"), message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokenreduce"):
        model = tokenreduce.apply(peaky_vit(depth=4), method, **used)
        with torch.no_grad():
            expected = model(x)
    assert warnings_of(caplog) == []  # the effective value itself is honoured
    torch.testing.assert_close(clamped, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("method", "options"),
    [("tome", {}), ("ppt", {}), ("bat", {}), ("asvit", {}), ("ltmp", {}),
     ("tome", {"r": 98}), ("bat", {"clusters": 58, "attentive_matches": 69, "neighbours": 57}),
     ("asvit", {"min_keep": 196}), ("ltmp", {"batching": "masked", "max_tokens": 2}),
     ("diffrate", {}), ("diffrate", {"rate_scale": 2.0}),
     ("gtp", {}), ("gtp", {"num_prop": 48, "num_neighbours": 195})],
)  # fmt: skip
def test_values_the_model_honours_give_no_warning(caplog, method, options):
    """The defaults on a 224x224 ViT (197 tokens; BAT: 138 attentive, 58 inattentive), and the
    largest values it honours."""
    with caplog.at_level(logging.WARNING, logger="tokenreduce"):
        tokenreduce.apply(tiny_vit("vit_tiny_patch16_224", depth=4), method, **options)
    assert warnings_of(caplog) == []
