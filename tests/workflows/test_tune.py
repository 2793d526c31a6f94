"""`tokenreduce tune` and recipes: the search on a tiny random-weight model (a GMACs-ratio target
is deterministic; speed targets with the timing replaced where real timing would make the test
flaky), recipe round trips through `apply` and `--method FILE.json`, and the one-line errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tokenreduce
from tests.conftest import make_image_folder, run_cli
from tokenreduce import bench, calibrate, models, recipe
from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.base import make_config
from tokenreduce.methods.learned import model_facts
from tokenreduce.patch import attached_engine
from tokenreduce.tuning import Target, fidelity, speedup_spread, speedup_standard_error, tune

TINY = ("-m", "test_vit", "--weights", "random", "--num-classes", "3")
FAST = ("--num-warm-iter", "0", "--num-bench-iter", "2", "--no-progress")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(1)
    return models.load("test_vit", pretrained=False, num_classes=3)


@pytest.fixture(scope="module")
def images(model) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(10, 3, *tokenreduce.describe(model).input_size)


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data", 3, ("a", "b", "c"))


def test_gmacs_target_is_each_methods_matched_strength(model, images):
    result = tune(
        model, images, Target("gmacs_ratio", 0.6), ["tome", "evit"], num_bench_iter=2,
        progress=False,
    )  # fmt: skip
    for row in result.rows:
        matched = calibrate.match_gmacs(model, row.method, 0.6, images[:1], tolerance=5e-3)
        assert row.status == "ok"
        assert row.gmacs_ratio == pytest.approx(matched.ratio, abs=1e-4)
        assert row.options == tokenreduce.options.describe_options(matched.config)
    fidelities = [row.fidelity for row in result.rows]
    assert fidelities == sorted(fidelities, reverse=True)
    assert attached_engine(model) is None


def test_cosine_and_accuracy_fidelity_are_the_dense_comparisons(model, images):
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    result = tune(
        model, images, Target("gmacs_ratio", 0.7), ["evit"], labels=labels, num_bench_iter=2,
        progress=False,
    )  # fmt: skip
    (row,) = result.rows
    reduced = tokenreduce.apply(copy.deepcopy(model), result.winner[1])
    with torch.inference_mode():
        top1 = (reduced(images).argmax(-1) == labels).double().mean().item() * 100
        dense = (model(images).argmax(-1) == labels).double().mean().item() * 100
    assert row.fidelity == pytest.approx(top1, abs=1e-3)
    assert result.dense_fidelity == pytest.approx(dense)
    assert row.fidelity_metric == "accuracy"


def fake_timing(speedup_at):
    """A `measure_speedup` whose speedup is `speedup_at(ratio of the reduced model)`, with a
    spread of 2%: the search logic without the machine's noise."""

    def measure(dense, reduced, batches, warm, rounds, *args):
        with torch.inference_mode():
            reduced(batches[0])
        info = tokenreduce.last_info(reduced)
        ratio = tokenreduce.flops.gmacs(reduced, info).mean / tokenreduce.flops.dense_gmacs(dense)
        speedup = speedup_at(ratio)
        return bench.Timing([1.0, 1.0, 1.0, 1.0], [1 / speedup * f for f in (0.98, 1, 1, 1.02)])

    return measure


def test_speed_target_finds_the_weakest_setting_that_meets_it(model, images, monkeypatch):
    # 80% of the ideal speedup: a 1.4x target needs a ratio of about 0.8 / 1.4 = 0.571
    monkeypatch.setattr(bench, "measure_speedup", fake_timing(lambda ratio: 0.8 / ratio))
    result = tune(model, images, Target("speedup", 1.4), ["tome"], progress=False)
    (row,) = result.rows
    assert row.status == "ok"
    assert row.measured_speedup + row.speedup_spread >= 1.4
    r = result.winner[1].r
    weaker = calibrate.mean_gmacs(model, tokenreduce.ToMeConfig(r=r - 1), images[:8])
    tokenreduce.remove(model)
    assert 0.8 / (weaker / tokenreduce.flops.dense_gmacs(model)) < 1.4 - row.speedup_spread
    assert row.measurements <= 4


