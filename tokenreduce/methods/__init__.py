"""Token-reduction methods: one module per method, registered by name."""

from tokenreduce.methods.asvit import ASViTConfig, ASViTRecord
from tokenreduce.methods.base import BlockRecord, MethodConfig, make_config, method_names
from tokenreduce.methods.bat import BATConfig
from tokenreduce.methods.evit import EViTConfig
from tokenreduce.methods.learned import LearnedRecord
from tokenreduce.methods.ltmp import LTMPConfig, LTMPRecord
from tokenreduce.methods.mctf import MCTFConfig
from tokenreduce.methods.ppt import PPTConfig, PPTRecord
from tokenreduce.methods.tome import ToMeConfig
from tokenreduce.methods.topk import TopKConfig

__all__ = [
    "ASViTConfig",
    "ASViTRecord",
    "BATConfig",
    "BlockRecord",
    "EViTConfig",
    "LTMPConfig",
    "LTMPRecord",
    "LearnedRecord",
    "MCTFConfig",
    "MethodConfig",
    "PPTConfig",
    "PPTRecord",
    "ToMeConfig",
    "TopKConfig",
    "make_config",
    "method_names",
]
