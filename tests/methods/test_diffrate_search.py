"""DiffRate's rate search (docs/methods.md §3.9, "Search"): the official search's float64 steps,
the rates and their straight-through masks, the search through `tokenreduce train`, the schedule
file, and the errors.

Fixtures tests/methods/fixtures/diffrate_search_*.safetensors were recorded by
`benchmarks/diffrate_official.py --record-search` with OpenGVLab/DiffRate at commit
91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e on the shared random-weight DeiT-Tiny and its 4 images:
"default" (zero logits, the official recipe: 3 epochs of one step) and "profile" (logits that
prune and merge in most blocks from the first step, 3 epochs of two steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

import tokenreduce
from tests.conftest import make_image_folder, peaky_vit, run_cli, tiny_vit
from tokenreduce import data, train
from tokenreduce.data import ImageFolder
from tokenreduce.methods.diffrate import DiffRateConfig
from tokenreduce.methods.diffrate_search import (
    SCHEDULE_FORMAT,
    SearchRates,
    straight_through_mask,
    write_schedule_file,
)
from tokenreduce.ops.attention import policy_softmax
from tokenreduce.patch import attached_engine

OURS = Path(__file__).parent / "fixtures"
SMALL = ["-m", "vit_tiny_patch16_224", "--img-size", "64", "--num-classes", "10"]


def recorded(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    path = OURS / f"diffrate_search_{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return load_file(str(path)), metadata


# ---- against the official search ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["default", "profile"])
def test_search_matches_official(fixture_model, images, name):
    """Every step: logits of the search forward within 1e-12 (measured 2e-15), the loss, the
    expected GMACs (less the constant by which the official patch-embedding and head terms
    differ from ours), the rounded counts and the final key mask equal; the gradients of the
    rates at step 0 within 1e-15 (2e-17) and the rates after every AdamW step within 1e-12
    (1.4e-13: AdamW's first step divides a gradient the official computes as exactly 0, and ours
    as 1e-19, by eps = 1e-8)."""
    ref, metadata = recorded(name)
    setting = json.loads(metadata["setting"])
    model = fixture_model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    config = DiffRateConfig()
    tokenreduce.apply(model, config)
    try:
        dims = tokenreduce.describe(model)
        offset = tokenreduce.flops.dense_gmacs(model) - float(metadata["dense_gflops"])
        objective = train.RateObjective(
            config,
            dims,
            setting["arch_lr"],
            setting["target_flops"] + offset,
            setting["lamb"],
            0.1,
            torch.device("cpu"),
            torch.float64,
        )
        with torch.no_grad():
            objective.trainable.prune.copy_(ref["prune_logits_init"])
            objective.trainable.merge.copy_(ref["merge_logits_init"])
        engine = attached_engine(model)
        engine.set_trainable(model, objective.trainable)
        optimizer = objective.optimizer()
        learning_rates = json.loads(metadata["learning_rates"])
        model.train()
        step = 0
        for epoch in range(setting["epochs"]):
            objective.start_epoch(optimizer, epoch, setting["epochs"])
            for _ in range(setting["steps_per_epoch"]):
                logits = model(images)
                loss, parts = objective.loss(logits, ref["labels"], tokenreduce.last_info(model))
                optimizer.zero_grad()
                loss.backward()
                assert optimizer.param_groups[0]["lr"] == learning_rates[step]
                if step == 0:
                    for kind in ("prune", "merge"):
                        grad = getattr(objective.trainable, kind).grad
                        assert (grad - ref[f"{kind}_grad_step0"]).abs().max() <= 1e-15
                optimizer.step()
                assert (logits - ref[f"logits_step{step}"]).abs().max() <= 1e-12
                assert parts["loss"] == pytest.approx(ref["loss"][step].item(), abs=1e-12)
                assert parts["ce"] == pytest.approx(ref["ce"][step].item(), abs=1e-12)
                gflops = parts["gmacs"] - offset
                assert gflops == pytest.approx(ref["gflops"][step].item(), abs=1e-12)
                prune, merge = objective.schedule
                assert prune == ref["prune_kept"][step].tolist(), step
                assert merge == ref["merge_kept"][step].tolist(), step
                mask = engine.final_state().mask.detach()
                # the same multiset: after a block that changes nothing ours does not sort
                expected = ref[f"mask_step{step}"].sort(dim=1, descending=True).values
                assert torch.equal(mask.sort(dim=1, descending=True).values, expected)
                for kind in ("prune", "merge"):
                    rates = getattr(objective.trainable, kind).detach()
                    assert (rates - ref[f"{kind}_logits_step{step}"]).abs().max() <= 1e-12
                step += 1
    finally:
        model.eval()
        tokenreduce.remove(model)


def test_fixture_settings_search_as_intended():
    """default: the official start (every block 101 tokens, prune and merge alike: no merge);
    profile: blocks prune and merge, block 4 merges only, block 7 does nothing."""
    ref, _ = recorded("default")
    assert ref["prune_kept"][0].tolist() == [197] + [101] * 11
    ref, _ = recorded("profile")
    prune, merge = ref["prune_kept"][0].tolist(), ref["merge_kept"][0].tolist()
    tokens = [197]
    for p, m in zip(prune, merge, strict=True):
        tokens.append(min(tokens[-1], p, m))
    pruning = [i for i in range(1, 12) if prune[i] < tokens[i]]
    merging = [i for i in range(1, 12) if merge[i] < min(tokens[i], prune[i])]
    assert 4 in merging and 4 not in pruning and 7 not in pruning + merging
    assert len(pruning) >= 7 and len(merging) >= 9


# ---- the pieces ---------------------------------------------------------------------------------
def test_rates_start_uniform_and_masks_are_straight_through():
    rates = SearchRates(12, 196, 1, 4, torch.float64)
    assert rates.candidates.tolist() == list(range(196, 0, -4))
    steps = rates.steps()
    assert steps[0] is None and all(s.kept == s.stay == 101 for s in steps[1:])
    # each position is kept by the candidates above it: 1 up to 5 tokens, 1/49 for the last 4
    _, keep = rates.kept(rates.prune[0])
    assert keep[:5].sum().item() == pytest.approx(5.0)
    assert keep[-4:].tolist() == pytest.approx([1 / 49] * 4)
    mask = straight_through_mask(keep, 101, 150)
    assert mask[:101].tolist() == [1.0] * 101 and mask[101:150].abs().max() == 0
    assert mask[150:].tolist() == [1.0] * 47
    mask.sum().backward()
    assert rates.prune.grad is not None and rates.prune.grad[0].abs().max() > 0


def test_token_counts_pass_gradient_to_both_counts():
    """The official `ste_min`: tokens after a block are the fewest of those entering, the prune
    and the merge count, and both counts get the gradient, whichever is smaller."""
    rates = SearchRates(3, 16, 1, 1, torch.float64)
    with torch.no_grad():
        # one candidate has all the probability but e^-100 (its count exactly, rounded up)
        rates.prune[0, 10] = 100.0  # prune keeps 6 + 1 tokens in block 1
        rates.merge[0, 2] = 100.0  # merge 14 + 1: above the tokens pruning leaves
    steps = rates.steps()
    counts = rates.token_counts(steps)
    assert counts.tolist() == pytest.approx([17, 7, 7], abs=1e-9)
    counts[1].backward()
    for kind in ("prune", "merge"):
        assert getattr(rates, kind).grad[0].abs().max() > 0, kind


def test_policy_softmax_lets_masked_queries_attend_to_themselves():
    logits = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    policy = torch.tensor([[1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    attn = policy_softmax(logits, policy)
    assert attn.sum(dim=-1).sub(1).abs().max() < 1e-5
    assert attn[0, :, [0, 1, 3], 2].max() < 1e-6  # kept queries: key 2 removed
    assert attn[0, :, 2, 2].min() > 1e-3  # the masked query keeps itself
    full = policy_softmax(logits, torch.ones(1, 4, dtype=torch.float64))
    torch.testing.assert_close(full, logits.softmax(dim=-1), atol=1e-5, rtol=0)


def test_eval_mode_with_rates_runs_their_rounded_counts():
    model = tiny_vit("vit_tiny_patch16_224", img_size=64).double()
    tokenreduce.apply(model, "diffrate")
    rates = SearchRates(12, 16, 1, 2, torch.float64)
    attached_engine(model).set_trainable(model, rates)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    counts = rates.token_counts(rates.steps()).round().long().tolist()
    assert tokenreduce.last_info(model).tokens_per_block[0].tolist() == counts
    assert counts[-1] < 17


# ---- the search through train, and its file ------------------------------------------------------
@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A short search on the small random model: 2 epochs of 2 steps, a large rate."""
    tmp_path = tmp_path_factory.mktemp("search")
    model = peaky_vit().float()
    root = make_image_folder(tmp_path / "images", 4)
    dataset = ImageFolder(root, data.eval_transform(model, input_size=(3, 64, 64))[0])
    dense = tokenreduce.flops.dense_gmacs(model)
    result = train.train_thresholds(
        model,
        "diffrate",
        dataset,
        gmacs_target=0.5 * dense,
        epochs=2,
        batch_size=4,
        lr={"rates": 0.5},
        reg_scale=1e4,
        out=tmp_path / "schedule.safetensors",
        progress=False,
    )
    return model, result, dense


