"""ULMFiT (Howard & Ruder, ACL 2018) on a tiny AWD-LSTM, with its schedules on the global round clock.

    tokens -> embedding (embedding dropout: whole word rows zeroed) -> LSTM 1 .. LSTM n
           (weight drop: DropConnect on each hidden-to-hidden matrix; locked dropout between layers)
           -> language-model decoder (next-token logits)                       [LM phase]
           -> concat pooling [h_T, max_t h_t, mean_t h_t] -> Linear-ReLU-Dropout-Linear [classifier]

Three stages. (1) A general-domain language model, pretrained once outside the federation
(`pretrain_language_model`, e.g. on KJV verses encoded with the *target* dataset's tokenizer, so
token ids agree) and saved as safetensors (`save_pretrained`); the builder loads it with
`pretrained=<path>`. (2) Target-task LM fine-tuning: the first `lm_rounds` federated rounds train
embedding, LSTMs and decoder on next-token prediction over the clients' own texts (no labels).
(3) Classifier fine-tuning: the remaining rounds train the concat-pooling classifier with
gradual unfreezing (round 1 of the stage: the classifier alone; each later round one more group
from the top: LSTM n, ..., LSTM 1, embedding).

Both fine-tuning stages use discriminative learning rates (group l of L, 0 = embedding, gets
lr / 2.6^(L−1−l)) and slanted triangular learning rates (cut_frac 0.1, ratio 32) over the stage's
global iteration count: iteration t = (round index in the stage) × (steps per round) + local step,
T = (rounds in the stage) × (steps per round), steps per round = local_epochs × batches per
epoch (capped by max_local_steps): a function of the round and the client's data size alone, so
runs repeat exactly. The optimiser is Adam with the paper's betas (0.7, 0.99), fresh every round.

Frozen tensors: a group not trained this round (the classifier in the LM stage, the decoder in
the classifier stage, the groups not yet unfrozen) has requires_grad off on the client, and the
server resets it bit-exact to the round's global value after aggregation (`after_aggregation`),
so only the trainable tensors are aggregated. The frozen tensors do not travel back: the client
sends only the round's trained groups (`sent_names`), and the server fills the rest from the
round's global model before it validates and aggregates.

Our simplifications (tiny scale): no weight tying between embedding and decoder, no batch norm in
the classifier, concat pooling over all positions (padding included; the dataset pads on the right
with id 0, whose embedding row is zero), no backpropagation through time beyond one document.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from models.base import ExtraRecord, InputSpec, TrainingSettings, ZooModel, keep_trained

PADDING_ID = 0
EMBEDDING, DECODER, CLASSIFIER = "embedding", "decoder", "classifier"
ADAM_BETAS = (0.7, 0.99)  # the paper's Adam betas


def slanted_triangular(t: int, total: int, cut_frac: float = 0.1, ratio: float = 32.0) -> float:
    """STLR multiplier of lr_max at iteration t of `total` (Howard & Ruder eq. 3):
    cut = ⌊T·cut_frac⌋, p = t/cut before the cut, else 1 − (t − cut)/(cut·(1/cut_frac − 1));
    η_t = η_max·(1 + p·(ratio − 1))/ratio. The paper's formula; p is clamped at 0 past T."""
    cut = max(1, int(total * cut_frac))
    p = t / cut if t < cut else max(0.0, 1.0 - (t - cut) / (cut * (1.0 / cut_frac - 1.0)))
    return (1.0 + p * (ratio - 1.0)) / ratio


def discriminative_rates(lr: float, groups: int, decay: float = 2.6) -> list[float]:
    """Per layer group, bottom (0) to top (groups − 1): lr / decay^(groups − 1 − l)."""
    return [lr / decay ** (groups - 1 - index) for index in range(groups)]


