"""The command line and `models.load` on Hugging Face transformers and open_clip models:
`-m hf:PATH`, `-m open_clip:ARCH` (random weights and small configs, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tokenreduce
from tests.conftest import make_image_folder, run_cli
from tokenreduce import models
from tokenreduce.errors import InvalidOptionError, MissingFileError
from tokenreduce.methods.learned import ThresholdParameters

transformers = pytest.importorskip("transformers", reason="tokenreduce[hf] not installed")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small ViTForImageClassification (3 classes, 32 px) saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("hf_vit")
    config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2})
    )
    return folder


def test_load_a_transformers_folder(hf_dir):
    model = models.load(f"hf:{hf_dir}")
    assert type(model).__name__ == "ViTForImageClassification"
    assert model.config._attn_implementation == "sdpa"
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert model.pretrained_cfg["interpolation"] == "bilinear"
    reloaded = transformers.ViTForImageClassification.from_pretrained(hf_dir)
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(MissingFileError, match="missing not found; accepted: hf:PATH"):
        models.load(f"hf:{hf_dir / 'missing'}")
    with pytest.raises(InvalidOptionError, match=r"options \['num_classes'\] apply to timm"):
        models.load(f"hf:{hf_dir}", num_classes=5)


def test_cli_bench_eval_viz_on_a_transformers_model(hf_dir, tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2, classes=("class0", "class1", "class2"))
    bench = run_cli(
        "bench", "-m", f"hf:{hf_dir}", "--weights", "pretrained", "-b", "1", "2",
        "--method", "tome:r=2", "--method", "evit:keep_rate=0.5",
        "--num-warm-iter", "0", "--num-bench-iter", "1",
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr
    assert "tome" in bench.stdout and "evit" in bench.stdout
    out = tmp_path / "eval.json"
    evaluated = run_cli(
        "eval", str(data), "-m", f"hf:{hf_dir}", "--method", "tome:r=2", "-j", "0",
        "--no-progress", "--results-file", str(out),
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    (row,) = json.loads(out.read_text())
    assert row["method"] == "tome" and 0 < row["gmacs_ratio"] < 1
    image = next((data / "class0").iterdir())
    viz = run_cli(
        "viz", "-m", f"hf:{hf_dir}", "--method", "tome:r=2", "--image", str(image),
        "--out", str(tmp_path / "maps.png"),
    )  # fmt: skip
    assert viz.returncode == 0, viz.stderr
    assert (tmp_path / "maps.png").is_file()
    demo = run_cli(
        "demo", "-m", f"hf:{hf_dir}", "--quick", "--images", str(image), "--out-dir",
        str(tmp_path / "demo"),
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr
    assert (tmp_path / "demo" / "demo_results.csv").is_file()


def test_open_clip_tower_loads_and_benches():
    pytest.importorskip("open_clip", reason="tokenreduce[openclip] not installed")
    with pytest.raises(MissingFileError, match="needs its weights as a local file"):
        models.load("open_clip:ViT-B-32")
    with pytest.raises(InvalidOptionError, match="not an open_clip architecture"):
        models.load("open_clip:ViT-Q-99", pretrained=False)
    tower = models.load("open_clip:ViT-B-32", pretrained=False)
    tokenreduce.apply(tower, "tome", r=4)
    with torch.no_grad():
        embedding = tower(torch.randn(1, 3, 224, 224))
    assert embedding.shape == (1, 512)
    # 50 tokens lose 4 per block for 11 blocks (6 left), then the 2 that bipartite matching allows
    assert tokenreduce.last_info(tower).tokens_per_block[0, -1] == 4
    result = run_cli(
        "bench", "-m", "open_clip:ViT-B-32", "--weights", "random", "-b", "1",
        "--method", "tome:r=4", "--num-warm-iter", "0", "--num-bench-iter", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    refused = run_cli("bench", "-m", "open_clip:ViT-B-32", "--weights", "pretrained", "-b", "1")
    assert refused.returncode == 2 and "needs its weights as a local file" in refused.stderr


def test_open_clip_checkpoint_file(tmp_path):
    open_clip = pytest.importorskip("open_clip", reason="tokenreduce[openclip] not installed")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    path = tmp_path / "vit_b_32.pt"
    torch.save(model.state_dict(), path)
    tower = models.load("open_clip:ViT-B-32", checkpoint=path)
    assert all(torch.equal(v, tower.state_dict()[k]) for k, v in model.visual.state_dict().items())


def test_open_clip_tower_zero_shot_eval(tmp_path):
    """eval on an open_clip tower classifies zero-shot: the class names' prompt embeddings from
    the same model's text tower."""
    open_clip = pytest.importorskip("open_clip", reason="tokenreduce[openclip] not installed")
    classes = ["ankle_boot", "bag"]
    torch.manual_seed(0)
    weights = models.open_clip_zero_shot("ViT-B-32", None, False, classes)
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a photo of a ankle boot.", "a photo of a bag."])
    with torch.no_grad():
        text = torch.nn.functional.normalize(clip.encode_text(tokens), dim=-1)
    assert torch.equal(weights, text * clip.logit_scale.exp())
    tower = clip.visual
    tower.tokenreduce_zero_shot = weights
    images = torch.randn(2, 3, 224, 224)
    adapter = tokenreduce.patch.adapter_for(tower)
    with torch.no_grad():
        logits = adapter.logits(tower, images)
        embedding = torch.nn.functional.normalize(tower(images), dim=-1)
    assert adapter.num_classes(tower) == 2
    assert torch.equal(logits, embedding @ weights.T)
    data = make_image_folder(tmp_path / "data", per_class=2, classes=classes)
    out = tmp_path / "eval.json"
    result = run_cli(
        "eval", str(data), "-m", "open_clip:ViT-B-32", "--weights", "random", "--method",
        "tome:r=4", "-j", "0", "--no-progress", "--results-file", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(out.read_text())
    assert row["method"] == "tome" and row["gmacs_ratio"] < 1


def test_thresholds_train_through_a_transformers_classifier(hf_dir):
    """A wrapper (ViTForImageClassification) runs its base model's blocks: the thresholds the
    training forward reads are the ones set as trainable, so the logits carry their gradient."""
    model = models.load(f"hf:{hf_dir}").float()
    tokenreduce.apply(model, "ltmp", tau=1.0)
    engine = tokenreduce.patch.attached_engine(model)
    layers = len(engine.config.reduce_layers(engine.dims))
    parameters = ThresholdParameters(
        {"merge_thresholds": [0.5] * layers, "prune_thresholds": [0.01] * layers}
    )
    engine.set_trainable(model, parameters)
    assert {id(p) for p in parameters.parameters()} <= {id(p) for p in model.parameters()}
    model.train()
    logits = tokenreduce.patch.adapter_for(model).logits(model, torch.randn(2, 3, 32, 32))
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters.parameters())
    tokenreduce.remove(model)
    assert not any("tokenreduce" in name for name, _ in model.named_modules())


@pytest.mark.parametrize(
    "model", ["hf", "open_clip"], ids=["transformers-classifier", "open_clip-tower"]
)
def test_cli_train_then_eval_on_a_foreign_model(model, hf_dir, tmp_path):
    """`tokenreduce train` learns LTMP thresholds on a transformers classifier and on an
    open_clip tower (zero-shot logits), and `eval` applies the file it wrote."""
    if model == "open_clip":
        pytest.importorskip("open_clip", reason="tokenreduce[openclip] not installed")
        spec = ["-m", "open_clip:ViT-B-32", "--weights", "random"]
        classes = ["ankle_boot", "bag"]
    else:
        spec = ["-m", f"hf:{hf_dir}", "--weights", "pretrained"]
        classes = ["class0", "class1", "class2"]
    data = make_image_folder(tmp_path / "data", per_class=2, classes=classes)
    out = tmp_path / "ltmp.safetensors"
    trained = run_cli(
        "train", str(data), *spec, "--method", "ltmp:tau=1.0", "--target", "0.6", "-b", "3",
        "-j", "0", "--lr", "prune_thresholds=0.5", "--no-progress", "--out", str(out),
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    log = json.loads(Path(f"{out}.json").read_text())
    assert len(log["history"]) == 2 and log["gmacs_ratio"] < 1  # the thresholds moved
    results = tmp_path / "eval.json"
    evaluated = run_cli(
        "eval", str(data), *spec, "--method", f"ltmp:thresholds={out}", "-j", "0",
        "--no-progress", "--results-file", str(results),
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    (row,) = json.loads(results.read_text())
    assert row["method"] == "ltmp" and row["gmacs_ratio"] == pytest.approx(
        log["gmacs_ratio"], abs=1e-4
    )


def test_a_classifier_of_the_wrong_size_is_explained_per_family(hf_dir, tmp_path):
    """A transformers classifier or an open_clip tower is not pointed to --head / --num-classes,
    which apply to timm models only."""
    from tokenreduce.data import ImageFolder, eval_transform
    from tokenreduce.evaluate import evaluate

    folder = make_image_folder(tmp_path / "data", classes=("a", "b", "c", "d"), per_class=1)
    model = models.load(f"hf:{hf_dir}")
    dataset = ImageFolder(folder, eval_transform(model)[0])
    with pytest.raises(InvalidOptionError, match=r"4 classes.*predicts 3; accepted: a folder"):
        evaluate(model, [], dataset, "hf")
    pytest.importorskip("open_clip", reason="tokenreduce[openclip] not installed")
    tower = models.load("open_clip:ViT-B-32", pretrained=False)
    with pytest.raises(InvalidOptionError, match="no classifier.*set_zero_shot_weights"):
        evaluate(tower, [], ImageFolder(folder, eval_transform(tower)[0]), "open_clip")