def test_search_moves_the_expected_gmacs_toward_the_target(searched):
    model, result, dense = searched
    gmacs = [step["gmacs"] for step in result.history]
    assert len(gmacs) == 4 and result.gmacs_target == 0.5 * dense
    assert abs(gmacs[-1] - 0.5 * dense) < abs(gmacs[0] - 0.5 * dense)
    assert result.mean_gmacs < dense and result.target_ratio is None
    assert attached_engine(model) is None and not model.training


def test_schedule_file_round_trips_through_apply(searched):
    model, result, _ = searched
    with safe_open(str(result.path), "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == SCHEDULE_FORMAT
    assert json.loads(metadata["model_facts"])["num_patches"] == 16
    log = json.loads(Path(f"{result.path}.json").read_text())
    assert log["gmacs_target"] == result.gmacs_target and len(log["history"]) == 4
    tokenreduce.apply(model, "diffrate", searched=str(result.path))
    try:
        config = attached_engine(model).config
        assert config.prune_kept_num == result.config.prune_kept_num
        assert config.merge_kept_num == result.config.merge_kept_num
        with torch.no_grad():
            model(torch.randn(2, 3, 64, 64))
        report = tokenreduce.flops.gmacs(model, tokenreduce.last_info(model))
        assert report.mean == pytest.approx(result.mean_gmacs)
    finally:
        tokenreduce.remove(model)


def test_schedule_file_for_another_model_is_refused(searched, tmp_path):
    _, result, _ = searched
    deeper = tiny_vit("vit_tiny_patch16_224", depth=6, img_size=64)
    with pytest.raises(ValueError) as error:
        tokenreduce.apply(deeper, "diffrate", searched=str(result.path))
    message = str(error.value)
    assert "\n" not in message and str(result.path) in message
    assert "depth 12" in message and "depth 6" in message and "depth differ" in message
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        tokenreduce.apply(deeper, "diffrate", searched=str(tmp_path / "missing.safetensors"))
    other = tmp_path / "other.safetensors"
    dims = tokenreduce.describe(deeper)
    write_schedule_file(other, [17] * 5, [17] * 5, dims, {})  # 5 counts for 6 blocks
    with pytest.raises(ValueError, match="one per block"):
        DiffRateConfig(searched=str(other))
    with pytest.raises(ValueError, match="format None"):
        DiffRateConfig(searched=str(OURS / "diffrate_s2.9.safetensors"))
    for facts, match in (("[6]", "holds a JSON list, not an object"), ("{x", "is not valid JSON")):
        write_schedule_file(other, [17] * 6, [17] * 6, dims, {})
        with safe_open(str(other), framework="pt") as handle:
            header = dict(handle.metadata()) | {"model_facts": facts}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        other.write_bytes(save(tensors, metadata=header))
        with pytest.raises(ValueError, match=f"other.safetensors'.*'model_facts' {match}"):
            DiffRateConfig(searched=str(other))
    with pytest.raises(ValueError, match="searched alone"):
        DiffRateConfig(
            searched=str(result.path), prune_kept_num=[17] * 12, merge_kept_num=[17] * 12
        )


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"gmacs_target": 0.0}, "gmacs_target=0.0 is not accepted; accepted: > 0"),
        ({"gmacs_target": 1e3}, r"gmacs_target=1000.0 is not accepted; accepted: a number in"),
        ({"target_ratio": 0.5}, "target_ratio is not accepted with method 'diffrate'"),
        ({}, "needs gmacs_target"),
        ({"gmacs_target": 0.05, "granularity": 0}, "granularity=0 is not accepted"),
        ({"gmacs_target": 0.05, "granularity": 16}, "granularity=16 is not accepted"),
        ({"gmacs_target": 0.05, "preset": "ViT-T-DeiT/1.0"}, "option.s. preset would be ignored"),
        ({"gmacs_target": 0.05, "finetune": True}, "finetune is not accepted with method"),
        ({"gmacs_target": 0.05, "lr": {"thresholds": 1.0}}, "learns \\['rates'\\]"),
    ],
)
def test_bad_search_settings_are_refused_in_one_line(tmp_path, kwargs, pattern):
    model = peaky_vit().float()
    root = make_image_folder(tmp_path / "images", 1)
    dataset = ImageFolder(root, data.eval_transform(model, input_size=(3, 64, 64))[0])
    with pytest.raises(ValueError, match=pattern) as error:
        train.train_thresholds(model, "diffrate", dataset, progress=False, **kwargs)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="nothing tokenreduce train learns; accepted: asvit, "):
        train.train_thresholds(model, "tome", dataset, target_ratio=0.5)


