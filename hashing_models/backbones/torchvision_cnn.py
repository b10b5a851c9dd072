"""torchvision CNN backbones: ResNet-18/50 (pooled features) and AlexNet/VGG-16 (fc7 features, as the hashing literature uses)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn

from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, InputConfig
from .base import Backbone
from .weights import Pretrained, download_state_dict, load_into, read_state_dict

# backbone name → (torchvision builder, weights enum used for pretrained=True)
_ARCHS: dict[str, tuple[Callable[..., nn.Module], torchvision.models.WeightsEnum]] = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V2),
    "alexnet": (torchvision.models.alexnet, torchvision.models.AlexNet_Weights.IMAGENET1K_V1),
    "vgg16": (torchvision.models.vgg16, torchvision.models.VGG16_Weights.IMAGENET1K_V1),
}


def build_torchvision(name: str, pretrained: Pretrained) -> nn.Module:
    """The full torchvision ImageNet model ``name`` with weights per ``pretrained`` (True: download, path: local file)."""
    builder, weights = _ARCHS[name]
    model = builder(weights=None)
    if pretrained is True:
        state = download_state_dict(name, lambda: weights.get_state_dict(progress=False))
        load_into(model, state, f"torchvision {weights}")
    elif pretrained:
        load_into(model, read_state_dict(pretrained), str(pretrained))
    return model


def _imagenet_config(img_size: int) -> InputConfig:
    return InputConfig(size=img_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")


# Output channels of layer2, layer3, layer4 (BasicBlock ResNet-18 vs Bottleneck ResNet-50, expansion 4).
_RESNET_STAGE_CHANNELS = {"resnet18": (128, 256, 512), "resnet50": (512, 1024, 2048)}


class ResNetBackbone(Backbone):
    """ResNet-18/50: (B, 3, S, S) → (B, 512 or 2048); stages layer2 (/8), layer3 (/16), layer4 (/32)."""

    def __init__(self, name: str, pretrained: Pretrained = False, img_size: int = 224) -> None:
        super().__init__()
        net = build_torchvision(name, pretrained)
        self.name = name
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.layer2, self.layer3, self.layer4 = net.layer2, net.layer3, net.layer4
        self.stage_channels = _RESNET_STAGE_CHANNELS[name]
        self.num_features = self.stage_channels[-1]
        self.input_config = _imagenet_config(img_size)

    def forward_stages(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c3 = self.layer2(self.stem(images))  # (B, C2, S/8, S/8)
        c4 = self.layer3(c3)  # (B, C3, S/16, S/16)
        c5 = self.layer4(c4)  # (B, C4, S/32, S/32)
        return c3, c4, c5

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(images)[-1].mean(dim=(2, 3))  # global average pool → (B, C4)


# Indices into torchvision's ``features`` Sequential where the last three stages end (after their ReLU,
# before the pooling that follows): AlexNet conv3/conv4/conv5, VGG-16 conv3_3/conv4_3/conv5_3.
_STAGE_ENDS = {"alexnet": (8, 10, 12), "vgg16": (16, 23, 30)}


class FC7Backbone(Backbone):
    """AlexNet / VGG-16: conv features → 6×6 pool → fc6 → fc7 (ReLU, dropout), (B, 3, S, S) → (B, 4096).

    AlexNet needs S ≥ 63, VGG-16 S ≥ 32.
    """

    num_features = 4096

    def __init__(self, name: str, pretrained: Pretrained = False, img_size: int = 224) -> None:
        super().__init__()
        net = build_torchvision(name, pretrained)
        self.name = name
        first, second, third = _STAGE_ENDS[name]
        self.stage0 = net.features[:first]
        self.stage1 = net.features[first:second]
        self.stage2 = net.features[second:third]
        self.rest = net.features[third:]  # the last max-pool
        self.avgpool = net.avgpool
        self.fc = net.classifier[:-1]  # drop the 1000-way layer; ends with fc7's ReLU → 4096
        self.stage_channels = tuple(
            [m for m in stage if isinstance(m, nn.Conv2d)][-1].out_channels
            for stage in (self.stage0, self.stage1, self.stage2)
        )
        self.input_config = _imagenet_config(img_size)

    def forward_stages(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s0 = self.stage0(images)
        s1 = self.stage1(s0)
        s2 = self.stage2(s1)
        return s0, s1, s2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.rest(self.forward_stages(images)[-1])
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, 4096)
