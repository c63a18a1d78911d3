"""MiniLM (all-MiniLM-L6-v2, a 6-layer BERT of 22.7 M parameters) fine-tuned for topic labels.

    WordPiece ids [CLS] … [SEP] [PAD]… -> pretrained encoder -> mean over the non-pad tokens
      -> linear head -> class logits

Only the top `train_layers` encoder layers and the head train; the embeddings and the lower
layers stay as pretrained. Every node rebuilds the same frozen part from the installed package,
so `federated_names` is the trained layers and the head: what the clients send and the server
averages (`train_layers=0` is a linear probe: the head alone travels).

The ids must come from MiniLM's own tokenizer (`fortunes-minilm`): the builder checks
`spec.vocabulary` before loading any weight, so a registry-wide sweep that builds every model
for every spec stays fast.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.base import InputSpec, UnsupportedInputError
from models.frozen_base import FrozenBaseModel
from models.pretrained import load_minilm

VOCABULARY = "minilm"
DATASET = "fortunes-minilm"
PAD = 0  # [PAD]


def require_vocabulary(spec: InputSpec, model: str, vocabulary: str, dataset: str) -> None:
    """UnsupportedInputError unless `spec` holds token ids of the pretrained `vocabulary` (cheap:
    checked before any weight is read)."""
    if spec.vocabulary != vocabulary:
        if spec.modality != "tokens":
            given = f"{spec.modality} inputs"
        elif spec.vocabulary is None:
            given = "fedsim's own word vocabulary"
        else:
            given = f"{spec.vocabulary!r} ids"
        raise UnsupportedInputError(
            f"model {model!r} reads only {vocabulary} token ids, not {given}; use --dataset {dataset}"
        )


class MiniLMClassifier(FrozenBaseModel):
    """The pretrained encoder, mean pooling over non-pad tokens and a linear topic head."""

    def __init__(self, spec: InputSpec, encoder: nn.Module, train_layers: int) -> None:
        super().__init__(spec)
        self.encoder = encoder
        self.classifier = nn.Linear(int(encoder.config.hidden_size), spec.num_classes)
        layers = self.encoder.encoder.layer
        self.trained_layers = tuple(range(len(layers) - train_layers, len(layers)))
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)
        for index in self.trained_layers:
            layers[index].requires_grad_(True)

    def exposure(self) -> str:
        first = self.trained_layers[0] if self.trained_layers else None
        layers = (
            "the head alone (a linear probe)"
            if first is None
            else f"encoder layers {first}-{self.trained_layers[-1]} and the head"
        )
        attention = (
            ""
            if first is None
            else f" Layer {first}'s query/key/value gradients lie in the span of its inputs, but those are "
            f"contextual states after {first} frozen layers (each depends on the whole text), so DAGER's "
            "per-token span test has no candidate set to test: it needs the inputs of the first layer."
        )
        return (
            f"an update carries {layers}; the word-piece embedding is frozen (its gradient is zero), so "
            "the token-set attack reveals no tokens." + attention + " The head's gradient of a batch-1 "
            "update is (p - y) x pooled, so its weight rows divided by its bias entries give the text's "
            "mean-pooled sentence vector exactly (what embedding-inversion attacks start from)."
        )

    # --- the continuous input ------------------------------------------------------------------
    def embed(self, inputs: Tensor) -> Tensor:
        """Word-piece embeddings (B, T, 384), before positions and the embedding LayerNorm."""
        return self.encoder.embeddings.word_embeddings(inputs)

    def forward_embedded(self, embedded: Tensor) -> Tensor:
        """Padding is read off the embedded input itself (its rows equal [PAD]'s embedding), so
        `forward_embedded(embed(x)) == forward(x)` without the ids."""
        pad = self.encoder.embeddings.word_embeddings.weight[PAD]
        mask = (embedded != pad).any(dim=-1)
        return self._classify(embedded, mask)

    def forward(self, inputs: Tensor) -> Tensor:
        return self._classify(self.embed(inputs), inputs != PAD)

    def _classify(self, embedded: Tensor, mask: Tensor) -> Tensor:
        states = self.encoder(inputs_embeds=embedded, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.classifier(pooled)


def minilm(spec: InputSpec, train_layers: int = 2) -> MiniLMClassifier:
    """MiniLM with its top `train_layers` (0-6) encoder layers and a topic head fine-tuned; takes
    `fortunes-minilm` (MiniLM's WordPiece ids)."""
    require_vocabulary(spec, "minilm", VOCABULARY, DATASET)
    if not 0 <= train_layers <= 6:
        raise ValueError(f"train_layers must be in 0..6 (MiniLM has 6 encoder layers), got {train_layers}")
    pretrained = load_minilm()
    if len(pretrained.tokenizer) != spec.vocab_size:
        raise ValueError(f"MiniLM has {len(pretrained.tokenizer)} token ids but the spec {spec.vocab_size}")
    return MiniLMClassifier(spec, pretrained.model, train_layers)
