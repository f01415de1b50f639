"""Image plumbing for the image tasks: decoding, and transforms as plain tensor ops.

No torchvision: PyPI's torchvision does not match this torch build, and the
transforms the paper uses (resize, random crop, horizontal flip, normalise) are a
handful of tensor ops. Images are kept as uint8 at their native size and turned
into model inputs one batch at a time, so 50k CIFAR images cost 150 MB, not the
30 GB they would take as 224x224 floats.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedlora.model.backbone import MissingResource

PIL_HINT = "pip install pillow"


def pil_image():
    """PIL's Image module, or a MissingResource saying how to install it."""
    try:
        from PIL import Image
    except ModuleNotFoundError:
        raise MissingResource(f"package 'pillow' is not installed (image decoding needs it); "
                              f"install it with: {PIL_HINT}") from None
    return Image


def decode(src: bytes | str | Path, size: int | None = None) -> np.ndarray:
    """A PNG/JPEG (bytes or file) as uint8 RGB (3, H, W), resized to size x size if given."""
    image = pil_image()
    data = io.BytesIO(src) if isinstance(src, bytes | bytearray | memoryview) else src
    try:
        with image.open(data) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except (OSError, ValueError) as e:
        where = src if isinstance(src, str | Path) else "image bytes"
        raise ValueError(f"cannot decode {where}: {e}") from None


def stack(images: list[np.ndarray], size: int) -> torch.Tensor:
    """(N, C, H, W) uint8. Mixed sizes are resized to size x size; uniform ones stay native."""
    if not images:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    shapes = {im.shape for im in images}
    if len(shapes) == 1:
        return torch.from_numpy(np.stack(images))
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for i, im in enumerate(images):
        out[i] = resize(torch.from_numpy(im)[None].float(), size)[0].round().clamp(0, 255)
    return out


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of float (B, C, H, W) to size x size; antialiased when shrinking."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=h > size or w > size)


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator | None) -> torch.Tensor:
    """Zero-pad each side by `pad` and crop back to the input size at a random offset
    per example (torchvision's RandomCrop(size, padding=pad)), as one gather."""
    if pad <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    rows = oy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = ox[:, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def random_flip(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Mirror each example left-right with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@dataclass(frozen=True)
class Preprocess:
    """uint8 images -> normalised float model inputs of size x size.

    Training adds the paper's "standard augmentations": a pad-and-crop at the
    image's native resolution (pad = `pad_frac` of the side, 4 px for CIFAR's 32)
    and, where the classes allow it, a horizontal flip. Evaluation only resizes.
    Randomness comes from `generator`, or torch's default generator, which the
    engine seeds per (seed, round, client) before local training.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    flip: bool = True
    pad_frac: float = 0.125

    def __call__(self, images: torch.Tensor, train: bool,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.float().div_(255.0)
        if x.shape[1] == 1:  # grayscale: the pretrained stem expects three channels
            x = x.expand(-1, 3, -1, -1)
        if train:
            x = random_crop(x, round(self.pad_frac * min(x.shape[-2:])), generator)
            if self.flip:
                x = random_flip(x, generator)
        x = resize(x, self.size)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype)[None, :, None, None]
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype)[None, :, None, None]
        # channels_last: oneDNN's convolutions run Lite0 ~1.3x faster on a CPU in this
        # layout (the crop's gather already produced it); ViT is indifferent.
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)
