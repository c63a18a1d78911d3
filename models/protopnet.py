"""ProtoPNet ("This Looks Like That", Chen et al., NeurIPS 2019), CPU-sized, on the global round clock.

    image -> features (conv, ReLU, pool) -> add-on (1x1 conv, ReLU, 1x1 conv, sigmoid) -> z (D, H, W)
          -> squared L2 distance of every 1x1 patch of z to each of P prototypes (a convolution)
          -> min-pool over positions -> similarity log((d + 1) / (d + 1e-4)) -> last layer (P -> K)

Training is staged on the federation's round clock (`ProtoSchedule`): warm rounds train the add-on
and the prototypes, joint rounds everything but the last layer (as the reference code's joint
optimiser), then the push round and the last-layer rounds train the last layer only. The loss is
CE + 0.8·cluster − 0.08·separation + 1e-4·L1 of the last layer's wrong-class weights.

Federated push (the policy, see `push_candidates` and `after_aggregation`): a push computed on a
client's locally trained model would sit in a latent space nobody else has, and averaging pushed
prototypes gives vectors that are no patch at all. So the push round is the first round in which
the feature extractor, the add-on and the prototypes are frozen: every client's latent space is
then exactly the global one. Each client proposes, per prototype, its nearest latent patch among
its own training images of the prototype's class and that patch's distance (extra record
`push`); the server keeps the global nearest (ties: the lowest partition id) and writes it into
the aggregated prototypes. Frozen tensors are reset to the round's global values after
aggregation, so every prototype stays bit-for-bit a real training patch afterwards. What this
reveals: the server receives, per prototype, one D-dimensional latent patch of some client's
image and its distance; `attacks.disclosure.latent_patch` measures how many of the patch's pixels it gives
back. A class that no client holds keeps its unpushed prototypes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from models.base import ExtraRecord, InputSpec, TrainingSettings, ZooModel, keep_trained

Stage = Literal["warm", "joint", "last"]
# The reference settings (cfchen-duke/ProtoPNet settings.py / train_and_test.py).
CLUSTER_WEIGHT, SEPARATION_WEIGHT, L1_WEIGHT = 0.8, -0.08, 1e-4
SIMILARITY_EPSILON = 1e-4
INCORRECT_CLASS_CONNECTION = -0.5
ADD_ON_WEIGHT_DECAY = 1e-3
PUSH_RECORD = "push"
PROTOTYPES = "prototype_vectors"
LAST_LAYER = "last_layer.weight"


@dataclass(frozen=True)
class ProtoSchedule:
    """The stages on the global round clock of a run of `rounds` rounds (1-based):

    - the push round is `rounds − last_layer_rounds` (at least 1): its clients train the last layer
      only and propose push candidates, the server pushes after aggregating it;
    - the rounds after it are last-layer rounds;
    - of the rounds before it, the first `warm_rounds` are warm, but at most half of them, so a
      short run still trains its feature extractor; the rest are joint.
    """

    warm_rounds: int = 1
    last_layer_rounds: int = 1

    def push_round(self, rounds: int) -> int:
        return max(1, rounds - self.last_layer_rounds)

    def stage(self, server_round: int, rounds: int) -> Stage:
        push = self.push_round(rounds)
        if server_round >= push:
            return "last"
        return "warm" if server_round <= min(self.warm_rounds, (push - 1) // 2) else "joint"


def _conv_features(channels: int, widths: Sequence[int]) -> nn.Sequential:
    """The backbone: per width a 3x3 conv (padding 1), ReLU and a 2x2 max pool."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    return nn.Sequential(*layers)


