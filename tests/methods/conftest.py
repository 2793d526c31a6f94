"""The fixture DeiT-Tiny (random weights, float64) and its images, on which the official codes'
outputs were recorded; a test module that needs another model defines its own."""

from __future__ import annotations

import pytest
import timm
from safetensors.torch import load_file

from tests.conftest import FIXTURES, require_shared


@pytest.fixture(scope="module")
def fixture_model():
    weights = require_shared(FIXTURES / "deit_tiny_random.safetensors")
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    model.load_state_dict(load_file(weights))
    return model.double().eval()


@pytest.fixture(scope="module")
def images():
    return load_file(require_shared(FIXTURES / "images.safetensors"))["x"].double()
