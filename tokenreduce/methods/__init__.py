"""Token-reduction methods: one module per method, registered by name."""

from tokenreduce.methods.asvit import ASViTConfig, ASViTRecord
from tokenreduce.methods.ats import ATSConfig, ATSRecord
from tokenreduce.methods.base import BlockRecord, MethodConfig, make_config, method_names
from tokenreduce.methods.bat import BATConfig
from tokenreduce.methods.diffrate import DiffRateConfig
from tokenreduce.methods.evit import EViTConfig
from tokenreduce.methods.gtp import GTPConfig, GTPRecord
from tokenreduce.methods.learned import LearnedRecord
from tokenreduce.methods.ltmp import LTMPConfig, LTMPRecord
from tokenreduce.methods.mctf import MCTFConfig
from tokenreduce.methods.pitome import PiToMeConfig
from tokenreduce.methods.ppt import PPTConfig, PPTRecord
from tokenreduce.methods.tofu import ToFuConfig
from tokenreduce.methods.tome import ToMeConfig
from tokenreduce.methods.topk import TopKConfig

__all__ = [
    "ASViTConfig",
    "ASViTRecord",
    "ATSConfig",
    "ATSRecord",
    "BATConfig",
    "BlockRecord",
    "DiffRateConfig",
    "EViTConfig",
    "GTPConfig",
    "GTPRecord",
    "LTMPConfig",
    "LTMPRecord",
    "LearnedRecord",
    "MCTFConfig",
    "MethodConfig",
    "PPTConfig",
    "PiToMeConfig",
    "PPTRecord",
    "ToFuConfig",
    "ToMeConfig",
    "TopKConfig",
    "make_config",
    "method_names",
]