class ProtoPNet(ZooModel):
    """A prototype classifier; its outputs are class logits, so evaluation loss is plain CE."""

    head = "ce"

    def __init__(
        self,
        spec: InputSpec,
        features: nn.Sequential,
        feature_channels: int,
        prototype_dim: int,
        prototypes_per_class: int,
        schedule: ProtoSchedule,
        lr: float,
        last_layer_lr: float,
    ) -> None:
        super().__init__(spec)
        classes = spec.num_classes
        self.schedule = schedule
        self.lr, self.last_layer_lr = lr, last_layer_lr
        self.features = features
        self.add_on = nn.Sequential(
            nn.Conv2d(feature_channels, prototype_dim, 1),
            nn.ReLU(),
            nn.Conv2d(prototype_dim, prototype_dim, 1),
            nn.Sigmoid(),
        )
        count = classes * prototypes_per_class
        self.prototype_vectors = nn.Parameter(torch.rand(count, prototype_dim, 1, 1))
        identity = torch.zeros(count, classes)
        identity[torch.arange(count), torch.arange(count) // prototypes_per_class] = 1.0
        # Fixed by construction, identical everywhere: not a weight to send or average.
        self.register_buffer("prototype_class_identity", identity, persistent=False)
        self.last_layer = nn.Linear(count, classes, bias=False)
        # The reference initialises its add-on (and torchvision's VGG its convs) Kaiming-normal,
        # fan-out, zero bias; PyTorch's default leaves the sigmoid's inputs near 0 and every patch
        # alike, which slowed training here several-fold.
        for conv in (m for m in [*features, *self.add_on] if isinstance(m, nn.Conv2d)):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        with torch.no_grad():
            wrong = 1.0 - identity.T
            self.last_layer.weight.copy_(identity.T + INCORRECT_CLASS_CONNECTION * wrong)
        self._min_distances: Tensor | None = None
        self._settings: TrainingSettings | None = None
        self._push: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, object]:
        """Copies (deepcopy, pickling) leave out the last forward's distances: a tensor inside an
        autograd graph cannot be copied, and it belongs to that forward only."""
        state = dict(self.__dict__)
        state["_min_distances"] = None
        return state

    @property
    def num_prototypes(self) -> int:
        return self.prototype_vectors.shape[0]

    def prototype_classes(self) -> Tensor:
        """The class each prototype belongs to, (P,)."""
        return self.prototype_class_identity.argmax(dim=1)

    # --- forward -------------------------------------------------------------------------------
    def latent(self, inputs: Tensor) -> Tensor:
        """z = add-on(features(x)), (B, D, H, W), values in (0, 1): the space prototypes live in."""
        return self.add_on(self.features(inputs))

    def distance_maps(self, latent: Tensor) -> Tensor:
        """Squared L2 distance of every 1x1 patch of `latent` to every prototype, (B, P, H, W),
        as the reference computes it: relu(‖z‖² − 2 z·p + ‖p‖²), the cross term a convolution."""
        prototypes = self.prototype_vectors
        z_squared = latent.pow(2).sum(dim=1, keepdim=True)
        cross = F.conv2d(latent, prototypes)
        p_squared = prototypes.pow(2).sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
        return F.relu(z_squared - 2 * cross + p_squared)

    def forward(self, inputs: Tensor) -> Tensor:
        distances = self.distance_maps(self.latent(inputs)).flatten(2).min(dim=2).values
        self._min_distances = distances  # for `training_loss`, which only sees the wrapped module
        similarity = torch.log((distances + 1) / (distances + SIMILARITY_EPSILON))
        return self.last_layer(similarity)

    # --- local training ------------------------------------------------------------------------
    def training_loss(self, module: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        """CE + 0.8·cluster − 0.08·separation + 1e-4·L1 (the reference's joint/warm objective;
        in last-layer rounds the two distance terms are constants, leaving CE + L1)."""
        logits = module(inputs)
        distances, self._min_distances = self._min_distances, None  # keep no graph alive
        if distances is None:
            raise RuntimeError("forward did not record the prototype distances")
        own = self.prototype_class_identity[:, targets].T.bool()  # (B, P)
        cluster = distances.masked_fill(~own, float("inf")).min(dim=1).values.mean()
        separation = distances.masked_fill(own, float("inf")).min(dim=1).values.mean()
        wrong = 1.0 - self.prototype_class_identity.T
        l1 = (self.last_layer.weight * wrong).abs().sum()
        ce = F.cross_entropy(logits, targets)
        return ce + CLUSTER_WEIGHT * cluster + SEPARATION_WEIGHT * separation + L1_WEIGHT * l1

    def _groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "features": list(self.features.parameters()),
            "add_on": list(self.add_on.parameters()),
            "prototypes": [self.prototype_vectors],
            "last_layer": list(self.last_layer.parameters()),
        }

    def trained_groups(self, stage: Stage) -> tuple[str, ...]:
        return {
            "warm": ("add_on", "prototypes"),
            "joint": ("features", "add_on", "prototypes"),
            "last": ("last_layer",),
        }[stage]

    def configure_optimizer(self, settings: TrainingSettings, server_round: int) -> torch.optim.Optimizer:
        """Adam (the paper's optimiser, the model's own learning rates: the run's SGD learning
        rate and momentum do not apply) over this round's stage; the other groups are frozen."""
        self._settings = settings
        stage = self.schedule.stage(server_round, settings.rounds)
        trained = self.trained_groups(stage)
        groups = []
        for name, parameters in self._groups().items():
            for parameter in parameters:
                parameter.requires_grad_(name in trained)
            if name in trained:
                lr = self.last_layer_lr if name == "last_layer" else self.lr
                decay = ADD_ON_WEIGHT_DECAY if name == "add_on" else 0.0
                groups.append({"params": parameters, "lr": lr, "weight_decay": decay})
        return torch.optim.Adam(groups)

    def after_local_training(self, data_loader: DataLoader, server_round: int) -> None:
        """In the push round, find this client's push candidates (see the module docstring)."""
        self._push = None
        settings = self._settings
        if settings is not None and server_round == self.schedule.push_round(settings.rounds):
            batches = list(data_loader)  # one pass: a shuffling loader reorders on every pass
            inputs = torch.cat([batch[0] for batch in batches])
            labels = torch.cat([batch[1] for batch in batches])
            self._push = push_candidates(self, inputs, labels).to_record()

    def extra_records(self) -> dict[str, ExtraRecord]:
        return {} if self._push is None else {PUSH_RECORD: self._push}

    # --- server side ---------------------------------------------------------------------------
    def extra_record_problem(self, name: str, payload: ExtraRecord) -> str | None:
        if name != PUSH_RECORD:
            return f"ProtoPNet sends no record {name!r}"
        return PushCandidates.problem(payload, self.num_prototypes, self.prototype_vectors.shape[1])

    def after_aggregation(
        self,
        aggregated: Mapping[str, np.ndarray],
        previous: Mapping[str, np.ndarray],
        records: Sequence[Mapping[str, ExtraRecord]],
        settings: TrainingSettings,
        server_round: int,
    ) -> dict[str, np.ndarray]:
        """Frozen tensors back to the round's global values (bit-exact: an average of equal
        arrays may round differently, a server optimiser may move them), then, in the push round,
        each prototype becomes the globally nearest candidate of the clients' push records."""
        result = keep_trained(aggregated, previous, self._trains(server_round, settings.rounds))
        if server_round == self.schedule.push_round(settings.rounds):
            candidates = [PushCandidates.from_record(r[PUSH_RECORD]) for r in records if PUSH_RECORD in r]
            result[PROTOTYPES] = global_push(result[PROTOTYPES], candidates)
        return result

    def sent_names(self, server_round: int) -> tuple[str, ...]:
        """Only this round's stage's groups (the last layer alone in the last-layer stage); the
        server fills the frozen ones from the round's global model. The push candidates travel as
        an extra record, not as prototypes."""
        trains = self._trains(server_round, self.run_rounds())
        return tuple(name for name in self.federated_names() if trains(name))

    def _trains(self, server_round: int, rounds: int) -> Callable[[str], bool]:
        """Whether a state-dict entry is trained in this round (what is sent and aggregated)."""
        trained = self.trained_groups(self.schedule.stage(server_round, rounds))
        return lambda name: _group_of(name) in trained


