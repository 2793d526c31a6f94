"""The stand-in family's adapter; importing this module is what the registry defers."""

from torch import nn

from tests.adapters.lazyfamily import LazyViT
from tokenreduce.patch.timm import TimmAdapter


class LazyViTAdapter(TimmAdapter):
    SUPPORTED = "LazyViT (test family)"

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return isinstance(model, LazyViT)
