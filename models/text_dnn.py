"""Text DNN on LSA features (de Andrade 2019, arXiv 1910.12674), with greedy layer-wise
pretraining as federated phases on the global round clock.

    features (e.g. TF-IDF -> LSA, 100 values) -> [Linear -> tanh] x L -> Linear -> class logits

Initialisation: Glorot (Xavier) uniform with the tanh gain 5/3 for the hidden layers, gain 1 for
the head and the decoders, zero biases. Glorot's derivation keeps activation and gradient
variances equal across layers for a symmetric unit that is linear near 0 (tanh); He's is for
ReLU, whose half-zero output halves the variance. tanh also keeps every op of `layers` invertible,
so the layer-wise attacks and the security metric apply to the classifier path.

Greedy layer-wise pretraining (Bengio et al. 2007; denoising autoencoders, Vincent et al. 2008):
in the first rounds hidden layer 1 is trained as a denoising autoencoder on the input (masking
noise: each value zeroed with probability `noise`, the clean input reconstructed by a linear
decoder, MSE), then layer 2 on layer-1 codes of the clean input, ... ; then every layer and the
head are fine-tuned with cross-entropy. The decoders are parameters of the model (`decoders`,
outside `layers`), so they travel and are averaged like any weight. Which tensors train in a round
is a function of the round alone (`PretrainSchedule`); every other tensor is frozen on the client,
not sent back (`sent_names`: the server fills it from the round's global model), and reset
bit-exact to the round's global value after aggregation (`after_aggregation`), as an average of
equal arrays may round differently and a server optimiser may move them.
While only autoencoders train the head is untrained: evaluation in those rounds is near chance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.base import ExtraRecord, InputSpec, TrainingSettings, ZooModel, keep_trained
from models.dam import parse_widths

TANH_GAIN = 5.0 / 3.0  # nn.init.calculate_gain("tanh")
HEAD = "head"


@dataclass(frozen=True)
class PretrainSchedule:
    """Phases on the global round clock (rounds 1-based) of a run of `rounds` rounds.

    Hidden layer k (0-based) is pretrained in rounds k·p + 1 .. (k + 1)·p, then every later round
    fine-tunes. p is `rounds_per_layer`, capped so that pretraining takes at most half of the run
    (a short run still fine-tunes); p = 0 (asked or capped) means no pretraining.
    """

    hidden_layers: int
    rounds_per_layer: int

    def per_layer(self, rounds: int) -> int:
        return min(self.rounds_per_layer, (rounds // 2) // self.hidden_layers)

    def pretraining_rounds(self, rounds: int) -> int:
        return self.per_layer(rounds) * self.hidden_layers

    def layer(self, server_round: int, rounds: int) -> int | None:
        """The hidden layer pretrained in this round, or None for a fine-tuning round."""
        per_layer = self.per_layer(rounds)
        if per_layer == 0 or server_round > self.pretraining_rounds(rounds):
            return None
        return (max(server_round, 1) - 1) // per_layer


class TextDNN(ZooModel):
    """A tanh MLP whose hidden layers can each be pretrained as a denoising autoencoder.

    `layers` is the classifier (Flatten, then Linear/Tanh pairs, then the head); `decoders[k]`
    maps hidden layer k's code back to its input. `_pretraining` is the hidden layer the current
    round pretrains (set by `configure_optimizer`), None for the supervised objective, which is
    also what a freshly built model (an audit) uses.
    """

    layers: nn.Sequential

    def __init__(
        self, spec: InputSpec, widths: Sequence[int], schedule: PretrainSchedule, noise: float, nesterov: bool
    ) -> None:
        modules: list[nn.Module] = [nn.Flatten()]
        decoders: list[nn.Module] = []
        width = spec.num_features
        for hidden in widths:
            modules += [_glorot(nn.Linear(width, hidden), TANH_GAIN), nn.Tanh()]
            decoders.append(_glorot(nn.Linear(hidden, width), 1.0))
            width = hidden
        modules.append(_glorot(nn.Linear(width, spec.num_classes), 1.0))
        super().__init__(spec, nn.Sequential(*modules))
        self.decoders = nn.ModuleList(decoders)
        self.schedule, self.noise, self.nesterov = schedule, noise, nesterov
        self._pretraining: int | None = None

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layers(inputs)

    # --- the layer-wise view -------------------------------------------------------------------
    def encoder(self, layer: int) -> nn.Linear:
        module = self.layers[1 + 2 * layer]
        assert isinstance(module, nn.Linear)
        return module

    def code_below(self, inputs: Tensor, layer: int) -> Tensor:
        """The input of hidden layer `layer`: the flattened sample through the layers below it."""
        return self.layers[: 1 + 2 * layer](inputs)

    def reconstruction_loss(self, inputs: Tensor, layer: int) -> Tensor:
        """Denoising-autoencoder loss of hidden layer `layer`: masking noise on its (clean) input,
        encode, decode, MSE against the clean input. The layers below are frozen: no graph."""
        with torch.no_grad():
            clean = self.code_below(inputs, layer)
        keep = (torch.rand_like(clean) >= self.noise).to(clean.dtype)
        code = torch.tanh(self.encoder(layer)(clean * keep))
        return F.mse_loss(self.decoders[layer](code), clean)

    def training_loss(self, module: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        if self._pretraining is None:
            return self.loss(module(inputs), targets)
        return self.reconstruction_loss(inputs, self._pretraining)

    # --- groups and phases ---------------------------------------------------------------------
    def groups(self) -> dict[str, list[nn.Parameter]]:
        """encoder<k> / decoder<k> per hidden layer, and the head."""
        hidden = len(self.decoders)
        groups = {f"encoder{k}": list(self.encoder(k).parameters()) for k in range(hidden)}
        groups.update({f"decoder{k}": list(self.decoders[k].parameters()) for k in range(hidden)})
        groups[HEAD] = list(self.layers[-1].parameters())
        return groups

    def trained_groups(self, layer: int | None) -> tuple[str, ...]:
        """What trains while hidden layer `layer` is pretrained (None: fine-tuning, no decoder)."""
        if layer is not None:
            return (f"encoder{layer}", f"decoder{layer}")
        return (*(f"encoder{k}" for k in range(len(self.decoders))), HEAD)

    def group_of(self) -> dict[str, str]:
        """State-dict name -> group (every tensor of this model is a parameter of one group)."""
        ids = {id(p): group for group, params in self.groups().items() for p in params}
        return {name: ids[id(p)] for name, p in self.named_parameters()}

    def configure_optimizer(self, settings: TrainingSettings, server_round: int) -> torch.optim.Optimizer:
        """SGD with the run's learning rate and momentum (Nesterov's when `nesterov`) over this
        round's groups; the others are frozen (requires_grad off) for the round."""
        if self.nesterov and settings.momentum <= 0:
            raise ValueError(
                "nesterov=true needs a momentum > 0 (got 0); "
                "set e.g. --momentum 0.9, or model option nesterov=false"
            )
        self._pretraining = self.schedule.layer(server_round, settings.rounds)
        trained = self.trained_groups(self._pretraining)
        params: list[nn.Parameter] = []
        for group, members in self.groups().items():
            for parameter in members:
                parameter.requires_grad_(group in trained)
            if group in trained:
                params += members
        return torch.optim.SGD(
            params, lr=settings.learning_rate, momentum=settings.momentum, nesterov=self.nesterov
        )

    def after_aggregation(
        self,
        aggregated: Mapping[str, np.ndarray],
        previous: Mapping[str, np.ndarray],
        records: Sequence[Mapping[str, ExtraRecord]],
        settings: TrainingSettings,
        server_round: int,
    ) -> dict[str, np.ndarray]:
        """Tensors frozen this round back to the round's global values, bit-exact."""
        return keep_trained(aggregated, previous, self._trains(server_round, settings.rounds))

    def sent_names(self, server_round: int) -> tuple[str, ...]:
        """Only this round's trained groups (one encoder/decoder pair while a layer is
        pretrained); the server fills the frozen ones from the round's global model."""
        trains = self._trains(server_round, self.run_rounds())
        return tuple(name for name in self.federated_names() if trains(name))

    def _trains(self, server_round: int, rounds: int) -> Callable[[str], bool]:
        """Whether a state-dict entry is trained in this round (what is sent and aggregated)."""
        trained = self.trained_groups(self.schedule.layer(server_round, rounds))
        group_of = self.group_of()
        return lambda name: group_of.get(name) in trained


