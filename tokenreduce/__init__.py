"""tokenreduce: token pruning and merging for pretrained Vision Transformers (timm, Hugging Face
transformers, open_clip)."""

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
    "apply",
    "compile",
    "describe",
    "flops",
    "last_info",
    "methods",
    "patch_features",
    "remove",
]
