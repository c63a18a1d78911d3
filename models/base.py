"""The one contract every model of the zoo implements.

A federation, an auditor and an attack all ask the same things of a model, whatever its family:
what input it takes (`spec`), how dataset labels become training targets (`targets`), its
training loss (`loss`), its named evaluation metrics (`metrics`, `metric_names`), its
predictions (`predict`), its optimiser with parameter groups (`configure_optimizer`, as
nanoGPT's `configure_optimizers`) and its local step's objective (`training_loss`). A family
overrides what it changes; the client loop, the evaluator and the run store only ever call these.
Two optional hooks let a family act after local training (`after_local_training`, e.g. ProtoPNet's
push candidates) and send payloads beside its weights (`extra_records`, e.g. statistics a server
aggregates instead of weights); one server-side hook reads those payloads after aggregation
(`after_aggregation`, checked first by `extra_record_problem`), e.g. to write ProtoPNet's pushed
prototypes into the global model.
What travels is a seam too: `federated_names` are the state-dict entries that make up the
federated model (sent, validated, aggregated, checkpointed, audited; a frozen pretrained base is
not among them), `sent_names(round)` the ones a client sends back after a round (a family that
freezes groups by round sends only what it trained). `federated_state` / `load_federated_state`
move exactly the federated entries in and out of any module.
A family not trained by gradients (LEDL's sparse coding) sets `trained_by_gradients = False` and
does its whole local round in `local_update`; the client loop then builds no optimiser and runs
no gradient step, and the run refuses what assumes one (DP-SGD, update defences, server
optimisers).
A token family splits its forward at the embedding (`embed`, `forward_embedded`) so that
end-to-end identifiability can differentiate with respect to the embedded input.

Models never import fedsim: the training settings they need arrive as `TrainingSettings`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

Modality = Literal["image", "tokens", "features"]
MODALITIES: tuple[Modality, ...] = ("image", "tokens", "features")
# An extra record: named scalars or arrays, plain enough to travel in any message format.
ExtraRecord = Mapping[str, float | int | np.ndarray]


def model_label(model: nn.Module) -> str:
    """The name reports give a model: a zoo model's registry name, else its class name."""
    return str(getattr(model, "name", type(model).__name__))


def keep_trained(
    aggregated: Mapping[str, np.ndarray], previous: Mapping[str, np.ndarray], trained: Callable[[str], bool]
) -> dict[str, np.ndarray]:
    """The aggregate with every tensor not `trained` this round put back to the round's global
    value, bit-exact: an average of equal arrays may round differently and a server optimiser may
    move them, so a family that freezes groups by round (`after_aggregation`) resets them here."""
    return {name: array if trained(name) else previous[name] for name, array in aggregated.items()}


