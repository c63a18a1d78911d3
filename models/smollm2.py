"""SmolLM2-135M (a 30-layer Llama, tied 49,152-token embeddings) fine-tuned with LoRA adapters.

    BPE ids x_1..x_T (right-padded with id 0) -> frozen SmolLM2 with LoRA on `targets` of
      `layers` -> logits (B, T, V); the loss is next-token cross-entropy over non-pad targets

The base's 134.5 M parameters never train and never travel: every node rebuilds them from the
installed package, and `federated_names` is the LoRA tensors alone (q_proj and v_proj at rank 8
on all 30 layers: 30 × 2 × 8 × (576 + 576 or 192) = 0.46 M numbers). peft sets LoRA's B to zero,
so the adapted model starts exactly at the pretrained one; A is drawn from torch's RNG, which the
run seeds before building, so the initial adapters repeat under a seed.

Option `train_blocks` also trains whole blocks (base weights included), which then travel too.

A language model predicts its own input (`sample_targets` returns the ids); the topic labels only
partition the clients. Right padding under a causal mask never reaches a real token, so no
attention mask is needed and `forward_embedded(embed(x)) == forward(x)`. The output scores the
vocabulary, solving no label problem: `head = "other"`.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.base import InputSpec, TrainingSettings
from models.frozen_base import FrozenBaseModel
from models.minilm import require_vocabulary
from models.pretrained import SMOLLM2_INSTALL, PretrainedUnavailableError, load_smollm2

VOCABULARY = "smollm2"
DATASET = "fortunes-smollm2"
PAD = 0  # <|endoftext|>, as fortunes-smollm2 pads
LAYERS = 30
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class SmolLM2LoRA(FrozenBaseModel):
    """SmolLM2 with LoRA adapters; logits (B, T, V) at every position."""

    head = "other"
    metric_names = ("accuracy", "perplexity")
    evaluation_batch_size = 32  # logits of 32 x 32 positions x 49,152 tokens: 200 MB

    def __init__(self, spec: InputSpec, lm: nn.Module) -> None:
        super().__init__(spec)
        self.lm = lm  # a peft PeftModel: the base frozen, the adapters trainable

    def configure_optimizer(self, settings: TrainingSettings, server_round: int) -> torch.optim.Optimizer:
        """AdamW over the adapters at the run's learning rate (e.g. 1e-3): LoRA's usual optimiser;
        SGD barely moves B from zero at rates that keep the base's logits stable."""
        return torch.optim.AdamW(self.trainable_parameters(), lr=settings.learning_rate, weight_decay=0.0)

    def full_blocks(self) -> tuple[int, ...]:
        """Blocks trained in full beside the adapters (`train_blocks`): their base weights train."""
        return tuple(
            sorted(
                {
                    int(n.split(".layers.")[1].split(".")[0])
                    for n in self.federated_names()
                    if ".lora_" not in n
                }
            )
        )

    def exposure(self) -> str:
        blocks = self.full_blocks()
        if blocks:
            admits = (
                "both first blocks train, so their q/k/v weight gradients admit DAGER's exact recovery "
                "(attack dager-llm) while the batch has fewer tokens than the width (576)"
                if blocks[:2] == (0, 1)
                else "DAGER (dager-llm) needs blocks 0 and 1 to train; it declines here"
            )
            return (
                f"blocks {list(blocks)} train in full beside the adapters: {admits}. " + self._lora_exposure()
            )
        return self._lora_exposure()

    def _lora_exposure(self) -> str:
        config = self.lm.peft_config["default"]
        rank, layers = int(config.r), list(config.layers_to_transform)
        contiguous = layers == list(range(layers[0], layers[-1] + 1))
        where = f"layers {layers[0]}-{layers[-1]}" if contiguous else f"layers {layers}"
        targets = "+".join(sorted(config.target_modules))
        return (
            f"an update carries only LoRA's A (r x in) and B (out x r) at rank {rank} on {targets} of "
            f"{where}; the token embedding (tied to the output) is frozen, so the token-set attack reveals "
            "no tokens. A's gradient is B^T d(out) x^T: its rows lie in the span of the layer's input "
            f"vectors x_t but number at most {rank}, and B starts at zero (A's gradient is exactly zero "
            "until B has trained); B's gradient d(out) (A x)^T sees the inputs only through their "
            f"{rank}-dimensional projections A x_t. DAGER's span test on layer 0 needs the span of all T "
            f"input vectors, so it applies to A's gradient only when a text has at most {rank} tokens and "
            f"B is non-zero (a later round); beyond that the update exposes rank-{rank} summaries of the "
            "layer inputs, which no attack here inverts."
        )

    # --- the continuous input ------------------------------------------------------------------
    def embed(self, inputs: Tensor) -> Tensor:
        return self.lm.get_input_embeddings()(inputs)

    def forward_embedded(self, embedded: Tensor) -> Tensor:
        return self.lm(inputs_embeds=embedded, use_cache=False).logits

    def forward(self, inputs: Tensor) -> Tensor:
        return self.forward_embedded(self.embed(inputs))

    # --- targets, loss and metrics: the next token ----------------------------------------------
    def sample_targets(self, inputs: Tensor, labels: Tensor) -> Tensor:
        """The ids themselves (B, T); `loss` pairs position t's logits with token t + 1."""
        return inputs

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy over the non-pad targets (0 for a batch of padding)."""
        logits, following = outputs[:, :-1], targets[:, 1:]
        total = F.cross_entropy(logits.flatten(0, 1), following.flatten(), ignore_index=PAD, reduction="sum")
        return total / (following != PAD).sum().clamp(min=1)

    def predict(self, outputs: Tensor) -> Tensor:
        return outputs.argmax(dim=-1)

    def metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        """Next-token accuracy over non-pad targets, and the batch's perplexity exp(mean CE). The
        evaluator averages batch perplexities by their token counts: exact over one batch (the
        run's eval_loss gives the exact exp(mean CE) over any number)."""
        following = targets[:, 1:]
        real = following != PAD
        correct = (self.predict(outputs[:, :-1]) == following) & real
        accuracy = float(correct.sum()) / max(int(real.sum()), 1)
        return {"accuracy": accuracy, "perplexity": math.exp(float(self.loss(outputs, targets)))}

    def metric_weight(self, targets: Tensor) -> int:
        """Means are over the predicted (non-pad, next) tokens, so the evaluator weights by them."""
        return int((targets[:, 1:] != PAD).sum())


def parse_layers(text: str, option: str = "layers") -> tuple[int, ...]:
    """`"all"`, one range `"24-29"` or ids joined by `+` (`"0+15+29"`) as sorted layer ids."""
    if text == "all":
        return tuple(range(LAYERS))
    try:
        if "-" in text:
            first, last = (int(part) for part in text.split("-"))
            chosen = set(range(first, last + 1))
        else:
            chosen = {int(part) for part in text.split("+")}
    except ValueError:
        chosen = set()
    if not chosen or min(chosen) < 0 or max(chosen) >= LAYERS:
        raise ValueError(
            f"{option}={text!r} is not a set of SmolLM2 layers (0-{LAYERS - 1}); "
            "write all, a range such as 24-29, or ids such as 0+15+29"
        )
    return tuple(sorted(chosen))


def parse_targets(text: str) -> tuple[str, ...]:
    targets = tuple(part.strip() for part in text.split("+"))
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown or not targets:
        raise ValueError(
            f"targets={text!r} names no LoRA target {unknown}; join projections of "
            f"{', '.join(PROJECTIONS)} with +, e.g. q_proj+v_proj"
        )
    return targets


def smollm2(
    spec: InputSpec,
    rank: int = 8,
    alpha: float = 16.0,
    targets: str = "q_proj+v_proj",
    layers: str = "all",
    train_blocks: str = "",
) -> SmolLM2LoRA:
    """SmolLM2-135M with LoRA of `rank` (scale alpha / rank) on the `targets` projections
    (joined by +) of `layers` ("all", "24-29" or "0+15+29"); takes `fortunes-smollm2`.
    `train_blocks` (same syntax, default none) also trains those whole blocks, e.g. "0+1" for the
    threat DAGER studies: the first blocks fine-tuned, their full weights in every update."""
    require_vocabulary(spec, "smollm2", VOCABULARY, DATASET)
    full_blocks = parse_layers(train_blocks, "train_blocks") if train_blocks else ()
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    chosen_targets, chosen_layers = parse_targets(targets), parse_layers(layers)
    if importlib.util.find_spec("peft") is None:
        raise PretrainedUnavailableError(f"peft is not installed; install it with: {SMOLLM2_INSTALL}")
    pretrained = load_smollm2()
    if len(pretrained.tokenizer) != spec.vocab_size:
        raise ValueError(f"SmolLM2 has {len(pretrained.tokenizer)} token ids but the spec {spec.vocab_size}")
    from peft import LoraConfig, get_peft_model  # optional: imported only once it is known installed

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(chosen_targets),
        layers_to_transform=list(chosen_layers),
        lora_dropout=0.0,
        bias="none",
    )
    lm = get_peft_model(pretrained.model, config)
    for name, parameter in lm.named_parameters():
        if any(f".layers.{block}." in name for block in full_blocks):
            parameter.requires_grad_(True)
    return SmolLM2LoRA(spec, lm)
