"""Convnets built from the layers real models use: ReLU, BatchNorm, pooling, residual blocks.

R-GAP's CNN6 avoids all of them (LeakyReLU, no pooling, no normalisation) because layer-wise
inversion could not treat them. These variants exist so that the security metric, the bound and
the attacks can be compared across the operations that make up the rest of the zoo. Every one
keeps its layers in one flat `nn.Sequential` (a residual block is one entry of it).
"""

from __future__ import annotations

from torch import Tensor, nn

from models.base import InputSpec
from models.classifiers import CNN6_CONVS, SequentialClassifier, classifier_head, conv_output_size


class ResidualBlock(nn.Module):
    """He et al.'s basic block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)); the shortcut is a
    1x1 conv when the block changes width or stride, else the identity."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = nn.functional.relu(self.bn1(self.conv1(inputs)))
        return nn.functional.relu(self.bn2(self.conv2(hidden)) + self.shortcut(inputs))


def cnn6_relu(spec: InputSpec, head: str = "ce") -> SequentialClassifier:
    """CNN6 with ReLU instead of LeakyReLU (and a bias per conv): what most convnets use."""
    channels, height, width = spec.shape
    layers: list[nn.Module] = []
    for out_channels, kernel, stride, padding in CNN6_CONVS:
        layers += [nn.Conv2d(channels, out_channels, kernel, stride=stride, padding=padding), nn.ReLU()]
        channels = out_channels
        height = conv_output_size(height, kernel, stride, padding)
        width = conv_output_size(width, kernel, stride, padding)
    return _with_head(layers, channels * height * width, spec, head)


def _pooled_convnet(
    spec: InputSpec, pool: type[nn.Module], batch_norm: bool, name: str
) -> tuple[nn.Sequential, int]:
    """Two 3x3 convs (16 and 32 channels), each followed by [BatchNorm], ReLU and a 2x2 pool."""
    channels, height, width = spec.shape
    layers: list[nn.Module] = []
    for out_channels in (16, 32):
        layers.append(nn.Conv2d(channels, out_channels, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers += [nn.ReLU(), pool(2)]
        channels, height, width = out_channels, height // 2, width // 2
    return nn.Sequential(*layers), channels * height * width


def convnet_bn(spec: InputSpec, head: str = "ce") -> SequentialClassifier:
    """ReLU convnet with BatchNorm and average pooling (two conv blocks, a linear head)."""
    layers, features = _pooled_convnet(spec, nn.AvgPool2d, batch_norm=True, name="convnet-bn")
    return _with_head(list(layers), features, spec, head)


def convnet_maxpool(spec: InputSpec, head: str = "ce") -> SequentialClassifier:
    """ReLU convnet with max pooling (two conv blocks, a linear head): the server never learns
    which input won each pooling window."""
    layers, features = _pooled_convnet(spec, nn.MaxPool2d, batch_norm=False, name="convnet-maxpool")
    return _with_head(list(layers), features, spec, head)


def resnet_mini(spec: InputSpec, head: str = "ce") -> SequentialClassifier:
    """A small ResNet: a 16-channel stem, a 16-channel block and a 32-channel block of stride 2."""
    channels, height, width = spec.shape
    layers: list[nn.Module] = [
        nn.Conv2d(channels, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        ResidualBlock(16, 16),
        ResidualBlock(16, 32, stride=2),
    ]
    height, width = conv_output_size(height, 3, 2, 1), conv_output_size(width, 3, 2, 1)
    return _with_head(layers, 32 * height * width, spec, head)


def _with_head(layers: list[nn.Module], features: int, spec: InputSpec, head: str) -> SequentialClassifier:
    layers += [nn.Flatten(), classifier_head(features, spec, head)]
    return SequentialClassifier(nn.Sequential(*layers), spec, head)