def _glorot(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.xavier_uniform_(layer.weight, gain=gain)
    nn.init.zeros_(layer.bias)
    return layer


def text_dnn(
    spec: InputSpec,
    widths: str = "256-128-64",
    pretrain_rounds_per_layer: int = 1,
    noise: float = 0.2,
    nesterov: bool = True,
) -> TextDNN:
    """Deep tanh MLP for feature vectors (e.g. `fortunes-lsa`) or flattened images. `widths` are
    the hidden widths joined by '-'; each hidden layer is pretrained as a denoising autoencoder
    (masking `noise`) for `pretrain_rounds_per_layer` rounds (0: no pretraining, at most half
    the run in all), then the whole net is fine-tuned; `nesterov` uses Nesterov's momentum."""
    hidden = parse_widths(widths, "widths")
    if pretrain_rounds_per_layer < 0:
        raise ValueError(
            f"pretrain_rounds_per_layer must be >= 0 (got {pretrain_rounds_per_layer}); 0 skips pretraining"
        )
    if not 0 <= noise < 1:
        raise ValueError(f"noise is the masking probability, in [0, 1) (got {noise}); e.g. noise=0.2")
    schedule = PretrainSchedule(len(hidden), pretrain_rounds_per_layer)
    return TextDNN(spec, hidden, schedule, noise, nesterov)
