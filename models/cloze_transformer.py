"""Cloze two-tower transformer (Baevski et al., EMNLP 2019, "Cloze-driven pretraining of
self-attention networks"), tiny, for CPU.

    tokens x_1..x_T -> [BOS, x_1..x_T, EOS] -> shared embedding + positions
      forward tower  (causal):       f_j sees positions <= j
      backward tower (anti-causal):  b_j sees positions >= j
      combination attention at token i: query f_{i-1} + b_{i+1},
          keys/values f_{<i} and b_{>i} only  -> LayerNorm -> tied output projection -> logits_i

Every position is predicted in one pass and none sees its own token: f_{<i} has read tokens
before i, b_{>i} tokens after it. BOS and EOS (learned vectors, not vocabulary ids) make the
first and last queries well defined. The training target is the input itself (a language model),
so the model derives its targets from the inputs (`sample_targets`); padding (id 0) is never a
target: the loss and the metrics are means over non-padding tokens, and the evaluator weights each
batch by its token count (`metric_weight`), so they are exact token-level means. Padding is
attended as context (it says where the text ends, never what a token is).

`direction="forward"` is the same-size unidirectional baseline: one causal tower of twice the
layers and the same combination layer with query f_{i-1} over f_{<i} (a left-to-right language
model). Its parameter count equals the cloze model's (the backward tower's layers move into the
forward tower).

The output head solves no label problem (it scores the vocabulary at every position), so
`head = "other"`: analytic label attacks decline it; `embed` / `forward_embedded` split at the
(token) embedding for the end-to-end identifiability analysis.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.base import InputSpec, ZooModel

PAD = 0
Direction = Literal["both", "forward"]
DIRECTIONS: tuple[str, ...] = ("both", "forward")


def tower_mask(length: int, causal: bool) -> Tensor:
    """Boolean (L, L) mask, True where attention is *blocked*: a causal tower's position j sees
    positions <= j, an anti-causal one's positions >= j."""
    upper = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    return upper if causal else upper.T


def combination_mask(tokens: int, backward: bool) -> Tensor:
    """Boolean (T, K) mask, True where blocked, for the combination attention of the T token
    positions over the keys [f_0 .. f_{T+1}] (+ [b_0 .. b_{T+1}] when `backward`), in padded
    coordinates (position 0 is BOS, T + 1 is EOS, token i is position i). Token i may attend
    only to f_j with j < i and b_j with j > i."""
    length = tokens + 2
    rows = torch.arange(1, tokens + 1).unsqueeze(1)
    cols = torch.arange(length).unsqueeze(0)
    allowed = cols < rows
    if backward:
        allowed = torch.cat([allowed, cols > rows], dim=1)
    return ~allowed


class Tower(nn.Module):
    """A pre-LayerNorm transformer encoder stack with a fixed one-directional mask."""

    def __init__(self, width: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.stack = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        return self.norm(self.stack(states, mask=mask))


class ClozeTransformer(ZooModel):
    """Two towers (or one, `direction="forward"`) and a combination attention; logits (B, T, V)."""

    head = "other"
    metric_names = ("accuracy",)

    def __init__(
        self, spec: InputSpec, width: int, layers: int, heads: int, dropout: float, direction: Direction
    ) -> None:
        super().__init__(spec)
        vocab = int(spec.vocab_size or 0)
        length = spec.shape[0]
        self.direction = direction
        self.width = width
        self.tokens = nn.Embedding(vocab, width, padding_idx=PAD)
        self.boundary = nn.Parameter(torch.randn(2, width) * 0.02)  # BOS, EOS
        self.positions = nn.Parameter(torch.randn(length + 2, width) * 0.02)
        both = direction == "both"
        self.forward_tower = Tower(width, layers if both else 2 * layers, heads, dropout)
        self.backward_tower = Tower(width, layers, heads, dropout) if both else None
        self.combine = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.out_norm = nn.LayerNorm(width)
        self.out_bias = nn.Parameter(torch.zeros(vocab))
        nn.init.normal_(self.tokens.weight, std=width**-0.5)
        with torch.no_grad():
            self.tokens.weight[PAD].zero_()
        self.register_buffer("causal", tower_mask(length + 2, causal=True), persistent=False)
        self.register_buffer("anticausal", tower_mask(length + 2, causal=False), persistent=False)
        self.register_buffer("combination", combination_mask(length, both), persistent=False)

    # --- the continuous input ------------------------------------------------------------------
    def embed(self, inputs: Tensor) -> Tensor:
        """Token embeddings (B, T, width), scaled by sqrt(width) (the embedding is tied to the
        output projection, whose scale is 1/sqrt(width))."""
        return self.tokens(inputs) * math.sqrt(self.width)

    def forward_embedded(self, embedded: Tensor) -> Tensor:
        batch = embedded.shape[0]
        bos = self.boundary[0].expand(batch, 1, -1)
        eos = self.boundary[1].expand(batch, 1, -1)
        states = torch.cat([bos, embedded, eos], dim=1) + self.positions
        forward = self.forward_tower(states, self.causal)
        query = forward[:, :-2]  # f_{i-1} for tokens i = 1..T
        keys = forward
        if self.backward_tower is not None:
            backward = self.backward_tower(states, self.anticausal)
            query = query + backward[:, 2:]  # + b_{i+1}
            keys = torch.cat([forward, backward], dim=1)
        combined, _ = self.combine(query, keys, keys, attn_mask=self.combination, need_weights=False)
        hidden = self.out_norm(combined + query)
        return hidden @ self.tokens.weight.T / math.sqrt(self.width) + self.out_bias

    def forward(self, inputs: Tensor) -> Tensor:
        return self.forward_embedded(self.embed(inputs))

    # --- targets, loss and metrics: the input is the target -------------------------------------
    def sample_targets(self, inputs: Tensor, labels: Tensor) -> Tensor:
        """The tokens themselves (B, T): a language model predicts its input, not the label."""
        return inputs

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy over the batch's non-padding tokens (0 for a batch of padding)."""
        flat = F.cross_entropy(outputs.flatten(0, 1), targets.flatten(), ignore_index=PAD, reduction="sum")
        return flat / (targets != PAD).sum().clamp(min=1)

    def predict(self, outputs: Tensor) -> Tensor:
        return outputs.argmax(dim=-1)

    def metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        """Fill-in (cloze) accuracy: the share of non-padding tokens predicted exactly."""
        real = targets != PAD
        correct = (self.predict(outputs) == targets) & real
        return {"accuracy": float(correct.sum()) / max(int(real.sum()), 1)}

    def metric_weight(self, targets: Tensor) -> int:
        """Batch means are over non-padding tokens, so the evaluator weights by their count."""
        return int((targets != PAD).sum())


def cloze_transformer(
    spec: InputSpec,
    width: int = 64,
    layers: int = 2,
    heads: int = 2,
    dropout: float = 0.1,
    direction: str = "both",
) -> ClozeTransformer:
    """The cloze model (`direction="both"`) or its same-size left-to-right baseline
    (`direction="forward"`, one tower of 2·layers) for token inputs."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if width < 1 or layers < 1 or heads < 1:
        raise ValueError(f"width, layers and heads must be >= 1, got {width}, {layers}, {heads}")
    if width % heads:
        raise ValueError(f"width {width} must be divisible by heads {heads}; change one of them")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return ClozeTransformer(spec, width, layers, heads, dropout, direction)  # type: ignore[arg-type]