def test_cli_searches_and_the_schedule_file_is_a_method_option(tmp_path):
    root = make_image_folder(tmp_path / "train", per_class=2)
    out = tmp_path / "diffrate.safetensors"
    common = [*SMALL, "--weights", "random", "-j", "0", "--no-progress"]
    result = run_cli(
        *["train", str(root), *common, "--method", "diffrate", "--gmacs-target", "0.05"],
        *["--out", str(out), "-b", "2", "--epochs", "1", "--lr", "rates=0.5"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "schedule: prune_kept_num [" in result.stdout
    assert f"--method diffrate:searched={out}" in result.stdout
    evaluated = run_cli("eval", str(root), *common, "--method", f"diffrate:searched={out}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    smaller = ["-m", "vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "10"]
    refused = run_cli(
        *["eval", str(root), *smaller, "--weights", "random", "-j", "0", "--no-progress"],
        *["--method", f"diffrate:searched={out}"],
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"schedule file {str(out)!r} was searched for a model with depth 12" in refused.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "diffrate", "--gmacs-target", "0"], "--gmacs-target=0.0 is not accepted"),
        (["--method", "diffrate", "--gmacs-target", "99"], "--gmacs-target=99.0 is not accepted"),
        (["--method", "diffrate", "--target", "0.5"], "--target is not accepted with method"),
        (["--method", "diffrate:granularity=0", "--gmacs-target", "0.05"], "granularity=0"),
        (["--method", "ltmp", "--gmacs-target", "0.05"], "--gmacs-target is not accepted"),
        (["--method", "tome", "--target", "0.5"], "accepted: asvit, diffrate, ltmp"),
    ],
)
def test_cli_refuses_bad_search_settings(tmp_path, args, message):
    root = make_image_folder(tmp_path / "train", per_class=1)
    result = run_cli(
        *["train", str(root), *SMALL, "--weights", "random", *args],
        *["--out", str(tmp_path / "t.safetensors"), "-b", "2", "-j", "0", "--no-progress"],
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr
