"""A stand-in optional model family for the lazy adapter registry test: a timm ViT subclass
whose class lives in this package, served by a TimmAdapter subclass in `adapter.py`."""

from timm.models.vision_transformer import VisionTransformer


class LazyViT(VisionTransformer):
    pass
