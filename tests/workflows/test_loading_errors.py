"""Loading foreign models (transformers folders, open_clip towers) and checkpoints, as a new user
gets them wrong: every failure is one line naming the folder, file or name and what is accepted,
and the CLI exits 2 with no traceback and no library dump. `--weights auto` uses a folder's or
checkpoint's own weights. Tiny models built here (offline, CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tokenreduce import models
from tokenreduce.cli import build_parser, main, shared
from tokenreduce.errors import (
    InvalidOptionError,
    MissingFileError,
    TokenReduceError,
    UnsupportedModelError,
)

transformers = pytest.importorskip("transformers", reason="tokenreduce[hf] not installed")


def tiny_vit_config(width: int = 32, layers: int = 2) -> transformers.ViTConfig:
    return transformers.ViTConfig(
        hidden_size=width, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=3,
    )  # fmt: skip


def edit_config(folder: Path, **changes: object) -> None:
    settings = json.loads((folder / "config.json").read_text())
    settings.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        settings.pop(key)
    (folder / "config.json").write_text(json.dumps(settings))


# folder name -> the preprocessor_config.json it holds (each wrong in one key)
PROCESSORS = {
    "processor_list": "[1, 2]",
    "processor_mean_text": '{"image_mean": "abc"}',
    "processor_mean_two": '{"image_mean": [0.5, 0.5]}',
    "processor_std_zero": '{"image_std": [0.5, 0, 0.5]}',
    "processor_size": '{"size": {"height": "224"}}',
    "processor_resample": '{"resample": 9}',
    "processor_normalize": '{"do_normalize": "no"}',
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A good ViT classifier folder and the ways one goes wrong, each saved by save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(1)  # not the tests' seed 0, so that random weights differ from these
    good = root / "good"
    transformers.ViTForImageClassification(tiny_vit_config()).save_pretrained(good)
    made = {"good": good}
    for name in ("bad_json", "no_model_type", "no_architectures", "no_weights", "truncated"):
        made[name] = Path(shutil.copytree(good, root / name))
    (made["bad_json"] / "config.json").write_text("{not json")
    edit_config(made["no_model_type"], model_type=None)
    edit_config(made["no_architectures"], architectures=None)
    (made["no_weights"] / "model.safetensors").unlink()
    weights = made["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    wider = root / "wider"
    transformers.ViTForImageClassification(tiny_vit_config(48)).save_pretrained(wider)
    made["other_weights"] = Path(shutil.copytree(good, root / "other_weights"))
    shutil.copy(wider / "model.safetensors", made["other_weights"] / "model.safetensors")
    bert = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=50,
    )  # fmt: skip
    transformers.BertModel(bert).save_pretrained(root / "bert")
    convnext = transformers.ConvNextConfig(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1])
    transformers.ConvNextForImageClassification(convnext).save_pretrained(root / "convnext")
    made |= {"bert": root / "bert", "convnext": root / "convnext", "root": root}
    deeper = root / "deeper"  # 3 blocks: its weights have keys the 2-block config lacks
    transformers.ViTForImageClassification(tiny_vit_config(layers=3)).save_pretrained(deeper)
    made["deeper_weights"] = Path(shutil.copytree(good, root / "deeper_weights"))
    shutil.copy(deeper / "model.safetensors", made["deeper_weights"] / "model.safetensors")
    made["garbage_bin"] = Path(shutil.copytree(made["no_weights"], root / "garbage_bin"))
    (made["garbage_bin"] / "pytorch_model.bin").write_bytes(b"garbage" * 10)
    for key, changes in (("patch_0", {"patch_size": 0}), ("hidden_text", {"hidden_size": "x"})):
        made[key] = Path(shutil.copytree(good, root / key))
        edit_config(made[key], **changes)
    for key, processor in PROCESSORS.items():
        made[key] = Path(shutil.copytree(good, root / key))
        (made[key] / "preprocessor_config.json").write_text(processor)
    (root / "garbage.pt").write_bytes(b"garbage" * 10)
    (root / "garbage.safetensors").write_bytes(b"garbage" * 10)
    torch.save({"foo": torch.zeros(3)}, root / "other_model.pt")
    return made


# (model name with {folder} fields, load kwargs, error type, what the one line must say)
API_CASES = [
    ("hf:{bad_json}", {}, InvalidOptionError, "config.json is not valid JSON"),
    ("hf:{no_model_type}", {}, InvalidOptionError, "config.json has no 'model_type'"),
    ("hf:{no_architectures}", {}, UnsupportedModelError, "names no class in 'architectures'"),
    ("hf:{no_weights}", {}, MissingFileError, "no weights in"),
    ("hf:{truncated}", {}, InvalidOptionError, "cannot be read as ViTForImageClassification"),
    ("hf:{other_weights}", {}, InvalidOptionError, "do not fit its config.json's ViTForImage"),
    ("hf:{deeper_weights}", {}, InvalidOptionError, "model.safetensors do not fit its config"),
    ("hf:{deeper_weights}", {}, InvalidOptionError, "16 unexpected (vit.layers.2.attention"),
    ("hf:{garbage_bin}", {}, InvalidOptionError, "pytorch_model.bin is not a torch checkpoint"),
    ("hf:{processor_list}", {}, InvalidOptionError, "holds a JSON list, not an object"),
    ("hf:{processor_mean_text}", {}, InvalidOptionError, "image_mean='abc'; accepted: a list"),
    ("hf:{processor_mean_two}", {}, InvalidOptionError, "image_mean=[0.5, 0.5]; accepted"),
    ("hf:{processor_std_zero}", {}, InvalidOptionError, "3 finite positive numbers"),
    ("hf:{processor_size}", {}, InvalidOptionError, "size={'height': '224'}; accepted: an int"),
    ("hf:{processor_resample}", {}, InvalidOptionError, "resample=9; accepted: a PIL resampling"),
    ("hf:{processor_normalize}", {}, InvalidOptionError, "do_normalize='no'; accepted: true or"),
    ("hf:{patch_0}", {}, InvalidOptionError, "the config in"),
    ("hf:{patch_0}", {"pretrained": False}, InvalidOptionError, "ZeroDivisionError integer div"),
    ("hf:{hidden_text}", {}, InvalidOptionError, "transformers cannot read"),
    ("hf:{bert}", {}, UnsupportedModelError, "names BertModel (model_type 'bert'), not a vision"),
    ("hf:{convnext}", {}, UnsupportedModelError, "names ConvNextForImageClassification"),
    ("hf:{convnext}", {"pretrained": False}, UnsupportedModelError, "supported: ViTModel"),
    ("hf:", {}, InvalidOptionError, "names no folder; accepted: hf:PATH"),
    ("open_clip:", {}, InvalidOptionError, "names no architecture; accepted: open_clip:ARCH"),
    ("hf:{root}/missing", {}, MissingFileError, "missing not found; accepted: hf:PATH"),
    ("hf:{root}/garbage.pt", {}, InvalidOptionError, "garbage.pt is a file; accepted: hf:PATH"),
    ("hf:{good}", {"checkpoint": "{root}/garbage.pt"}, InvalidOptionError, "one of the two"),
    ("facebook/dinov2-small", {}, InvalidOptionError, "give its folder as hf:PATH"),
    ("{good}", {}, InvalidOptionError, "is a transformers folder; accepted: hf:"),
    ("vit_smal_patch16_224", {}, InvalidOptionError, "did you mean vit_small_patch16_224"),
    ("deit_small_patch16_224.nope", {}, InvalidOptionError, "TAG one of ['fb_in1k']"),
    (
        "vit_tiny_patch16_224",
        {"pretrained": False, "global_pool": "bogus"},
        InvalidOptionError,
        "the options {'global_pool': 'bogus'}: AssertionError Only avg",
    ),
    (
        "vit_tiny_patch16_224",
        {"pretrained": False, "embed_dim": 7},
        InvalidOptionError,
        "{'embed_dim': 7}: AssertionError dim should be divisible by num_heads; accepted: values",
    ),
    (
        "vit_tiny_patch16_224",
        {"pretrained": False, "in_chans": 0},
        InvalidOptionError,
        "in_chans=0 is not accepted; accepted: an int >= 1",
    ),
    ("test_vit", {"checkpoint": "{root}/garbage.pt"}, InvalidOptionError, "not a torch checkp"),
    ("test_vit", {"checkpoint": "{root}/other_model.pt"}, InvalidOptionError, "1 unexpected (foo)"),
    ("test_vit", {"checkpoint": "{root}/garbage.safetensors"}, InvalidOptionError, "safetensors"),
]


@pytest.mark.parametrize(
    "name,kwargs,error,message", API_CASES, ids=[f"{c[0]}-{c[3][:20]}" for c in API_CASES]
)
def test_a_loading_failure_is_one_line_naming_the_cause(folders, name, kwargs, error, message):
    paths = {k: str(v) for k, v in folders.items()}
    kwargs = {k: v.format(**paths) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(error) as caught:
        models.load(name.format(**paths), **kwargs)
    text = str(caught.value)
    assert message in text and "\n" not in text, text
    assert "hub is not reachable" not in text  # the name is at fault, not the network
    assert "weights_only" not in text  # torch's advice on untrusted pickles does not apply


def test_a_preprocessor_config_sets_the_normalisation(folders, tmp_path):
    """One number is every channel's; do_normalize false feeds [0, 1] pixels; resample 2 is
    bilinear."""
    folder = Path(shutil.copytree(folders["good"], tmp_path / "processor"))
    processor = {"image_mean": 0.5, "image_std": [0.25, 0.5, 1], "resample": 2}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    config = models.load(f"hf:{folder}").pretrained_cfg
    assert (config["mean"], config["std"]) == ((0.5,) * 3, (0.25, 0.5, 1.0))
    assert config["interpolation"] == "bilinear"
    processor["do_normalize"] = False
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    config = models.load(f"hf:{folder}").pretrained_cfg
    assert (config["mean"], config["std"]) == ((0.0,) * 3, (1.0,) * 3)


OPEN_CLIP_CASES = [
    ("RN50", {"pretrained": False}, UnsupportedModelError, "image tower is ModifiedResNet"),
    ("convnext_tiny", {}, UnsupportedModelError, "TimmModel (timm convnext_tiny)"),
    ("ViT-Q-99", {"pretrained": False}, InvalidOptionError, "not an open_clip architecture"),
    ("ViT-S-32", {}, MissingFileError, "needs its weights as a local file"),
    ("ViT-S-32", {"checkpoint": "{root}/garbage.pt"}, InvalidOptionError, "not a torch checkp"),
    ("ViT-S-32", {"checkpoint": "{root}/garbage.safetensors"}, InvalidOptionError, "safetens"),
    ("ViT-S-32", {"checkpoint": "{root}/other_model.pt"}, InvalidOptionError, "does not fit"),
    ("ViT-S-32", {"checkpoint": "{root}/missing.pt"}, MissingFileError, "checkpoint not found"),
]


@pytest.mark.parametrize(
    "arch,kwargs,error,message", OPEN_CLIP_CASES, ids=[c[3][:24] for c in OPEN_CLIP_CASES]
)
def test_an_open_clip_failure_is_one_line(folders, arch, kwargs, error, message):
    pytest.importorskip("open_clip", reason="tokenreduce[openclip] not installed")
    kwargs = {
        k: v.format(root=folders["root"]) if isinstance(v, str) else v for k, v in kwargs.items()
    }
    with pytest.raises(error) as caught:
        models.load(f"open_clip:{arch}", **kwargs)
    text = str(caught.value)
    assert message in text and "\n" not in text, text


def test_cli_refuses_a_mismatched_folder_in_one_line_without_the_load_report(folders):
    """transformers' load report (a table of every key) and its traceback stay out of it."""
    result = run_cli("bench", "-m", f"hf:{folders['other_weights']}", "--weights", "pretrained")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "LOAD REPORT" not in result.stderr
    (line,) = [entry for entry in result.stderr.splitlines() if "error:" in entry]
    assert "keys: " in line and "of another shape" in line, line