def _group_of(name: str) -> str:
    """The parameter group a state-dict entry belongs to (see `ProtoPNet._groups`)."""
    if name == PROTOTYPES:
        return "prototypes"
    return name.partition(".")[0]


@dataclass(frozen=True)
class PushCandidates:
    """One client's proposal per prototype: the nearest latent patch of the prototype's class on
    the client (`patches`, (P, D)), its squared distance (`distances`, (P,)) and whether the
    client holds the class at all (`found`, (P,)). Where it does, the patch came from
    `sample`/`row`/`col` of its training set (kept on the client, never sent)."""

    distances: np.ndarray
    patches: np.ndarray
    found: np.ndarray
    sample: np.ndarray | None = None
    row: np.ndarray | None = None
    col: np.ndarray | None = None

    def to_record(self) -> dict[str, np.ndarray]:
        return {"distances": self.distances, "patches": self.patches, "found": self.found}

    @classmethod
    def from_record(cls, payload: Mapping[str, object]) -> PushCandidates:
        return cls(
            np.asarray(payload["distances"], dtype=np.float64),
            np.asarray(payload["patches"], dtype=np.float32),
            np.asarray(payload["found"]).astype(bool),
        )

    @staticmethod
    def problem(payload: Mapping[str, object], prototypes: int, dim: int) -> str | None:
        """Why a received push record is unusable, or None."""
        expected = {"distances": (prototypes,), "patches": (prototypes, dim), "found": (prototypes,)}
        if set(payload) != set(expected):
            return f"push record has fields {sorted(payload)}, expected {sorted(expected)}"
        for key, shape in expected.items():
            value = payload[key]
            if not isinstance(value, np.ndarray) or value.shape != shape:
                return f"push field {key!r} is not an array of shape {shape}"
            if not (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
                return f"push field {key!r} has dtype {value.dtype}, not a number"
            if not np.isfinite(value.astype(np.float64)).all():
                return f"push field {key!r} holds non-finite values"
        if not np.isin(payload["found"], (0, 1)).all():
            return "push field 'found' holds values other than 0 and 1"
        if (payload["distances"] < 0).any():
            return "push field 'distances' holds negative distances"
        patches = payload["patches"]
        if ((patches < 0) | (patches > 1)).any():  # the add-on ends in a sigmoid
            return "push field 'patches' holds values outside [0, 1], so no latent patch"
        return None


@torch.no_grad()
def push_candidates(
    model: ProtoPNet, inputs: Tensor, labels: Tensor, batch_size: int = 256
) -> PushCandidates:
    """Per prototype, the nearest 1x1 latent patch among `inputs` of the prototype's class (the
    reference push's class-specific argmin), with its squared distance and where it came from."""
    was_training = model.training
    model.eval()
    count, dim = model.prototype_vectors.shape[:2]
    classes = model.prototype_classes()
    best = torch.full((count,), float("inf"), dtype=torch.float64)
    patches = torch.zeros(count, dim)
    where = torch.full((3, count), -1, dtype=torch.long)
    for start in range(0, len(labels), batch_size):
        x, y = inputs[start : start + batch_size], labels[start : start + batch_size]
        latent = model.latent(x)
        maps = model.distance_maps(latent)  # (B, P, H, W)
        width = maps.shape[3]
        own = (y.view(-1, 1) == classes.view(1, -1)).view(len(y), count, 1, 1)
        masked = maps.masked_fill(~own, float("inf")).permute(1, 0, 2, 3).flatten(1)  # (P, B·H·W)
        values, flat = masked.min(dim=1)
        better = values.double() < best
        for j in torch.nonzero(better).flatten().tolist():
            index = int(flat[j])
            sample, position = divmod(index, maps.shape[2] * width)
            row, col = divmod(position, width)
            best[j] = float(values[j])
            patches[j] = latent[sample, :, row, col]
            where[:, j] = torch.tensor([start + sample, row, col])
    model.train(was_training)
    found = torch.isfinite(best)
    return PushCandidates(
        distances=torch.where(found, best, torch.zeros_like(best)).numpy(),
        patches=patches.numpy(),
        found=found.numpy(),
        sample=where[0].numpy(),
        row=where[1].numpy(),
        col=where[2].numpy(),
    )


def global_push(prototypes: np.ndarray, candidates: Sequence[PushCandidates]) -> np.ndarray:
    """`prototypes` (P, D, 1, 1) with each replaced by the nearest of the candidates that hold
    its class (the first on a tie, candidates in partition order); kept where none does."""
    pushed = np.array(prototypes, copy=True)
    best = np.full(pushed.shape[0], np.inf)
    for proposal in candidates:
        better = proposal.found & (proposal.distances < best)
        best[better] = proposal.distances[better]
        pushed[better] = proposal.patches[better].reshape(-1, pushed.shape[1], 1, 1).astype(pushed.dtype)
    return pushed


def protopnet(
    spec: InputSpec,
    prototypes_per_class: int = 10,
    prototype_dim: int = 32,
    width: int = 32,
    blocks: int = 3,
    warm_rounds: int = 1,
    last_layer_rounds: int = 1,
    lr: float = 0.003,
    last_layer_lr: float = 0.003,
) -> ProtoPNet:
    """ProtoPNet: a backbone of `blocks` blocks Conv3x3-ReLU-Pool2 of widths width, 2·width,
    2·width, … (three on 28x28 give a 3x3 latent whose patches each see 22x22 pixels, 8x8 digits
    1x1), add-on 2·width→D→D with sigmoid, `prototypes_per_class` per class (the paper's 10);
    training stages on the round clock (see `ProtoSchedule`), Adam at `lr` (`last_layer_lr` for
    the last layer). A prototype compares one latent patch, so its receptive field must cover a
    discriminative part: with two blocks (10x10 pixels of 28x28) Fashion-MNIST's shirts, coats and
    pullovers look alike patch by patch, and the net stayed 11 points below its black box."""
    if spec.num_classes < 2:
        raise ValueError("ProtoPNet needs at least two classes (its separation cost compares them)")
    channels, height, width_px = spec.shape
    for name, value in (
        ("prototypes_per_class", prototypes_per_class),
        ("prototype_dim", prototype_dim),
        ("width", width),
        ("blocks", blocks),
    ):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if warm_rounds < 0 or last_layer_rounds < 0:
        raise ValueError("warm_rounds and last_layer_rounds must be >= 0")
    if not (lr > 0 and last_layer_lr > 0):
        raise ValueError("lr and last_layer_lr must be > 0")
    if min(height, width_px) < 2**blocks:
        raise ValueError(
            f"images of {height}x{width_px} are too small for {blocks} 2x2 poolings; "
            f"use {2**blocks}x{2**blocks} or more, or fewer blocks"
        )
    widths = (width, *[2 * width] * (blocks - 1))
    return ProtoPNet(
        spec,
        _conv_features(channels, widths),
        widths[-1],
        prototype_dim,
        prototypes_per_class,
        ProtoSchedule(warm_rounds, last_layer_rounds),
        lr,
        last_layer_lr,
    )
