"""A tiny transformer text classifier: the smallest model with what text-leakage attacks face.

    tokens (B, L) -> token embedding + learned positional embedding -> LayerNorm
      -> one single-head self-attention block (Linear q, k, v, o; residual)
      -> feed-forward (Linear, GELU, Linear; residual) -> mean pool
      -> Linear head -> class logits

It exists so that the text attacks (`attacks.text.token_leakage`: token-set, DAGER) and the text audit
metrics have a model with a trainable embedding, positional embeddings and per-token Linear
projections to be tested and measured on. Padding (id 0) is masked out of attention and pooling
by default (as BERT's attention mask does); the embedding has no `padding_idx`, so with the mask
off padding is a token like any other. Not in the registry: a test and benchmark fixture.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.base import InputSpec, ZooModel

PADDING_ID = 0


class TinyTransformer(ZooModel):
    """Embedding, one attention block, mean pooling, a linear head (no `layers` chain)."""

    def __init__(
        self, spec: InputSpec, width: int, frozen_embedding: bool, mask_padding: bool, causal: bool
    ) -> None:
        super().__init__(spec)
        self.mask_padding = mask_padding
        self.causal = causal
        length = int(spec.shape[0])
        self.token_embedding = nn.Embedding(int(spec.vocab_size), width)
        self.position_embedding = nn.Embedding(length, width)
        self.norm = nn.LayerNorm(width)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.feed_forward = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.classifier = nn.Linear(width, spec.num_classes)
        self.token_embedding.weight.requires_grad_(not frozen_embedding)
        self.register_buffer("positions", torch.arange(length), persistent=False)

    def forward(self, inputs: Tensor) -> Tensor:
        embedded = self.token_embedding(inputs) + self.position_embedding(self.positions[: inputs.shape[1]])
        x = self.norm(embedded)
        q, k, v = self.query(x), self.key(x), self.value(x)
        scores = q @ k.transpose(1, 2) / math.sqrt(x.shape[-1])
        if self.causal:  # each position attends to itself and earlier positions only
            later = torch.ones(scores.shape[1:], dtype=torch.bool).triu(1)
            scores = scores.masked_fill(later, float("-inf"))
        if self.mask_padding:
            # A sequence of padding only keeps its first position, so no softmax row is empty.
            keep = (inputs != PADDING_ID) | (torch.arange(inputs.shape[1]) == 0)
            scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
            weights = keep.to(x.dtype)[:, :, None] / keep.sum(1, keepdim=True)[:, :, None]
        else:
            weights = torch.full_like(x[:, :, :1], 1.0 / x.shape[1])
        x = x + self.out(torch.softmax(scores, dim=-1) @ v)
        x = x + self.feed_forward(x)
        return self.classifier((x * weights).sum(dim=1))


def tiny_transformer(
    spec: InputSpec,
    width: int = 256,
    frozen_embedding: bool = False,
    mask_padding: bool = True,
    causal: bool = False,
) -> TinyTransformer:
    """One attention block over learned token and position embeddings of `width` dimensions.
    DAGER's span test needs more dimensions than token positions in a batch (B·L < width).
    `mask_padding` (the usual attention mask) keeps padding out of attention and pooling, so
    padded positions get no gradient; unmasked, padding is attended like any token. `causal`
    masks later positions (a decoder), so DAGER can grow the batch's sequences prefix by prefix."""
    spec.require("tokens", model="tiny-transformer")
    if width < 2:
        raise ValueError(f"width must be >= 2, got {width}; use e.g. width=256")
    return TinyTransformer(spec, width, frozen_embedding, mask_padding, causal)
