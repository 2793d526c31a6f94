"""The worked examples of docs/architecture.md run as written and do what the guide says they do,
so that the guide cannot drift from the code. Each example (a ```python block after an
`<!-- example: NAME -->` line) runs in its own process: the method and the adapter it registers
stay out of the other tests' registries."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "architecture.md"


def example(name: str) -> str:
    """The code of the guide's example `name`."""
    pattern = rf"<!-- example: {name} -->\n```python\n(.*?)```"
    found = re.findall(pattern, GUIDE.read_text(), flags=re.DOTALL)
    assert len(found) == 1, f"docs/architecture.md has {len(found)} examples named {name!r}"
    return found[0]


def check_claims(*claims: str) -> None:
    """The guide states each claim (whitespace-normalised) that the example's check verifies."""
    text = " ".join(GUIDE.read_text().split())
    for claim in claims:
        assert claim in text, f"docs/architecture.md no longer says {claim!r}"


def run(code: str, tmp_path: Path) -> None:
    script = tmp_path / "check.py"
    script.write_text(code)
    path = os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_the_method_example_keeps_what_the_guide_says(tmp_path):
    check_claims(
        "197 -> 139 / 98 / 69 tokens",
        "keeps 139 / 98 / 69 tokens after blocks 3 / 6 / 9 and costs 2.997 GMACs (dense 4.599)",
        "finds keep_rate 0.6984 (2.985 GMACs, 0.649 of dense",
        "runs unchanged on a rotary Eva model (`eva02_tiny_patch14_224`)",
    )
    setup = textwrap.dedent(
        """
        import timm
        import tokenreduce
        from tokenreduce import calibrate

        torch.manual_seed(0)
        model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
        images = torch.randn(1, 3, 224, 224)
        """
    )
    checks = textwrap.dedent(
        """
        assert matched.config.keep_rate == 0.6984, matched
        assert (round(matched.gmacs, 3), round(matched.ratio, 3)) == (2.985, 0.649), matched
        assert tokenreduce.patch.attached_engine(model).config == matched.config

        tokenreduce.apply(model, "normprune", keep_rate=0.7)
        with torch.no_grad():
            model(torch.randn(2, 3, 224, 224))
        info = tokenreduce.last_info(model)
        counts = info.tokens_per_block[0].tolist()
        assert [counts[3], counts[6], counts[9]] == [139, 98, 69], counts
        gmacs = tokenreduce.flops.gmacs(model, info).mean
        assert round(gmacs, 3) == 2.997, gmacs
        assert round(tokenreduce.flops.dense_gmacs(model), 3) == 4.599

        eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56).eval()
        tokenreduce.apply(eva, "normprune", keep_rate=0.5)
        with torch.no_grad():
            eva(torch.randn(2, 3, 56, 56))
        counts = tokenreduce.last_info(eva).tokens_per_block[0].tolist()
        assert counts[-1] < counts[0], counts  # the rotary model reduces and runs
        """
    )
    run(example("method") + setup + example("method-use") + checks, tmp_path)


MYLIB = '''
"""A hypothetical ViT family with the attributes docs/architecture.md lists."""
import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fused_attn = True
        self.scale = (dim // num_heads) ** -0.5
        self.attn_drop = nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, img_size=64, patch=8, dim=64, depth=4, num_heads=4, num_classes=10):
        super().__init__()
        self.embed_dim = dim
        self.img_size = (img_size, img_size)
        self.grid_size = (img_size // patch, img_size // patch)
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        tokens = 1 + self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def embed(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed

    def forward_features(self, images):
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x, pre_logits=False):
        return x[:, 0] if pre_logits else self.head(x[:, 0])

    def forward(self, images):
        return self.forward_head(self.forward_features(images))
'''


def test_the_adapter_example_runs_every_method_on_its_family(tmp_path):
    check_claims("GMACs are within 0.3% of `FlopCounterMode`")
    (tmp_path / "mylib.py").write_text(MYLIB)
    checks = textwrap.dedent(
        """
        import copy
        import io

        import tokenreduce
        from mylib import ViT
        from tests.adapters.test_flops import counted_gmacs

        torch.manual_seed(0)
        model = ViT().double().eval()
        images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
        assert tokenreduce.describe(model).family == "mylib"
        nothing = [("tome", {"r": 0}), ("evit", {"keep_rate": 1.0}), ("topk", {"keep_rate": 1.0}),
                   ("ppt", {"r": 0})]
        for fused in (True, False):
            for block in model.blocks:
                block.attn.fused_attn = fused
            with torch.no_grad():
                dense = model(images)
                for method, options in nothing:
                    tokenreduce.apply(model, method, **options)
                    assert torch.equal(model(images), dense), (method, fused)
                    tokenreduce.remove(model)
                    assert type(model) is ViT and torch.equal(model(images), dense), method
        for method in tokenreduce.methods():
            tokenreduce.apply(model, method)
            with torch.no_grad():
                assert torch.isfinite(model(images)).all(), method
        tokenreduce.apply(model, "ltmp", merge_thresholds=0.9, prune_thresholds=0.05)
        with torch.no_grad():
            batched = model(images)
            alone = torch.cat([model(images[i : i + 1]) for i in range(len(images))])
        torch.testing.assert_close(batched, alone, rtol=1e-9, atol=1e-9)
        tokenreduce.remove(model)
        with torch.no_grad():  # grid_features: every original token, unreduced or reduced
            features = model.forward_features(images)
            tokenreduce.apply(model, "tome", r=0)
            assert torch.equal(tokenreduce.patch_features(model, images), features)
            tokenreduce.apply(model, "tome", r=4)
            assert tokenreduce.patch_features(model, images).shape == features.shape
            reduced = model(images)
            buffer = io.BytesIO()
            torch.save(model, buffer)
            buffer.seek(0)
            for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
                assert torch.equal(clone(images), reduced)
        for block in model.blocks:
            block.attn.fused_attn = False
        model = model.float()
        x = images[:1].float()
        counted = counted_gmacs(model, x)
        analytic = tokenreduce.flops.gmacs(model, tokenreduce.last_info(model)).mean_total
        assert abs(counted - analytic) / analytic < 0.003, (counted, analytic)
        """
    )
    run(example("adapter") + checks, tmp_path)
