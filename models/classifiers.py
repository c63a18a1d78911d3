"""Plain classifiers: MLP, LeNet, and R-GAP's CNN6 / CNN6-d.

Every classifier keeps its layers in one flat `nn.Sequential` called `layers`, so layer-wise
attacks and the security metric can walk the network from the output back to the input.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from models.base import InputSpec, ZooModel

HEADS = ("ce", "logistic")


class SequentialClassifier(ZooModel):
    """A classifier that is exactly `self.layers` applied to the input.

    `head` "ce" ends in Linear(n, classes) with bias and trains with softmax cross-entropy;
    "logistic" is R-GAP's single bias-free logit, trained with BCE on the label's parity.
    """

    layers: nn.Sequential

    def __init__(self, layers: nn.Sequential, spec: InputSpec, head: str = "ce") -> None:
        _check_head(head)
        super().__init__(spec, layers)
        self.head = head

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layers(inputs)

    def targets(self, labels: Tensor) -> Tensor:
        # R-GAP's single-logit head is trained on (and leaks) the label's parity only.
        return labels % 2 if self.head == "logistic" else labels

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if self.head == "logistic":
            # Binary logistic loss on the parity target t in {0, 1} (see `targets`).
            return F.binary_cross_entropy_with_logits(outputs.squeeze(-1), targets.float())
        return super().loss(outputs, targets)


def _check_head(head: str) -> None:
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; use 'ce' (softmax, with bias) or 'logistic' (one logit)")


def classifier_head(in_features: int, spec: InputSpec, head: str) -> nn.Linear:
    _check_head(head)
    if head == "logistic":
        return nn.Linear(in_features, 1, bias=False)
    return nn.Linear(in_features, spec.num_classes, bias=True)


def mlp(spec: InputSpec, hidden: int = 128, depth: int = 2, head: str = "ce") -> SequentialClassifier:
    """Fully connected net with LeakyReLU (invertible, so layer-wise inversion applies); takes
    images (flattened) or feature vectors."""
    if hidden < 1 or depth < 0:
        raise ValueError(f"mlp needs hidden >= 1 and depth >= 0 (got hidden={hidden}, depth={depth})")
    layers: list[nn.Module] = [nn.Flatten()]
    width = spec.num_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
        width = hidden
    layers.append(classifier_head(width, spec, head))
    return SequentialClassifier(nn.Sequential(*layers), spec, head)


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def lenet(spec: InputSpec, activation: str = "sigmoid", head: str = "ce") -> SequentialClassifier:
    """DLG's LeNet: three 12-channel k5 convs (strides 2, 2, 1) with sigmoid, then a linear head.

    Sigmoid keeps the network twice differentiable, which optimisation attacks (DLG) rely on.
    """
    activations: dict[str, type[nn.Module]] = {
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "leakyrelu": nn.LeakyReLU,
    }
    if activation not in activations:
        raise ValueError(f"lenet activation {activation!r} is not one of {', '.join(activations)}")
    act = activations[activation]
    channels, height, width = spec.shape
    layers: list[nn.Module] = []
    for stride in (2, 2, 1):
        layers += [nn.Conv2d(channels, 12, kernel_size=5, stride=stride, padding=2), act()]
        channels = 12
        height = conv_output_size(height, 5, stride, 2)
        width = conv_output_size(width, 5, stride, 2)
    layers += [nn.Flatten(), classifier_head(12 * height * width, spec, head)]
    return SequentialClassifier(nn.Sequential(*layers), spec, head)


# (out_channels, kernel, stride, padding) for each conv of R-GAP's CNN6 (models/CNN6 in R-GAP).
CNN6_CONVS: tuple[tuple[int, int, int, int], ...] = (
    (12, 4, 2, 2),
    (36, 3, 2, 1),
    (36, 3, 1, 1),
    (36, 3, 1, 1),
    (64, 3, 2, 1),
    (128, 3, 1, 1),
)
# CNN6-d narrows the second conv to 20 channels, which makes that layer's system rank-deficient.
CNN6D_CONVS: tuple[tuple[int, int, int, int], ...] = ((12, 4, 2, 2), (20, 3, 2, 1), *CNN6_CONVS[2:])


def _bias_free_convnet(
    spec: InputSpec, convs: tuple[tuple[int, int, int, int], ...], head: str, name: str
) -> SequentialClassifier:
    channels, height, width = spec.shape
    layers: list[nn.Module] = []
    for out_channels, kernel, stride, padding in convs:
        layers += [
            nn.Conv2d(channels, out_channels, kernel, stride=stride, padding=padding, bias=False),
            nn.LeakyReLU(0.2),
        ]
        channels = out_channels
        height = conv_output_size(height, kernel, stride, padding)
        width = conv_output_size(width, kernel, stride, padding)
    layers += [nn.Flatten(), classifier_head(channels * height * width, spec, head)]
    return SequentialClassifier(nn.Sequential(*layers), spec, head)


def cnn6(spec: InputSpec, head: str = "ce") -> SequentialClassifier:
    """R-GAP's CNN6: six bias-free convs with LeakyReLU(0.2), then a linear head."""
    return _bias_free_convnet(spec, CNN6_CONVS, head, "cnn6")


def cnn6_d(spec: InputSpec, head: str = "ce") -> SequentialClassifier:
    """CNN6-d: CNN6 with the second conv 12→20 and the third 20→36."""
    return _bias_free_convnet(spec, CNN6D_CONVS, head, "cnn6-d")