@pytest.mark.parametrize(
    "folder",
    ["bert", "convnext", "bad_json", "no_weights", "garbage_bin", "deeper_weights"]
    + ["processor_list", "processor_mean_text"],
)
def test_cli_exits_2_with_one_line(folders, folder, capsys):
    assert main(["eval", str(folders["root"]), "-m", f"hf:{folders[folder]}"]) == 2
    err = capsys.readouterr().err
    assert len([entry for entry in err.splitlines() if "error:" in entry]) == 1, err
    assert "Traceback" not in err and str(folders[folder]) in err


def loaded(argv: list[str]) -> torch.nn.Module:
    return shared.load_model(build_parser().parse_args(argv))


def test_weights_auto_uses_a_folders_own_weights(folders):
    """bench falls back to random weights, but not where the folder has its own (--weights auto,
    the default); --weights random still gives random ones, and eval needs real weights."""
    saved = transformers.ViTForImageClassification.from_pretrained(folders["good"]).state_dict()
    same = lambda model: all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())  # noqa: E731
    assert models.own_weights(f"hf:{folders['good']}", None)
    assert not models.own_weights(f"hf:{folders['no_weights']}", None)
    assert same(loaded(["bench", "-m", f"hf:{folders['good']}"]))
    assert same(loaded(["eval", "x", "-m", f"hf:{folders['good']}"]))
    assert not same(loaded(["bench", "-m", f"hf:{folders['good']}", "--weights", "random"]))
    loaded(["bench", "-m", f"hf:{folders['no_weights']}"])  # random from its config.json
    with pytest.raises(MissingFileError, match="no weights in"):
        loaded(["eval", "x", "-m", f"hf:{folders['no_weights']}"])


def test_weights_auto_uses_an_open_clip_checkpoint(tmp_path):
    open_clip = pytest.importorskip("open_clip", reason="tokenreduce[openclip] not installed")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32", pretrained=None)
    path = tmp_path / "vit_s_32.pt"
    torch.save(model.state_dict(), path)
    tower = loaded(["bench", "-m", "open_clip:ViT-S-32", "--checkpoint", str(path)])
    assert all(torch.equal(v, tower.state_dict()[k]) for k, v in model.visual.state_dict().items())
    loaded(["bench", "-m", "open_clip:ViT-S-32"])  # random: bench needs no real weights
    with pytest.raises(MissingFileError, match="needs its weights as a local file"):
        loaded(["eval", "x", "-m", "open_clip:ViT-S-32"])


def test_every_loading_error_is_a_user_error():
    for error in (InvalidOptionError, MissingFileError, UnsupportedModelError):
        assert issubclass(error, TokenReduceError)