@dataclass(frozen=True)
class Stages:
    """The two federated stages on the round clock (rounds 1-based): LM fine-tuning in rounds
    1 .. m, classifier fine-tuning after; m = `lm_rounds` capped at half the run."""

    lm_rounds: int

    def lm_length(self, rounds: int) -> int:
        return min(self.lm_rounds, rounds // 2)

    def stage(self, server_round: int, rounds: int) -> tuple[str, int, int]:
        """(stage name "lm" or "classifier", 0-based round index in it, its length in rounds)."""
        lm = self.lm_length(rounds)
        server_round = max(server_round, 1)
        if server_round <= lm:
            return "lm", server_round - 1, lm
        return "classifier", server_round - 1 - lm, max(rounds - lm, 1)


class LockedDropout(nn.Module):
    """Variational dropout: one mask per sequence, shared across time steps (AWD-LSTM)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1 - self.p) / (1 - self.p)
        return x * mask


class WeightDropLSTM(nn.Module):
    """One-layer LSTM (`lstm`, batch first) with DropConnect on its hidden-to-hidden matrix.

    The raw `lstm.weight_hh_l0` stays the registered parameter (state-dict names unchanged,
    gradients flow to it); each training forward runs the LSTM functionally with a dropped copy
    in its place, one mask for the whole sequence (and the batch)."""

    def __init__(self, input_size: int, hidden_size: int, weight_drop: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.weight_drop = weight_drop

    def forward(self, x: Tensor) -> Tensor:
        weight_hh = self.lstm.weight_hh_l0
        if self.training and self.weight_drop > 0:
            weight_hh = F.dropout(weight_hh, self.weight_drop, training=True)
        if torch._C._are_functorch_transforms_active():
            return self.recurrence(x, weight_hh)
        if weight_hh is self.lstm.weight_hh_l0:
            return self.lstm(x)[0]
        return torch.func.functional_call(self.lstm, {"weight_hh_l0": weight_hh}, (x,), strict=False)[0]

    def recurrence(self, x: Tensor, weight_hh: Tensor) -> Tensor:
        """The same LSTM written out step by step: used inside torch.func transforms (an
        auditor's forward-mode products), which the fused CPU kernel does not support."""
        lstm = self.lstm
        projected = x @ lstm.weight_ih_l0.T + lstm.bias_ih_l0 + lstm.bias_hh_l0
        h = x.new_zeros(x.shape[0], lstm.hidden_size)
        c = torch.zeros_like(h)
        outputs = []
        for t in range(x.shape[1]):
            i, f, g, o = (projected[:, t] + h @ weight_hh.T).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=1)


class ULMFiT(ZooModel):
    """A small AWD-LSTM with a language-model decoder and a concat-pooling classifier."""

    step_schedule = "slanted triangular learning rates, set at every local step"

    def __init__(
        self,
        spec: InputSpec,
        embedding: int,
        hidden: int,
        lstm_layers: int,
        classifier_hidden: int,
        weight_drop: float,
        embed_dropout: float,
        dropout: float,
        stages: Stages,
        cut_frac: float,
        ratio: float,
        decay: float,
    ) -> None:
        super().__init__(spec)
        vocab = int(spec.vocab_size or 0)
        self.encoder = nn.Embedding(vocab, embedding, padding_idx=PADDING_ID)
        sizes = [embedding] + [hidden] * (lstm_layers - 1) + [embedding]
        self.rnns = nn.ModuleList(
            WeightDropLSTM(sizes[k], sizes[k + 1], weight_drop) for k in range(lstm_layers)
        )
        self.decoder = nn.Linear(embedding, vocab)
        self.classifier = nn.Sequential(
            nn.Linear(3 * embedding, classifier_hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(classifier_hidden, spec.num_classes),
        )
        self.embed_dropout = embed_dropout
        self.locked = LockedDropout(dropout)
        self.stages, self.cut_frac, self.ratio, self.decay = stages, cut_frac, ratio, decay
        self._stage: str = CLASSIFIER
        self._optimizer: torch.optim.Optimizer | None = None
        self._peak_rates: list[float] = []
        self._step = 0
        self._first_step = 0
        self._total_steps = 1
        self._settings: TrainingSettings | None = None
        self._stage_position: tuple[int, int] = (0, 1)

    # --- forward -------------------------------------------------------------------------------
    def embed(self, inputs: Tensor) -> Tensor:
        """Embedded tokens (B, T, E); in training, embedding dropout zeroes whole word rows of
        the matrix (the same words dropped everywhere in the batch), rescaled by 1/(1 − p)."""
        weight = self.encoder.weight
        if self.training and self.embed_dropout > 0:
            keep = weight.new_empty(weight.shape[0], 1).bernoulli_(1 - self.embed_dropout)
            weight = weight * keep / (1 - self.embed_dropout)
        return F.embedding(inputs, weight, padding_idx=PADDING_ID)

    def encode(self, embedded: Tensor) -> Tensor:
        """The last LSTM's outputs (B, T, E), locked dropout between layers."""
        x = embedded
        for index, rnn in enumerate(self.rnns):
            x = rnn(self.locked(x) if index else x)
        return self.locked(x)

    @staticmethod
    def concat_pool(states: Tensor) -> Tensor:
        """[h_T, max over time, mean over time], (B, 3·E)."""
        return torch.cat([states[:, -1], states.max(dim=1).values, states.mean(dim=1)], dim=1)

    def forward_embedded(self, embedded: Tensor) -> Tensor:
        return self.classifier(self.concat_pool(self.encode(embedded)))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.forward_embedded(self.embed(inputs))

    def language_model_loss(self, inputs: Tensor) -> Tensor:
        """Mean next-token cross-entropy over the real tokens (padding targets ignored)."""
        logits = self.decoder(self.encode(self.embed(inputs)))
        targets = inputs[:, 1:]
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PADDING_ID
        )

    # --- groups and schedules ------------------------------------------------------------------
    def group_names(self, stage: str) -> list[str]:
        """Layer groups bottom to top: embedding, lstm0 .. lstm(n−1), then the stage's head."""
        top = DECODER if stage == "lm" else CLASSIFIER
        return [EMBEDDING, *(f"lstm{k}" for k in range(len(self.rnns))), top]

    def _group_modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {EMBEDDING: self.encoder, DECODER: self.decoder}
        modules.update({f"lstm{k}": rnn for k, rnn in enumerate(self.rnns)})
        modules[CLASSIFIER] = self.classifier
        return modules

    def group_of(self) -> dict[str, str]:
        """State-dict name -> group (every tensor of this model belongs to one group)."""
        return {
            f"{prefix}.{name}": group
            for group, prefix in self._prefixes().items()
            for name, _ in self._group_modules()[group].named_parameters()
        }

    def _prefixes(self) -> dict[str, str]:
        prefixes = {EMBEDDING: "encoder", DECODER: "decoder", CLASSIFIER: "classifier"}
        prefixes.update({f"lstm{k}": f"rnns.{k}" for k in range(len(self.rnns))})
        return prefixes

    def trained_groups(self, server_round: int, rounds: int) -> list[str]:
        """Groups trained this round: every LM group in the LM stage; with gradual unfreezing,
        the top k + 1 groups in round k (0-based) of the classifier stage."""
        stage, index, _ = self.stages.stage(server_round, rounds)
        names = self.group_names(stage)
        if stage == "lm":
            return names
        return names[len(names) - min(index + 1, len(names)) :]

    def configure_optimizer(self, settings: TrainingSettings, server_round: int) -> torch.optim.Optimizer:
        """Adam over this round's groups, each at its discriminative peak rate (η = the run's
        learning rate at the top group); the rest frozen. STLR scales every group per step."""
        stage, index, length = self.stages.stage(server_round, settings.rounds)
        self._stage = stage
        self._settings = settings
        self._stage_position = (index, length)
        names = self.group_names(stage)
        peaks = discriminative_rates(settings.learning_rate, len(names), self.decay)
        rates = dict(zip(names, peaks, strict=True))
        trained = set(self.trained_groups(server_round, settings.rounds))
        modules = self._group_modules()
        groups = []
        for name, module in modules.items():
            module.requires_grad_(name in trained)
            if name in trained:
                groups.append({"params": list(module.parameters()), "lr": rates[name], "group": name})
        self._peak_rates = [group["lr"] for group in groups]
        self._optimizer = torch.optim.Adam(groups, betas=ADAM_BETAS)
        self._set_rates(0, 1)
        return self._optimizer

    def before_local_training(self, data_loader: DataLoader, server_round: int) -> None:
        """Place this round on the stage's STLR clock: steps per round from the data size."""
        settings = self._settings
        if settings is None:
            return
        steps = settings.local_epochs * len(data_loader)
        if settings.max_local_steps:
            steps = min(steps, settings.max_local_steps)
        index, length = self._stage_position
        self._first_step = index * max(steps, 1)
        self._total_steps = length * max(steps, 1)
        self._step = 0
        self._set_rates(self._first_step, self._total_steps)

    def _set_rates(self, t: int, total: int) -> None:
        if self._optimizer is None:
            return
        scale = slanted_triangular(t, total, self.cut_frac, self.ratio)
        for group, peak in zip(self._optimizer.param_groups, self._peak_rates, strict=True):
            group["lr"] = peak * scale

    def training_loss(self, module: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        """This step's STLR rates set, then the stage's loss (next-token or classification)."""
        if self._optimizer is not None:
            self._set_rates(self._first_step + self._step, self._total_steps)
            self._step += 1
        if self._stage == "lm":
            return self.language_model_loss(inputs)
        return self.loss(module(inputs), targets)

    def after_local_training(self, data_loader: DataLoader, server_round: int) -> None:
        """Back to the classification objective with no schedule attached (what an auditor or
        evaluator of this instance expects)."""
        self._optimizer = None
        self._stage = CLASSIFIER

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
        """Only this round's trained groups: the LM groups in the LM stage, the unfrozen ones in
        the classifier stage; the server fills the frozen ones from the round's global model."""
        trains = self._trains(server_round, self.run_rounds())
        return tuple(name for name in self.federated_names() if trains(name))

    def _trains(self, server_round: int, rounds: int) -> Callable[[str], bool]:
        """Whether a state-dict entry is trained in this round (what is sent and aggregated)."""
        trained = set(self.trained_groups(server_round, rounds))
        group_of = self.group_of()
        return lambda name: group_of.get(name) in trained

    # --- the pretrained language model ---------------------------------------------------------
    def language_model_state(self) -> dict[str, Tensor]:
        """The tensors a general-domain LM provides: embedding, LSTMs and decoder."""
        keep = {"encoder", "rnns", "decoder"}
        return {
            name: tensor.detach().clone().contiguous()
            for name, tensor in self.state_dict().items()
            if name.split(".")[0] in keep
        }

    def load_language_model(self, state: Mapping[str, Tensor], source: str) -> None:
        """Load an LM state (names and shapes must match this model's), else ValueError."""
        expected = self.language_model_state()
        if set(state) != set(expected):
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ValueError(
                f"pretrained file {source} does not fit this ulmfit (missing {missing[:3]}, "
                f"unexpected {extra[:3]}); pretrain it with the same vocabulary and sizes"
            )
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(
                    f"pretrained tensor {name} has shape {tuple(tensor.shape)}, this ulmfit needs "
                    f"{tuple(expected[name].shape)}; pretrain with the same vocabulary and sizes"
                )
        self.load_state_dict(dict(state), strict=False)


def pretrain_language_model(
    model: ULMFiT, tokens: Tensor, epochs: int, lr: float, batch_size: int = 64, seed: int = 0
) -> list[float]:
    """General-domain LM pretraining (stage 1) on token rows `tokens` (N, T): Adam, STLR over
    all steps, every LM group at its discriminative rate. Returns the mean loss per epoch."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    names = model.group_names("lm")
    modules = model._group_modules()
    rates = discriminative_rates(lr, len(names), model.decay)
    groups = [{"params": list(modules[n].parameters()), "lr": r} for n, r in zip(names, rates, strict=True)]
    optimizer = torch.optim.Adam(groups, betas=ADAM_BETAS)
    per_epoch = -(-len(tokens) // batch_size)
    total = epochs * per_epoch
    model.train()
    history: list[float] = []
    for epoch in range(epochs):
        order = torch.randperm(len(tokens), generator=generator)
        losses = []
        for step in range(per_epoch):
            scale = slanted_triangular(epoch * per_epoch + step, total, model.cut_frac, model.ratio)
            for group, rate in zip(optimizer.param_groups, rates, strict=True):
                group["lr"] = rate * scale
            batch = tokens[order[step * batch_size : (step + 1) * batch_size]]
            optimizer.zero_grad(set_to_none=True)
            loss = model.language_model_loss(batch)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)))
    model.eval()
    return history


def save_pretrained(model: ULMFiT, path: str | Path) -> None:
    """The LM tensors as a safetensors file (no pickle), for `pretrained=<path>`."""
    from safetensors.torch import save_file

    save_file(model.language_model_state(), str(path))


def ulmfit(
    spec: InputSpec,
    embedding: int = 64,
    hidden: int = 128,
    lstm_layers: int = 2,
    classifier_hidden: int = 50,
    weight_drop: float = 0.2,
    embed_dropout: float = 0.1,
    dropout: float = 0.2,
    lm_rounds: int = 2,
    cut_frac: float = 0.1,
    ratio: float = 32.0,
    decay: float = 2.6,
    pretrained: str = "",
) -> ULMFiT:
    """Tiny AWD-LSTM classifier for token inputs (e.g. `fortunes`), ULMFiT-style: the first
    `lm_rounds` rounds (at most half the run) fine-tune it as a language model on the clients'
    texts, the rest train the concat-pooling classifier with gradual unfreezing; discriminative
    rates (÷`decay` per group) and STLR (`cut_frac`, `ratio`) in both. `pretrained` is a
    safetensors file of a general-domain LM (`save_pretrained`) of the same vocabulary and sizes."""
    for name, value in (("embedding", embedding), ("hidden", hidden), ("lstm_layers", lstm_layers)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 (got {value}); e.g. {name}=64")
    if classifier_hidden < 1:
        raise ValueError(f"classifier_hidden must be >= 1 (got {classifier_hidden}); e.g. 50")
    for name, value in (("weight_drop", weight_drop), ("embed_dropout", embed_dropout), ("dropout", dropout)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} is a drop probability in [0, 1) (got {value}); e.g. {name}=0.2")
    if lm_rounds < 0:
        raise ValueError(f"lm_rounds must be >= 0 (got {lm_rounds}); 0 skips target LM fine-tuning")
    if not 0 < cut_frac < 1:
        raise ValueError(f"cut_frac must be in (0, 1) (got {cut_frac}); the paper uses 0.1")
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1 (got {ratio}); the paper uses 32")
    if decay < 1:
        raise ValueError(f"decay must be >= 1 (got {decay}); the paper uses 2.6")
    model = ULMFiT(
        spec, embedding, hidden, lstm_layers, classifier_hidden, weight_drop, embed_dropout, dropout,
        Stages(lm_rounds), cut_frac, ratio, decay,
    )  # fmt: skip
    if pretrained:
        path = Path(pretrained)
        if not path.is_file():
            raise ValueError(
                f"pretrained file {pretrained} not found; make one with models.ulmfit.save_pretrained"
            )
        from safetensors.torch import load_file

        model.load_language_model(load_file(str(path)), pretrained)
    return model