def test_unreachable_speed_is_reported_with_the_best_reached(model, images, monkeypatch):
    monkeypatch.setattr(bench, "measure_speedup", fake_timing(lambda ratio: 1.1))
    result = tune(model, images, Target("speedup", 1.5), ["tome", "evit"], progress=False)
    assert result.winner is None
    assert [row.status for row in result.rows] == ["unreached", "unreached"]
    assert "--speedup=1.5 is reached by no method" in result.unreached_message()
    assert "1.100x" in result.unreached_message()


def test_speedup_spread_is_the_deviation_of_a_round_and_its_median_has_a_standard_error():
    timing = bench.Timing([1.0] * 5, [0.5, 0.5, 0.5, 0.5, 0.5])
    assert speedup_spread(timing) == 0
    assert speedup_standard_error(timing) == 0
    timing = bench.Timing([1.0] * 5, [1 / 1.8, 1 / 1.9, 1 / 2.0, 1 / 2.1, 1 / 2.2])
    # quartiles 1.9 and 2.1: sigma = 0.2 / 1.349; 95% of rounds within 1.96 sigma
    assert speedup_spread(timing) == pytest.approx(1.96 * 0.2 / 1.349)
    assert speedup_standard_error(timing) == pytest.approx(1.253 * 0.2 / 1.349 / 5**0.5)
    assert speedup_spread(bench.Timing([1.0], [0.5])) == 0


