"""tokenreduce: token pruning and merging for pretrained Vision Transformers (timm, Hugging Face
transformers, open_clip)."""

import importlib
from typing import Any

from tokenreduce import flops
from tokenreduce.api import (
    apply,
    compile,
    describe,
    last_info,
    methods,
    patch_features,
    remove,
)
from tokenreduce.info import ReductionInfo
from tokenreduce.methods import (
    BATConfig,
    EViTConfig,
    MethodConfig,
    PPTConfig,
    ToMeConfig,
    TopKConfig,
)

__version__ = "0.1.0"

__all__ = [
    "BATConfig",
    "EViTConfig",
    "MethodConfig",
    "PPTConfig",
    "ReductionInfo",
    "ToMeConfig",
    "TopKConfig",
    "TuneTarget",
    "apply",
    "compile",
    "describe",
    "export",
    "flops",
    "last_info",
    "methods",
    "patch_features",
    "remove",
    "tune",
]

_WORKFLOWS = {
    "export": ("tokenreduce.exporting", "export"),
    "tune": ("tokenreduce.tuning", "tune"),
    "TuneTarget": ("tokenreduce.tuning", "Target"),
}
"""Workflows reachable as `tokenreduce.NAME`, imported on first use: they import the package's
measuring and export machinery, which must not load with `import tokenreduce`."""


def __getattr__(name: str) -> Any:
    if name not in _WORKFLOWS:
        raise AttributeError(f"module 'tokenreduce' has no attribute {name!r}")
    module, attribute = _WORKFLOWS[name]
    return getattr(importlib.import_module(module), attribute)
