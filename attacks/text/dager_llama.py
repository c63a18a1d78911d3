"""DAGER (Petrov et al., NeurIPS 2024) on a pretrained Llama-style causal LM (SmolLM2).

`attacks.text.token_leakage.DagerAttack` runs the span test on fedsim's own token models; this module
runs it on a transformers decoder, whose layout is fixed: token embedding, then blocks
`layers.i` of RMSNorm → self_attn.{q,k,v}_proj (RoPE acts after the projections) → ... .

The gradient of a Linear applied per token is Σ_t δ_t x_tᵀ, so every token's input x_t with
δ_t ≠ 0 lies in the row space of the stacked q/k/v weight gradients, of rank ≤ the number of
tokens. Stage 1: the input of layer 0's projections is RMSNorm(embedding[token]), the same at
every position, so the whole vocabulary is tested at once and the passing tokens are the batch's
token set. Stage 2: layer 1's input at position p depends on tokens 0..p only (causal), so
sequences grow one token at a time from the token set, keeping the prefixes whose layer-1 input
at their last position lies in the span of layer 1's gradient; a prefix none of whose
extensions passes is a whole sequence.

The span test: an orthonormal basis of the row space (SVD in float64 of the float32 gradient;
its rank counts the singular values above `rank_tol` times the largest, the float32 gradient's
noise floor lies near 1e-7 of it), then a candidate passes when the residual of its input after
projection onto that basis is below `distance_tol` (1e-3) of its norm. Measured on SmolLM2:
members at <= 1.5e-5 (block 0, batch 8) and ~1e-7 (block 1); the closest non-member token at 0.13
and the closest wrong prefix extension at 0.02, so the threshold has >= 20x margin either side.
A gradient whose rank reaches the dimension of the
space the inputs can take spans every candidate: the attack then declines (`AttackError`)
rather than report the whole vocabulary.

What the client sends (`lm_batch`, `lm_gradients`): texts tokenised as the tokenizer does (no
BOS for SmolLM2), each followed by EOS, right-padded with the pad id, labels -100 on padding,
mean next-token loss. A position's input gets gradient only if its output feeds the loss: the
final EOS predicts nothing, so it is never recovered (it is known anyway); padding neither.

LoRA (peft): only the adapters train. The A gradient of `x ↦ B A x` is Bᵀ δ_t x_tᵀ summed, so
its row space lies in the span of the inputs but has rank ≤ r; B's gradient is δ_t (A x_t)ᵀ
summed, whose row space is in the r-dimensional image of A. With B = 0 (peft's initialisation)
the A gradient is zero. `span_test` exposes the raw test on either, for the benchmark to
measure what it recovers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attacks.base import AttackError, ObservedUpdate, Reconstruction
from attacks.text.token_leakage import ORDERED_KEY, TOKEN_SET_KEY, UNKNOWN

PROJECTIONS = ("q_proj", "k_proj", "v_proj")
CHUNK = 2048  # candidate sequences per forward pass


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(1)


class _StopForwardError(Exception):
    """Raised by a pre-hook once the wanted layer input is captured: the rest of the LM is skipped."""


@dataclass(frozen=True)
class Decoder:
    """Where the attack reads a causal LM: the module it calls, its blocks, and their names."""

    lm: nn.Module  # called as lm(input_ids=...)
    blocks: nn.ModuleList
    prefix: str  # the blocks' name relative to the root the gradients are keyed by

    def projections(self, layer: int) -> list[tuple[str, nn.Module]]:
        attention = self.blocks[layer].self_attn
        return [(f"{self.prefix}.{layer}.self_attn.{p}", getattr(attention, p)) for p in PROJECTIONS]


def find_decoder(root: nn.Module) -> Decoder:
    """The transformers causal LM inside `root` (itself, a peft wrapper, or a zoo model holding one)."""
    lm = next(
        (m for _, m in root.named_modules() if hasattr(m, "config") and hasattr(m, "get_input_embeddings")),
        None,
    )
    for name, module in root.named_modules():
        if (
            lm is not None
            and isinstance(module, nn.ModuleList)
            and len(module) >= 2
            and all(hasattr(getattr(module[0], "self_attn", None), p) for p in PROJECTIONS)
        ):
            return Decoder(lm, module, name)
    raise AttackError(
        f"{type(root).__name__} holds no transformers decoder with blocks of self_attn.q_proj/k_proj/"
        "v_proj (at least two); dager-llm reads a Llama-style causal LM"
    )


def layer_inputs(decoder: Decoder, layer: int, input_ids: Tensor, cache: object | None = None) -> Tensor:
    """The input (N, L, d) of block `layer`'s attention projections for sequences (N, L), float64.
    Eval mode (no dropout, LoRA dropout off); the blocks after `layer` are never run. With a
    transformers `DynamicCache`, `input_ids` continue the cached prefixes, and the blocks before
    `layer` add their keys and values to it."""
    module = decoder.projections(layer)[0][1]
    captured: list[Tensor] = []

    def grab(_module: nn.Module, args: tuple) -> None:
        captured.append(args[0].detach())
        raise _StopForwardError

    hook = module.register_forward_pre_hook(grab)
    training = decoder.lm.training
    decoder.lm.eval()
    try:
        with torch.no_grad():
            decoder.lm(input_ids=input_ids, past_key_values=cache, use_cache=cache is not None)
    except _StopForwardError:
        pass
    finally:
        hook.remove()
        decoder.lm.train(training)
    return captured[0].double()


def chunked_inputs(decoder: Decoder, layer: int, input_ids: Tensor, position: int) -> Tensor:
    """`layer_inputs` at one position for many sequences, in chunks of `CHUNK`."""
    return torch.cat([layer_inputs(decoder, layer, c)[:, position] for c in input_ids.split(CHUNK)])


@dataclass(frozen=True)
class Span:
    """An orthonormal basis (d, rank) of a gradient's row space, and the spectrum it was cut from."""

    basis: Tensor
    rank: int
    singular: Tensor

    def residual(self, inputs: Tensor) -> Tensor:
        """Relative distance of each row of `inputs` (N, d) to the span; 1 for a zero input (a
        padding_idx embedding row: it adds nothing to any gradient, so the test cannot see it)."""
        inputs = inputs.double()
        rest = inputs - (inputs @ self.basis) @ self.basis.T
        norm = inputs.norm(dim=-1)
        return torch.where(norm > 0, rest.norm(dim=-1) / norm.clamp_min(1e-300), torch.ones_like(norm))


def row_span(matrices: Sequence[Tensor], rank_tol: float) -> Span:
    """The row space of the stacked matrices (all with the same number of columns), in float64."""
    stacked = torch.cat([m.detach().double().reshape(m.shape[0], -1) for m in matrices])
    _, singular, vh = torch.linalg.svd(stacked, full_matrices=False)
    if float(singular[0]) == 0.0:
        raise AttackError("the gradient is zero: it spans no inputs (a frozen layer, or LoRA with B = 0)")
    rank = int((singular > singular[0] * rank_tol).sum())
    return Span(vh[:rank].T, rank, singular)


def input_space_rank(inputs: Tensor, rank_tol: float) -> int:
    """Dimensions the layer's inputs can take (sample rows (N, d), N ≫ d): a gradient of that rank
    spans every candidate and decides nothing."""
    singular = torch.linalg.svdvals(inputs.double())
    return int((singular > singular[0] * rank_tol).sum())


def _weight_gradients(gradients: dict[str, Tensor], names: list[str]) -> list[Tensor]:
    """The full weight gradients of the projections (plain Linear, or a peft layer's base_layer)."""
    found = []
    for name in names:
        for key in (f"{name}.weight", f"{name}.base_layer.weight"):
            if key in gradients and bool((gradients[key] != 0).any()):
                found.append(gradients[key])
                break
    return found


class DagerLlamaAttack:
    """DAGER on a Llama-style causal LM from the q/k/v weight gradients of its first two blocks."""

    name = "dager-llm"

    def __init__(self, rank_tol: float = 1e-5, distance_tol: float = 1e-3, max_prefixes: int = 4) -> None:
        self.rank_tol = rank_tol  # singular values below this share of the largest are float32 noise
        self.distance_tol = distance_tol  # a candidate passes below this relative residual
        self.max_prefixes = max_prefixes  # prefix extension gives up beyond this many per sequence

    def reconstruct(self, update: ObservedUpdate) -> Reconstruction:
        return self.attack(update.model, update.gradients, update.batch_size)

    def attack(self, root: nn.Module, gradients: dict[str, Tensor], batch_size: int) -> Reconstruction:
        """Token set (stage 1) and sequences (stage 2) from gradients keyed by `root`'s parameter names."""
        start = time.perf_counter()
        decoder = find_decoder(root)
        first = self.span(decoder, gradients, 0)
        vocabulary = torch.arange(decoder.lm.get_input_embeddings().num_embeddings)
        inputs = chunked_inputs(decoder, 0, vocabulary[:, None], 0)
        sample = torch.randperm(len(inputs), generator=_seeded())[: 4 * inputs.shape[1]]
        self._decidable(first, inputs[sample], 0)
        distances = first.residual(inputs)
        token_set = vocabulary[distances < self.distance_tol]
        diagnostics: dict = {
            ORDERED_KEY: True,
            TOKEN_SET_KEY: token_set.tolist(),
            "span_rank": [first.rank],
            "candidates": f"the whole vocabulary ({len(vocabulary)} tokens)",
        }
        second = self.span(decoder, gradients, 1)
        self._decidable(second, self._sample_inputs(decoder, 1, len(vocabulary)), 1)
        diagnostics["span_rank"].append(second.rank)
        sequences, note = self.extend_prefixes(decoder, second, token_set, batch_size)
        diagnostics["note"] = note
        return Reconstruction(sequences.float(), None, time.perf_counter() - start, diagnostics)

    def span(self, decoder: Decoder, gradients: dict[str, Tensor], layer: int) -> Span:
        """The row space of block `layer`'s stacked q/k/v weight gradients."""
        names = [n for n, _ in decoder.projections(layer)]
        grads = _weight_gradients(gradients, names)
        if not grads:
            raise AttackError(
                f"no non-zero weight gradient for {names}: block {layer}'s projections do not train "
                "(for LoRA-only updates see span_test on the adapter gradients)"
            )
        return row_span(grads, self.rank_tol)

    def _decidable(self, span: Span, inputs: Tensor, layer: int) -> None:
        space = input_space_rank(inputs, self.rank_tol)
        if span.rank >= space:
            raise AttackError(
                f"block {layer}'s gradient has rank {span.rank}, as many as the {space} dimensions its "
                "inputs take: the span holds every candidate (more tokens than the hidden width, or "
                "noise on the gradient), so the attack cannot decide which tokens are in the batch"
            )

    @staticmethod
    def _sample_inputs(decoder: Decoder, layer: int, vocab: int) -> Tensor:
        """Layer inputs of random sequences, enough rows to span the space they can take."""
        width = decoder.blocks[layer].self_attn.q_proj.in_features
        tokens = torch.randint(0, vocab, (-(-4 * width // 16), 16), generator=_seeded())
        return layer_inputs(decoder, layer, tokens).reshape(-1, width)

    def extend_prefixes(
        self, decoder: Decoder, span: Span, token_set: Tensor, batch_size: int, max_length: int = 512
    ) -> tuple[Tensor, str]:
        """DAGER's second stage: grow prefixes one token at a time from the token set, keeping those
        whose input to block 1 at their last position lies in its gradient's span. Block 0's keys
        and values of the surviving prefixes are cached, so each trial costs one token.

        One extension is uninformative: a token repeating a prefix made of that token alone (t t):
        attention over equal values returns that value, so its input equals the prefix's own, which
        passed. Such trials (input within `distance_tol` of the parent's) are dropped: a text that
        starts with a repeated token loses the repeats (DAGER has the same blind spot)."""
        from transformers import DynamicCache  # the attack needs transformers only here

        limit = self.max_prefixes * max(batch_size, 1)
        prefixes: list[list[int]] = [[]]
        finished: list[list[int]] = []
        tokens = token_set.tolist()
        cache = DynamicCache()
        parents = torch.zeros((1, span.basis.shape[0]), dtype=torch.float64)  # last inputs of prefixes
        for position in range(max_length):
            trials = [[*prefix, t] for prefix in prefixes for t in tokens]
            if not trials:
                break
            index = torch.arange(len(prefixes)).repeat_interleave(len(tokens))
            if position:  # one cached prefix per trial
                cache.batch_select_indices(index)
            inputs = layer_inputs(decoder, 1, torch.tensor([trial[-1:] for trial in trials]), cache)[:, 0]
            moved = (inputs - parents[index]).norm(dim=-1) > self.distance_tol * inputs.norm(dim=-1)
            keep_mask = (span.residual(inputs) < self.distance_tol) & (moved | (position == 0))
            kept = keep_mask.nonzero().reshape(-1)
            cache.batch_select_indices(kept)
            parents = inputs[kept]
            passed = [trials[i] for i in kept.tolist()]
            extended = {tuple(trial[:-1]) for trial in passed}
            finished += [prefix for prefix in prefixes if prefix and tuple(prefix) not in extended]
            prefixes = passed
            if len(prefixes) > limit:
                raise AttackError(
                    f"{len(prefixes)} prefixes pass block 1's span test at position {position}, more "
                    f"than {limit}: the test does not separate them (a noisy gradient?)"
                )
        finished += prefixes
        if not finished:
            raise AttackError("no prefix passes block 1's span test: the token set has no first token")
        length = max(len(s) for s in finished)
        sequences = torch.full((len(finished), length), UNKNOWN, dtype=torch.int64)
        for k, sequence in enumerate(finished):
            sequences[k, : len(sequence)] = torch.tensor(sequence)
        return sequences, f"causal: {len(finished)} sequences grown through block 1 of {batch_size}"


def span_test(
    decoder: Decoder,
    matrices: Sequence[Tensor],
    candidate_map: Callable[[Tensor], Tensor],
    rank_tol: float,
) -> tuple[Tensor, Span]:
    """The raw stage-1 test on any gradients whose rows live where `candidate_map` sends block 0's
    inputs (identity for weight or LoRA-A gradients, x ↦ A x for LoRA-B): the relative residual of
    every vocabulary token, and the span. No declining: the benchmark measures what it gives."""
    span = row_span(matrices, rank_tol)
    vocabulary = torch.arange(decoder.lm.get_input_embeddings().num_embeddings)
    inputs = candidate_map(chunked_inputs(decoder, 0, vocabulary[:, None], 0))
    return span.residual(inputs), span


@dataclass(frozen=True)
class LMBatch:
    """A client's causal-LM batch: ids (B, L) right-padded, attention mask, labels (-100 on padding)."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    texts: list[list[int]]  # each text's token ids, without EOS and padding


def lm_batch(tokenizer, texts: Sequence[str]) -> LMBatch:
    """Tokenise as the tokenizer does, append EOS to each text, right-pad with the pad id."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    ids = [list(tokenizer(text)["input_ids"]) for text in texts]
    length = max(len(i) for i in ids) + 1
    input_ids = torch.full((len(ids), length), pad, dtype=torch.int64)
    mask = torch.zeros((len(ids), length), dtype=torch.int64)
    for row, sequence in enumerate(ids):
        input_ids[row, : len(sequence) + 1] = torch.tensor([*sequence, eos])
        mask[row, : len(sequence) + 1] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return LMBatch(input_ids, mask, labels, ids)


def lm_gradients(lm: nn.Module, batch: LMBatch) -> dict[str, Tensor]:
    """The gradient of the mean next-token loss for every trainable parameter (what FedSGD sends)."""
    params = {n: p for n, p in lm.named_parameters() if p.requires_grad}
    loss = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    grads = torch.autograd.grad(loss, list(params.values()), materialize_grads=True)
    return {n: g.detach() for n, g in zip(params, grads, strict=True)}