@pytest.mark.parametrize(
    "kind, value, message",
    [
        ("speedup", 1.0, "--speedup=1.0 is not accepted; accepted: a number > 1"),
        ("gmacs_ratio", 1.2, "--gmacs-ratio=1.2 is not accepted; accepted: a number in (0, 1)"),
        ("latency_ms", -3, "--latency-ms=-3 is not accepted"),
        ("speed", 2, "target kind='speed' is not accepted"),
    ],
)
def test_bad_targets_are_one_line(kind, value, message):
    with pytest.raises(InvalidOptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Target(kind, value)


def test_recipe_round_trip_gives_the_same_config_and_gmacs(model, images, tmp_path):
    result = tune(
        model, images, Target("gmacs_ratio", 0.6), ["ppt"], num_bench_iter=2, progress=False
    )
    path = tmp_path / "recipe.json"
    recipe.write_recipe(path, result.recipe(model))
    written = json.loads(path.read_text())
    assert written["method"] == "ppt" and written["model"]["name"] == "test_vit.r160_in1k"
    assert written["target"] == {"kind": "gmacs_ratio", "value": 0.6, "batch_size": 1,
                                 "speedup": None}  # fmt: skip
    assert written["torch"] == torch.__version__ and written["device"] == "cpu"
    assert written["measured"]["gmacs_ratio"] == result.rows[0].gmacs_ratio
    _, config = result.winner
    applied = tokenreduce.apply(model, str(path))
    try:
        assert attached_engine(applied).config == config
        with torch.inference_mode():
            model(images[:8])
        gmacs = tokenreduce.flops.gmacs(model, tokenreduce.last_info(model)).mean
    finally:
        tokenreduce.remove(model)
    ratio = gmacs / tokenreduce.flops.dense_gmacs(model)
    assert ratio == pytest.approx(result.rows[0].gmacs_ratio, abs=1e-4)


def test_recipe_keeps_tuple_options_and_learned_thresholds(tmp_path, model):
    config = make_config(
        "ltmp", merge_thresholds=(0.9, 0.8, 0.7, 0.9, 0.8, 0.7), prune_thresholds=0.01
    )
    path = tmp_path / "ltmp.json"
    facts = model_facts(tokenreduce.describe(model))
    recipe.write_recipe(path, recipe.Recipe("ltmp", recipe.config_options(config), facts))
    assert recipe.recipe_config(path, tokenreduce.describe(model)) == config


def test_recipe_of_another_model_is_refused(model, tmp_path):
    path = tmp_path / "other.json"
    facts = {"name": "deit_tiny_patch16_224", "depth": 12, "embed_dim": 192, "num_tokens": 197}
    recipe.write_recipe(path, recipe.Recipe("tome", {"r": 4}, facts))
    with pytest.raises(InvalidOptionError, match="was tuned for deit_tiny_patch16_224 .* not this"):
        tokenreduce.apply(model, str(path))
    assert attached_engine(model) is None
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(InvalidOptionError, match="is not a recipe"):
        tokenreduce.apply(model, str(tmp_path / "bad.json"))


def test_tune_cli_writes_a_recipe_that_bench_and_eval_take(folder, tmp_path):
    out = tmp_path / "recipe.json"
    result = run_cli(
        "tune", *TINY, "--gmacs-ratio", "0.6", "--data", str(folder), "--method", "tome",
        "--method", "evit", "--method", "ltmp", "--out", str(out), *FAST,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "learned thresholds not given" in result.stdout
    assert f"recipe written to {out}" in result.stdout
    method = json.loads(out.read_text())["method"]
    result = run_cli("bench", *TINY, "-b", "1", "--method", str(out), *FAST[:4])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2].startswith(method)
    result = run_cli("eval", str(folder), *TINY, "--method", str(out), "-j", "0", "--no-progress")
    assert result.returncode == 0, result.stderr
    result = run_cli("bench", "-m", "deit_tiny_patch16_224", "-b", "1", "--method", str(out))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"tokenreduce bench: error: recipe {out} was tuned for test_vit")
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("--speedup", "0.5"), "--speedup=0.5 is not accepted; accepted: a number > 1"),
        (("--gmacs-ratio", "0.01", "--method", "evit"), "--gmacs-ratio=0.01 is reached by no"),
        (("--speedup", "2", "--out", "r.txt"), "--out=r.txt is not accepted"),
        (("--latency-ms", "0.001", "--method", "tome", "--max-measurements", "1"),
         "--latency-ms=0.001 is reached by no method here (the best reached is tome"),
    ],
)  # fmt: skip
def test_tune_cli_errors_are_one_line(args, message, folder):
    result = run_cli("tune", *TINY, "--data", str(folder), *args, *FAST)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_learned_methods_are_measured_as_given_or_skipped(model, images):
    given = ("ltmp", {"merge_thresholds": 0.5, "prune_thresholds": 0.0})
    result = tune(
        model, images, Target("gmacs_ratio", 0.9), [given, "asvit"], num_bench_iter=2,
        progress=False,
    )  # fmt: skip
    ltmp, asvit = result.rows
    ratio = calibrate.mean_gmacs(model, make_config(*given[:1], **given[1]), images[:8])
    tokenreduce.remove(model)
    assert ltmp.gmacs_ratio == pytest.approx(ratio / tokenreduce.flops.dense_gmacs(model), abs=1e-4)
    assert ltmp.status == ("ok" if ltmp.gmacs_ratio <= 0.9 * 1.02 else "unreached")
    assert "merge_thresholds=0.5" in ltmp.options and ltmp.measurements == 1
    assert asvit.status == "skipped" and "asvit:thresholds=FILE" in asvit.reason


def test_dense_fidelity_is_the_cosine_of_every_patchs_feature(model, images):
    unreduced = tokenreduce.apply(copy.deepcopy(model), "tome", r=0)
    assert fidelity(model, unreduced, images[:3], "patch_cosine") == pytest.approx(1.0)
    reduced = tokenreduce.apply(copy.deepcopy(model), "evit", keep_rate=0.5)
    with torch.inference_mode():
        ours = tokenreduce.patch_features(reduced, images[:3])
        dense = model.forward_features(images[:3])
    per_image = F.cosine_similarity(ours.double(), dense.double(), dim=-1).mean(1)
    value = fidelity(model, reduced, images[:3], "patch_cosine", chunk=2)
    assert value == pytest.approx(per_image.mean().item()) and value < 0.999
