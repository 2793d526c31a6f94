"""Token-reduction methods: one module per method, registered by name."""

from tokenreduce.methods.asvit import ASViTConfig
from tokenreduce.methods.base import MethodConfig, make_config, method_names
from tokenreduce.methods.bat import BATConfig
from tokenreduce.methods.evit import EViTConfig
from tokenreduce.methods.ltmp import LTMPConfig
from tokenreduce.methods.ppt import PPTConfig
from tokenreduce.methods.tome import ToMeConfig
from tokenreduce.methods.topk import TopKConfig

__all__ = [
    "ASViTConfig",
    "LTMPConfig",
    "BATConfig",
    "EViTConfig",
    "MethodConfig",
    "PPTConfig",
    "ToMeConfig",
    "TopKConfig",
    "make_config",
    "method_names",
]
