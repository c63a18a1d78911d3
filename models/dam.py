"""DAM: DiscriminAtive Masking (Bu, Daw, Maruf, Karpatne, NeurIPS 2021, arXiv 2110.00684).

Every hidden layer's output is multiplied by a gate (one `DamGate` per layer, after its ReLU):

    g_i = ReLU(tanh(α²(μ_i + β))),   μ_i = k·i/n  (i = 0 .. n−1, k = 5, fixed),

with one learned scalar β per layer (initialised to 1). The loss adds λ·mean_layers(max(β, −k)),
which pushes every β down; as β falls the units with the smallest μ (lowest index) reach g = 0
first, so the mask is nested and its width is n·(1 + β/k) for β in [−k, 0] (the L0 link of the
paper). At β ≤ −k every gate is 0 and the clamp stops the penalty's pull. β is frozen for the
first rounds ("cold start") so the network learns before it is thinned.

Federated: the order of the units is the same on every client, so the masks are nested across
clients and averaging β is coherent (the global width is that of the averaged β). Units are never
deleted on clients: the masked network trains and is averaged; `compact` removes the zero-gated
units once training is over, folding the surviving gates into the next layer's weights, so the
compact network computes exactly what the masked one does with no fine-tuning.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.base import InputSpec, TrainingSettings
from models.classifiers import SequentialClassifier, conv_output_size

DAM_K = 5.0  # k: μ spans [0, k), so β = −k closes the whole layer
BETA_INIT = 1.0  # the paper's β₀ for the tanh gate


class DamGate(nn.Module):
    """x ⊙ g over the unit axis (features of a vector, channels of an image), g as in the module doc.

    μ and α are fixed (buffers outside the state dict: the same on every client by construction);
    β is the layer's one learned scalar and travels with the weights like any parameter.
    """

    def __init__(self, units: int, alpha: float = 1.0, k: float = DAM_K) -> None:
        super().__init__()
        self.units, self.k = units, k
        self.beta = nn.Parameter(torch.full((1,), BETA_INIT))
        self.register_buffer("mu", k * torch.arange(units, dtype=torch.float32) / units, persistent=False)
        self.register_buffer("alpha", torch.tensor(float(alpha)), persistent=False)

    def gate(self) -> Tensor:
        """g, one value in [0, 1) per unit."""
        return F.relu(torch.tanh(self.alpha**2 * (self.mu + self.beta)))

    def forward(self, inputs: Tensor) -> Tensor:
        shape = (1, self.units) + (1,) * (inputs.dim() - 2)
        return inputs * self.gate().view(shape)

    def unit_scale(self) -> Tensor:
        """The per-unit factor this op applies (the server knows it: β travels with the weights);
        the layer-wise attack and the security metric pull back through it as a known scaling."""
        return self.gate().detach()

    def alive(self) -> Tensor:
        """Boolean mask of the units with g > 0 (those the compact network keeps)."""
        return self.gate().detach() > 0

    def width(self) -> int:
        return int(self.alive().sum())

    def penalty(self) -> Tensor:
        """max(β, −k): below −k the layer is closed and pulling β further would change nothing."""
        return torch.clamp(self.beta, min=-self.k).sum()


class DamNetwork(SequentialClassifier):
    """A classifier whose hidden layers are each followed by a DAM gate; λ is the penalty weight
    and `cold_rounds` the rounds during which β is frozen (on the global round clock)."""

    def __init__(self, layers: nn.Sequential, spec: InputSpec, lam: float, cold_rounds: int) -> None:
        super().__init__(layers, spec)
        self.lam, self.cold_rounds = lam, cold_rounds
        self.metric_names = ("accuracy", *(f"width_{i + 1}" for i in range(len(self.gates()))))

    def gates(self) -> list[DamGate]:
        return [m for m in self.layers if isinstance(m, DamGate)]

    def widths(self) -> list[int]:
        """Units with g > 0 per gated layer, input side first."""
        return [gate.width() for gate in self.gates()]

    def penalty(self) -> Tensor:
        """mean over layers of max(β, −k) (the paper's regulariser, before λ)."""
        gates = self.gates()
        return torch.stack([gate.penalty() for gate in gates]).mean()

    def training_loss(self, module: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        return self.loss(module(inputs), targets) + self.lam * self.penalty()

    def metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        # The widths are properties of the weights, not of the batch; reported with every
        # evaluation they land in metrics.csv as eval_width_<i>, one row per round.
        widths = {f"width_{i + 1}": float(w) for i, w in enumerate(self.widths())}
        return {**super().metrics(outputs, targets), **widths}

    def configure_optimizer(self, settings: TrainingSettings, server_round: int) -> torch.optim.Optimizer:
        """SGD over everything; β's group has learning rate 0 during the cold-start rounds."""
        betas = [gate.beta for gate in self.gates()]
        others = [p for p in self.trainable_parameters() if all(p is not beta for beta in betas)]
        cold = server_round <= self.cold_rounds
        return torch.optim.SGD(
            [
                {"params": others},
                {"params": betas, "lr": 0.0 if cold else settings.learning_rate},
            ],
            lr=settings.learning_rate,
            momentum=settings.momentum,
        )


def parse_widths(text: str, option: str) -> list[int]:
    """The widths an option lists, e.g. "256-256" ('-' joins them: ',' already separates the
    model options); ValueError naming the fix."""
    try:
        widths = [int(part) for part in text.split("-")]
    except ValueError:
        widths = []
    if not widths or any(w < 1 for w in widths):
        raise ValueError(
            f"{option}={text!r} is not positive whole numbers joined by '-'; write e.g. {option}=256-256"
        )
    return widths


def _check_dam(lam: float, alpha: float, cold_rounds: int) -> None:
    if lam < 0:
        raise ValueError(f"lam must be >= 0 (got {lam}); 0 trains the same network without pruning")
    if alpha == 0:
        raise ValueError("alpha must not be 0 (every gate would be 0); use e.g. alpha=1")
    if cold_rounds < 0:
        raise ValueError(f"cold_rounds must be >= 0 (got {cold_rounds})")


def dam_mlp(
    spec: InputSpec,
    widths: str = "256-256",
    lam: float = 0.3,
    alpha: float = 1.0,
    cold_rounds: int = 1,
) -> DamNetwork:
    """MLP with a DAM gate after each hidden ReLU (the paper's MLP setting). `widths` are the
    hidden layers' widths before pruning, separated by '-'; `lam` the penalty weight λ."""
    _check_dam(lam, alpha, cold_rounds)
    layers: list[nn.Module] = [nn.Flatten()]
    width = spec.num_features
    for hidden in parse_widths(widths, "widths"):
        layers += [nn.Linear(width, hidden), nn.ReLU(), DamGate(hidden, alpha)]
        width = hidden
    layers.append(nn.Linear(width, spec.num_classes))
    return DamNetwork(nn.Sequential(*layers), spec, lam, cold_rounds)


def dam_cnn(
    spec: InputSpec,
    channels: str = "16-32",
    hidden: int = 128,
    lam: float = 0.3,
    alpha: float = 1.0,
    cold_rounds: int = 1,
) -> DamNetwork:
    """Small convnet: 3×3 convs (stride 2, padding 1) each with ReLU and a DAM gate over its
    channels, then a hidden Linear with ReLU and a gate, then the head. Strided convs instead of
    pooling keep every op one the layer-wise analysis can pull back."""
    _check_dam(lam, alpha, cold_rounds)
    if hidden < 1:
        raise ValueError(f"hidden must be >= 1 (got {hidden})")
    in_channels, height, width = spec.shape
    layers: list[nn.Module] = []
    for out_channels in parse_widths(channels, "channels"):
        layers += [nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1), nn.ReLU()]
        layers.append(DamGate(out_channels, alpha))
        in_channels = out_channels
        height, width = conv_output_size(height, 3, 2, 1), conv_output_size(width, 3, 2, 1)
    layers += [
        nn.Flatten(),
        nn.Linear(in_channels * height * width, hidden),
        nn.ReLU(),
        DamGate(hidden, alpha),
    ]
    layers.append(nn.Linear(hidden, spec.num_classes))
    return DamNetwork(nn.Sequential(*layers), spec, lam, cold_rounds)


# ---------------------------------------------------------------------------------------------
# The compact network
# ---------------------------------------------------------------------------------------------

_WEIGHTED = (nn.Linear, nn.Conv2d)


@torch.no_grad()
def compact(model: DamNetwork) -> SequentialClassifier:
    """The network with every zero-gated unit physically removed, as a plain classifier (no gates).

    For each gate: the rows (output channels) of the layer below that feed dead units are dropped,
    the surviving gate values are folded into the inputs (columns) of the next weighted layer, and
    the gate goes. The ops between a gate and the next layer (a Flatten here) commute with a
    per-unit scale, so the result equals the masked network's output up to float rounding. A layer
    with no unit left keeps none: the next layer then outputs its bias.
    """
    out: list[nn.Module] = []
    weighted: int | None = None  # position in `out` of the last weighted layer
    keep: Tensor | None = None  # which input units of the next weighted layer survive
    scale: Tensor | None = None  # the gate values to fold into them
    for index, module in enumerate(model.layers):
        if isinstance(module, _WEIGHTED):
            out.append(_reading(module, keep, scale))
            weighted, keep, scale = len(out) - 1, None, None
        elif isinstance(module, DamGate):
            if weighted is None or keep is not None:
                raise ValueError(f"layer {index}: a DAM gate must follow a Linear or Conv2d layer")
            keep = module.alive()
            scale = module.gate()[keep]
            out[weighted] = _writing(out[weighted], keep)
        else:
            out.append(module)
    compacted = SequentialClassifier(nn.Sequential(*out), model.spec)
    compacted.name = f"{model.name}-compact"
    return compacted


def _writing(layer: nn.Module, keep: Tensor) -> nn.Module:
    """`layer` keeping only the output units (rows / output channels) in `keep`."""
    count = int(keep.sum())
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(layer.in_features, count, bias=layer.bias is not None)
    else:
        new = nn.Conv2d(
            layer.in_channels,
            count,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            bias=layer.bias is not None,
        )
    new.weight.copy_(layer.weight[keep])
    if layer.bias is not None:
        new.bias.copy_(layer.bias[keep])
    return new


def _reading(layer: nn.Module, keep: Tensor | None, scale: Tensor | None) -> nn.Module:
    """A copy of `layer` reading only the kept input units, each input weight times its unit's
    gate value. A Linear after a Flatten of (C, H, W) reads each channel as H·W columns."""
    if keep is None or scale is None:
        keep = torch.ones(layer.weight.shape[1], dtype=torch.bool)
        scale = torch.ones(layer.weight.shape[1])
    if isinstance(layer, nn.Linear):
        block = layer.in_features // len(keep)  # positions per unit: H·W after a Flatten, else 1
        columns, factors = keep.repeat_interleave(block), scale.repeat_interleave(block)
        new: nn.Module = nn.Linear(int(columns.sum()), layer.out_features, bias=layer.bias is not None)
        new.weight.copy_(layer.weight[:, columns] * factors)
    else:
        new = nn.Conv2d(
            int(keep.sum()),
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            bias=layer.bias is not None,
        )
        new.weight.copy_(layer.weight[:, keep] * scale.view(1, -1, 1, 1))
    if layer.bias is not None:
        new.bias.copy_(layer.bias)
    return new