class UnsupportedInputError(ValueError):
    """A model family cannot take this kind of input (e.g. a convnet given feature vectors).

    `accepted` names the modalities the family does take, so a caller can name the datasets that
    hold them; empty where the refusal is finer than a modality (a pretrained model's vocabulary)."""

    def __init__(self, message: str, accepted: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.accepted = accepted


@dataclass(frozen=True)
class InputSpec:
    """What one sample looks like, as a model must know it before seeing data.

    - `image`: float32 (C, H, W), values in `value_range` (default [0, 1]);
    - `features`: float32 (F,), values in `value_range` (None when unbounded, e.g. standardised);
    - `tokens`: int64 (T,) token ids in [0, `vocab_size`), `value_range` None; `vocabulary`
      names the pretrained tokenizer the ids come from ("minilm", "smollm2"), None for fedsim's
      own word vocabularies, so a pretrained model refuses ids it would misread.
    `num_classes` is the number of label values (labels are 0 .. num_classes − 1).
    """

    shape: tuple[int, ...]
    num_classes: int
    modality: Modality = "image"
    value_range: tuple[float, float] | None = (0.0, 1.0)
    vocab_size: int | None = None
    vocabulary: str | None = None

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; use one of {', '.join(MODALITIES)}")
        rank = {"image": 3, "tokens": 1, "features": 1}[self.modality]
        if len(self.shape) != rank or any(int(d) < 1 for d in self.shape):
            raise ValueError(f"{self.modality} samples need a {rank}-d positive shape, got {self.shape}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {self.num_classes}")
        if self.modality == "tokens":
            if self.vocab_size is None or self.vocab_size < 1:
                raise ValueError("token inputs need vocab_size >= 1")
            if self.value_range is not None:
                raise ValueError("token ids have no value range; pass value_range=None")
        elif self.vocab_size is not None:
            raise ValueError(f"vocab_size applies to token inputs only, not {self.modality}")
        elif self.vocabulary is not None:
            raise ValueError(f"vocabulary applies to token inputs only, not {self.modality}")

    @classmethod
    def image(cls, shape: tuple[int, int, int], num_classes: int) -> InputSpec:
        return cls(tuple(shape), num_classes, "image", (0.0, 1.0))

    @classmethod
    def features(
        cls, count: int, num_classes: int, value_range: tuple[float, float] | None = (0.0, 1.0)
    ) -> InputSpec:
        return cls((count,), num_classes, "features", value_range)

    @classmethod
    def tokens(
        cls, length: int, vocab_size: int, num_classes: int, vocabulary: str | None = None
    ) -> InputSpec:
        return cls((length,), num_classes, "tokens", None, vocab_size, vocabulary)

    @property
    def num_features(self) -> int:
        """Values per sample (C·H·W for images, F for features, T for tokens)."""
        size = 1
        for dim in self.shape:
            size *= dim
        return size

    @property
    def dtype(self) -> torch.dtype:
        return torch.int64 if self.modality == "tokens" else torch.float32

    def require(self, *modalities: Modality, model: str) -> None:
        """Raise UnsupportedInputError unless this input is of one of `modalities`."""
        if self.modality not in modalities:
            raise UnsupportedInputError(
                f"model {model!r} takes {' or '.join(modalities)} inputs, not {self.modality}",
                accepted=modalities,
            )


@dataclass(frozen=True)
class TrainingSettings:
    """The run's local-training knobs a model may use to build its optimiser.

    `rounds` is the federation's length, so a family can schedule on the global round clock
    (e.g. freeze a group for the first rounds, decay its learning rate towards the last).
    """

    learning_rate: float
    momentum: float = 0.0
    rounds: int = 1
    local_epochs: int = 1
    batch_size: int = 32
    max_local_steps: int = 0  # 0 = no cap


class ZooModel(nn.Module):
    """Base class: an image/feature/token classifier whose every seam can be overridden.

    `spec` is the input it was built for. `layers`, when not None, is the whole network as one
    flat `nn.Sequential` (so parameters are named `layers.<i>.*`); only layer-wise attacks and
    the security metric need it, and they refuse a model without it. `head` names the loss at the
    output for attacks that solve it analytically: "ce" (softmax cross-entropy over class logits,
    the default `loss`), "logistic" (one logit, BCE on a binary target) or "other" (a family
    with its own loss; analytic attacks decline it). `per_sample_loss` is False for a family whose
    loss couples the samples of a batch (a contrastive loss): DP-SGD's per-sample clipping then
    bounds no one sample's influence, and the run refuses it. `trained_by_gradients` is False for
    a family whose local round is `local_update` (no optimiser, no gradient, weights unchanged).
    """

    name: str = "zoo-model"
    head: str = "ce"
    metric_names: tuple[str, ...] = ("accuracy",)
    per_sample_loss: bool = True
    trained_by_gradients: bool = True
    # The schedule by which a family's optimiser changes its learning rates from one local step
    # to the next (e.g. ULMFiT's slanted triangular rates), empty when they stay for the whole
    # round as `configure_optimizer` sets them: with a schedule, a client's weight delta is no
    # fixed multiple of its mean gradient, and the auditor's gradient estimate says so.
    step_schedule: str = ""
    # Samples per evaluation batch: a family whose outputs are large (a 49,152-token LM's logits
    # at every position: 6 MiB per sample) lowers it so evaluation stays within memory.
    evaluation_batch_size: int = 512
    # The run's training settings, bound by whoever builds the model for a run (client and
    # server alike), so that round-scheduled answers (`sent_names`) know the run's length.
    run_settings: TrainingSettings | None = None

    def __init__(self, spec: InputSpec, layers: nn.Sequential | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.layers: nn.Sequential | None = layers

    # --- what travels ------------------------------------------------------------------------
    def federated_names(self) -> tuple[str, ...]:
        """The state-dict entries that make up the *federated* model: sent server→client and
        client→server, validated, aggregated, checkpointed, audited. Default: every entry of
        state_dict() in order. A pretrained model whose base stays frozen (LoRA) returns only its
        adapters and head: every node rebuilds the same frozen base from the installed package, so
        135 M parameters never cross the wire."""
        return tuple(self.state_dict())

    def sent_names(self, server_round: int) -> tuple[str, ...]:
        """The subset of federated_names a client sends back after training in `server_round`.
        Default: federated_names(). A family that freezes groups by round (ULMFiT's gradual
        unfreezing, text-dnn's layer-wise pretraining, ProtoPNet's last-layer stage) returns only
        the groups it trains; the server fills the rest from the round's global model before it
        validates and aggregates (and `keep_trained` keeps them bit-exact)."""
        return self.federated_names()

    def run_rounds(self) -> int:
        """The run's length in rounds, for answers scheduled on the round clock (`sent_names`);
        ValueError when no run's settings were bound (`run_settings`)."""
        if self.run_settings is None:
            raise ValueError(
                f"{self.name} schedules what it sends by round but knows no run length; "
                "set model.run_settings (fedsim's model_for does) before asking sent_names"
            )
        return self.run_settings.rounds

    # --- the continuous input ------------------------------------------------------------------
    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """The sample as the continuous tensor the network computes on: what end-to-end
        identifiability differentiates against (a token id has no derivative, its embedding
        does). Identity for images and features; a token model returns its embedded tokens and
        overrides `forward_embedded` to match."""
        return inputs

    def forward_embedded(self, embedded: torch.Tensor) -> torch.Tensor:
        """`forward` from the output of `embed` on: `self(inputs) == self.forward_embedded(
        self.embed(inputs))`. The default fits the identity `embed`."""
        return self(embedded)

    # --- targets, loss and metrics ---------------------------------------------------------
    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """How dataset labels become training targets, the one place this happens (what
        `loss` and `metrics` take, and what a recovered label is compared with): the class id
        itself here; e.g. its parity for a single-logit head."""
        return labels

    def sample_targets(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A batch's training targets, what every caller asks (the client loop, the evaluator,
        the observed gradient). Default `targets(labels)`; a self-supervised family (a language
        model predicting its own input) derives them from the inputs instead."""
        return self.targets(labels)

    def metric_weight(self, targets: torch.Tensor) -> float:
        """How many units a batch's `loss` and `metrics` are means over, the evaluator's weight
        for that batch: its samples by default; a family averaging over tokens (padding
        excluded) returns their count, so evaluation is an exact mean over tokens."""
        return float(len(targets))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean training loss over the batch, on targets already converted by `targets`."""
        return F.cross_entropy(outputs, targets)

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """Predicted targets from outputs (a single-logit head thresholds at zero)."""
        if outputs.shape[-1] == 1:
            return (outputs.squeeze(-1) > 0).long()
        return outputs.argmax(dim=-1)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Each of `metric_names` as a mean over this batch, so an evaluator can average batches
        weighted by their size."""
        return {"accuracy": float((self.predict(outputs) == targets).double().mean())}

    # --- local training ------------------------------------------------------------------------
    def training_loss(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One local step's loss. `module` is this model as the client's transformations wrapped
        it (e.g. Opacus's per-sample wrapper): call it, not `self`, for the forward pass. Default
        `loss(module(inputs), targets)`; a family whose objective needs more than the outputs
        overrides it (two augmented views for a contrastive loss, a prototype layer's distances)."""
        return self.loss(module(inputs), targets)

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def configure_optimizer(self, settings: TrainingSettings, server_round: int) -> torch.optim.Optimizer:
        """The client's optimiser for this round, built fresh each round. Default: SGD with the
        run's learning rate and momentum over every trainable parameter. Override to return
        parameter groups (per-group learning rates, groups frozen for some rounds, schedules on
        `server_round` out of `settings.rounds`)."""
        return torch.optim.SGD(
            self.trainable_parameters(), lr=settings.learning_rate, momentum=settings.momentum
        )

    def local_update(self, data_loader: DataLoader, settings: TrainingSettings, server_round: int) -> float:
        """The whole local round of a family with `trained_by_gradients = False`, called instead of
        the optimiser loop with the client's training data (batches of inputs, labels, sample
        indices); returns its training loss. What it computes goes out through `extra_records`.
        Never called for a gradient-trained family."""
        raise NotImplementedError(f"{type(self).__name__} is trained by gradients; it has no local_update")

    def before_local_training(self, data_loader: DataLoader, server_round: int) -> None:
        """Round hook, run before the local loop with the client's training data (the unwrapped
        loader: batches of inputs, labels, sample indices), e.g. to draw a second, class-balanced
        sample of it inside `training_loss`. Default: nothing."""

    def after_local_training(self, data_loader: DataLoader, server_round: int) -> None:
        """Round hook, run after the local loop and before the weights are reported, with the
        client's training data (batches of inputs, labels, sample indices). Default: nothing."""

    def extra_records(self) -> dict[str, ExtraRecord]:
        """Named payloads (plain scalars or arrays) the client sends beside its weights after
        training. Default: none."""
        return {}

    # --- server side ---------------------------------------------------------------------------
    def extra_record_problem(self, name: str, payload: ExtraRecord) -> str | None:
        """Why a received extra record is unusable (wrong fields or shapes, out of range), or
        None; the server drops a record with a problem, as it drops an invalid update. Default:
        none (non-finite numbers are refused before this is asked)."""
        return None

    def after_aggregation(
        self,
        aggregated: Mapping[str, np.ndarray],
        previous: Mapping[str, np.ndarray],
        records: Sequence[Mapping[str, ExtraRecord]],
        settings: TrainingSettings,
        server_round: int,
    ) -> dict[str, np.ndarray]:
        """The server's global model after this round's aggregation: `aggregated` (the
        strategy's result), given `previous` (the round's starting global model) and the valid
        extra records of the round's kept replies (partition order). Must be a pure function of
        its arguments, names, shapes and dtypes unchanged, so runs and resumes repeat exactly.
        Default: `aggregated` unchanged (the server then skips the hook)."""
        return dict(aggregated)


def federated_names_of(model: nn.Module) -> tuple[str, ...]:
    """`model.federated_names()`; every state-dict entry for a module that is not a ZooModel."""
    return model.federated_names() if isinstance(model, ZooModel) else tuple(model.state_dict())


def sent_names_of(model: nn.Module, server_round: int) -> tuple[str, ...]:
    """`model.sent_names(server_round)`; every state-dict entry for a module that is not a ZooModel."""
    return model.sent_names(server_round) if isinstance(model, ZooModel) else tuple(model.state_dict())


def federated_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The federated entries of `model.state_dict()`, in `federated_names` order (views that
    share the module's storage, as `state_dict` returns them)."""
    state = model.state_dict()
    names = federated_names_of(model)
    unknown = [name for name in names if name not in state]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"{model_label(model)}.federated_names names {unknown[:3] or 'an entry twice'}, not the "
            "state-dict entries once each; return names of state_dict() only"
        )
    return {name: state[name] for name in names}


def load_federated_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load exactly the federated entries into `model` (cast to its dtypes), leaving every other
    entry as built; ValueError on a missing or unknown name or a shape that differs."""
    own = federated_state(model)
    missing, unknown = [n for n in own if n not in state], [n for n in state if n not in own]
    if missing or unknown:
        raise ValueError(
            f"state does not fit {model_label(model)}'s federated model (missing {missing[:3]}, "
            f"unknown {unknown[:3]}); send exactly its federated_names"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(
                f"state entry {name!r} has shape {tuple(tensor.shape)}, {model_label(model)}'s is "
                f"{tuple(own[name].shape)}; send the same model's weights"
            )
    model.load_state_dict(dict(state), strict=False)
