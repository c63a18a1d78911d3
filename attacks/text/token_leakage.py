"""Exact text leakage from the gradients of token models: the token set, then the sequences.

`token-set`: a token embedding's gradient is non-zero exactly in the rows of the tokens in the
batch (the lookup routes each position's gradient to its token's row), so the server reads the
set of tokens off the update; positions and counts are not revealed. A `padding_idx` row gets no
gradient, so the padding token is never revealed by it (the attack says so).

`dager` (Petrov et al., NeurIPS 2024): the gradient of a Linear layer applied per token is
Σ_i δ_i x_iᵀ, so every token's input x_i lies in the row space of ∂L/∂W, of rank at most B·L. A
candidate token t at position p belongs to the batch exactly when its layer input (embedding of t,
plus position p's embedding, plus whatever per-token map comes before, e.g. a LayerNorm) has zero
distance to that span. With positional embeddings the test is per position, so a batch-1 sequence
is recovered in order. For B > 1 the token set stays exact, but the per-position sets can hold
extra tokens: with additive positions, a token s at position a and a token t at positions a and b
put (s, b) in the span too, as e_s + p_b = (e_s + p_a) - (e_t + p_a) + (e_t + p_b). The
For a causal model (a later per-token Linear's input at a position ignores later tokens) the
attack grows the sequences prefix by prefix, keeping the prefixes whose input to that later Linear
lies in its gradient's span (DAGER's second stage). Otherwise (a bidirectional model, or no later
layer that keeps the prefixes few) the sequences are assembled naively, the k-th closest token of
each position to sequence k: DAGER's search for encoders is not implemented. Noise on the
gradient (DP) fills the span, and the attack declines as for a batch too large.

Assumptions (each checked, else the attack declines with the reason): the model takes tokens and
has an `nn.Embedding` of `vocab_size` rows; some `nn.Linear` is applied per token to a
(B, L, d) tensor; the input of the first such Linear at a position depends on that position's
token and index alone (no mixing before it); B·L < d (else the span is the whole space and every
candidate passes). Where the token embedding is frozen the candidates are the whole vocabulary
(slower, still exact); a LoRA adapter with B = 0 at initialisation has a zero A-gradient, but its
frozen base layer gives no gradient at all, so the span test needs a trainable per-token Linear.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attacks.base import AttackError, ObservedUpdate, Reconstruction
from models.base import ZooModel

UNKNOWN = -1  # a position no candidate passed at
ORDERED_KEY = "ordered"  # diagnostics: True when the reconstruction claims positions
TOKEN_SET_KEY = "token_set"  # diagnostics: the recovered set of token ids (sorted)
CHUNK = 256  # candidate tokens per forward pass
NAIVE_NOTE = (
    "B > 1: token set exact, per-position sets may hold extra tokens and the sequences are "
    "assembled naively (no prefix extension: the model is not causal, or it failed)"
)


def token_embedding(model: ZooModel) -> tuple[str, nn.Embedding]:
    """The model's token embedding: its first `nn.Embedding` with `vocab_size` rows."""
    spec = model.spec
    if spec.modality != "tokens":
        raise AttackError(f"the model takes {spec.modality} inputs; text attacks need token inputs")
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module.num_embeddings == spec.vocab_size:
            return name, module
    raise AttackError(
        f"{type(model).__name__} has no nn.Embedding of {spec.vocab_size} rows (the vocabulary); "
        "the text attacks read tokens through one"
    )


def embedding_token_set(update: ObservedUpdate) -> tuple[Tensor, str]:
    """Token ids whose embedding-gradient row is non-zero (sorted), and a note on padding."""
    name, embedding = token_embedding(update.model)
    grad = update.gradients[f"{name}.weight"]
    if not embedding.weight.requires_grad or not bool((grad != 0).any()):
        raise AttackError(
            f"the token embedding {name!r} is frozen (its gradient is zero), so it reveals no tokens; "
            "use dager, which tests the whole vocabulary against a trainable per-token Linear"
        )
    tokens = (grad != 0).any(dim=1).nonzero().reshape(-1)
    note = ""
    if embedding.padding_idx is not None:
        note = f"padding id {embedding.padding_idx} has no gradient (padding_idx), so it is never revealed"
    return tokens, note


class TokenSetAttack:
    """The exact set of tokens in the batch, from the non-zero rows of the embedding gradient."""

    name = "token-set"

    def reconstruct(self, update: ObservedUpdate) -> Reconstruction:
        start = time.perf_counter()
        tokens, note = embedding_token_set(update)
        diagnostics = {ORDERED_KEY: False, TOKEN_SET_KEY: tokens.tolist()}
        if note:
            diagnostics["note"] = note
        return Reconstruction(tokens[None].float(), None, time.perf_counter() - start, diagnostics)


@dataclass(frozen=True)
class Projection:
    """The first per-token Linear layers (all that share its input) and their input width."""

    names: tuple[str, ...]
    module: nn.Linear  # the first one: its input is what `layer_inputs` captures
    width: int


def _per_token_linears(model: ZooModel, length: int) -> list[tuple[str, nn.Linear, Tensor]]:
    """Every nn.Linear applied to a (1, length, d) tensor in a probe forward pass, in call order."""
    calls: list[tuple[str, nn.Linear, Tensor]] = []
    hooks = [
        module.register_forward_hook(lambda m, args, out, n=name: calls.append((n, m, args[0].detach())))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    probe = torch.arange(length, dtype=torch.int64)[None] % model.spec.vocab_size
    try:
        _forward(model, probe)
    finally:
        for hook in hooks:
            hook.remove()
    return [(n, m, x) for n, m, x in calls if x.dim() == 3 and tuple(x.shape[:2]) == (1, length)]


def _group(per_token: list[tuple[str, nn.Linear, Tensor]], index: int) -> Projection:
    _, module, first = per_token[index]
    names = tuple(
        dict.fromkeys(n for n, _, x in per_token if x.shape == first.shape and torch.equal(x, first))
    )
    return Projection(names, module, int(first.shape[-1]))


def first_projection(model: ZooModel, length: int) -> Projection:
    """Find the first nn.Linear applied to a (B, length, d) tensor, and the Linears sharing its input."""
    per_token = _per_token_linears(model, length)
    if not per_token:
        raise AttackError(
            f"no nn.Linear of {type(model).__name__} is applied per token to a (B, {length}, d) input; "
            "the span test needs one (a bag-of-words or pooled model mixes the tokens first)"
        )
    return _group(per_token, 0)


def later_projections(model: ZooModel, length: int, first: Projection) -> list[Projection]:
    """The per-token Linears after `first` (grouped by shared input, in forward order), where
    prefixes can be tested: the attention output projection, a feed-forward layer, ..."""
    per_token = _per_token_linears(model, length)
    groups: list[Projection] = []
    seen = set(first.names)
    for index, (name, _, _) in enumerate(per_token):
        if name not in seen:
            groups.append(_group(per_token, index))
            seen.update(groups[-1].names)
    return groups


def is_causal(model: ZooModel, projection: Projection, length: int) -> bool:
    """Whether the projection's input at a position ignores every later token (a causal model)."""
    generator = torch.Generator().manual_seed(2)
    sequence = torch.randint(0, model.spec.vocab_size, (1, length), generator=generator)
    changed = sequence.clone()
    half = length // 2
    changed[0, half:] = torch.randint(0, model.spec.vocab_size, (length - half,), generator=generator)
    before = layer_inputs(model, projection, torch.cat([sequence, changed]))
    changes_later = not torch.allclose(before[0, half:], before[1, half:], rtol=1e-5, atol=1e-6)
    return changes_later and torch.allclose(before[0, :half], before[1, :half], rtol=1e-5, atol=1e-6)


def layer_inputs(model: ZooModel, projection: Projection, tokens: Tensor) -> Tensor:
    """The first projection's input (N, L, d) for token sequences (N, L)."""
    captured: list[Tensor] = []
    hook = projection.module.register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
    try:
        _forward(model, tokens)
    finally:
        hook.remove()
    return captured[0].double()


def _forward(model: ZooModel, tokens: Tensor) -> None:
    """A forward pass in eval mode (no dropout: the same input must give the same layer input)."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        model.train(training)


def _check_per_token(model: ZooModel, projection: Projection, length: int) -> bool:
    """Decline unless a position's layer input is a function of its token and index alone;
    return whether that input depends on the index (positional embeddings: order is recoverable)."""
    generator = torch.Generator().manual_seed(0)
    sequence = torch.randint(0, model.spec.vocab_size, (1, length), generator=generator)
    mixed = layer_inputs(model, projection, sequence)[0]
    alone = layer_inputs(model, projection, sequence.reshape(-1, 1).expand(length, length))
    own = alone[torch.arange(length), torch.arange(length)]
    if not torch.allclose(mixed, own, rtol=1e-5, atol=1e-6):
        raise AttackError(
            f"the input of {projection.names[0]!r} at a position depends on other positions (tokens "
            "are mixed before the first per-token Linear); the span test needs per-token inputs"
        )
    return not torch.allclose(alone[:, 0], alone[:, -1], rtol=1e-5, atol=1e-6)


def gradient_span(update: ObservedUpdate, projection: Projection, rank_tol: float) -> tuple[Tensor, int]:
    """An orthonormal basis (d, r) of the row space of the projections' stacked weight gradients."""
    grads = torch.cat([update.gradients[f"{n}.weight"].double() for n in projection.names], dim=0)
    singular, basis = torch.linalg.svd(grads, full_matrices=False)[1:]
    if float(singular[0]) == 0.0:
        raise AttackError(f"the weight gradient of {projection.names[0]!r} is zero; it spans no inputs")
    rank = int((singular > singular[0] * rank_tol).sum())
    space = input_space_rank(update.model, projection, rank_tol)
    if rank >= space:
        raise AttackError(
            f"the weight gradient of {projection.names[0]!r} has full rank {rank}: the layer's inputs "
            f"span only {space} of its {projection.width} dimensions and the batch fills them "
            "(too many token positions for its width, or noise on the gradient), so every candidate "
            "lies in the span; dager needs an exact gradient of fewer positions than dimensions"
        )
    return basis[:rank].T, rank


def input_space_rank(model: ZooModel, projection: Projection, rank_tol: float) -> int:
    """The dimension of the space the layer's inputs can take at all (a LayerNorm, say, keeps them
    in the d - 1 dimensions of zero mean): a gradient of that rank spans every candidate."""
    length = int(model.spec.shape[0])
    count = -(-4 * projection.width // length)  # enough random inputs to span the space
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.spec.vocab_size, (count, length), generator=generator)
    inputs = layer_inputs(model, projection, tokens).reshape(-1, projection.width)
    singular = torch.linalg.svdvals(inputs)
    return int((singular > singular[0] * rank_tol).sum())


class DagerAttack:
    """DAGER's span test at the first per-token Linear: the batch's tokens, per position."""

    name = "dager"

    def __init__(self, rank_tol: float = 1e-6, distance_tol: float = 1e-3, max_prefixes: int = 8) -> None:
        self.max_prefixes = max_prefixes  # prefix extension gives up beyond this many per sequence
        self.rank_tol = rank_tol  # singular values below this share of the largest are noise
        self.distance_tol = distance_tol  # a candidate passes below this relative distance to the span

    def reconstruct(self, update: ObservedUpdate) -> Reconstruction:
        start = time.perf_counter()
        model = update.model
        token_embedding(model)  # declines for models without one
        length = int(model.spec.shape[0])
        projection = first_projection(model, length)
        positional = _check_per_token(model, projection, length)
        basis, rank = gradient_span(update, projection, self.rank_tol)
        candidates, source = self._candidates(update)
        distances = self._distances(model, projection, basis, candidates, length)  # (N, L)
        passed = distances < self.distance_tol
        token_set = sorted({int(t) for t in candidates[passed.any(dim=1)]})
        diagnostics = {
            ORDERED_KEY: positional,
            TOKEN_SET_KEY: token_set,
            "projections": list(projection.names),
            "span_rank": rank,
            "candidates": source,
        }
        if not positional:
            inputs = torch.tensor(token_set, dtype=torch.float32)[None]
            diagnostics["note"] = "no positional input before the projection: the token set only"
            return Reconstruction(inputs, None, time.perf_counter() - start, diagnostics)
        sequences, notes = None, []
        later = later_projections(model, length, projection) if update.batch_size > 1 else []
        for second in later:  # the first later layer at which prefixes stay few
            if sequences is None and is_causal(model, second, length):
                sequences, note = self._extend_prefixes(update, second, candidates, passed, length)
                notes.append(note)
        if notes:
            diagnostics["note"] = "; ".join(notes)
        if sequences is None:
            sequences = self._assemble(candidates, distances, passed, update.batch_size)
            if update.batch_size > 1:
                diagnostics["note"] = "; ".join(filter(None, [diagnostics.get("note"), NAIVE_NOTE]))
        diagnostics["positions_unresolved"] = int((sequences == UNKNOWN).sum())
        return Reconstruction(sequences.float(), None, time.perf_counter() - start, diagnostics)

    def _extend_prefixes(
        self, update: ObservedUpdate, second: Projection, candidates: Tensor, passed: Tensor, length: int
    ) -> tuple[Tensor | None, str]:
        """DAGER's second stage for causal models: grow prefixes one position at a time, keeping
        those whose input to the next per-token Linear lies in the span of its weight gradient.
        A prefix none of whose extensions passes is a whole sequence. None (and why) where the
        prefixes multiply beyond `max_prefixes` per sequence or none survives."""
        model = update.model
        try:
            basis, _ = gradient_span(update, second, self.rank_tol)
        except AttackError as err:
            return None, f"{second.names[0]!r}: {err}"
        limit = self.max_prefixes * update.batch_size
        prefixes: list[list[int]] = [[]]
        finished: list[list[int]] = []
        for p in range(length):
            tokens = candidates[passed[:, p]].tolist()
            trials = [[*prefix, t] for prefix in prefixes for t in tokens]
            if not trials:
                finished += prefixes
                prefixes = []
                break
            padded = torch.zeros((len(trials), length), dtype=torch.int64)
            padded[:, : p + 1] = torch.tensor(trials)
            inputs = torch.cat([layer_inputs(model, second, chunk) for chunk in padded.split(CHUNK)])[:, p]
            residual = inputs - (inputs @ basis) @ basis.T
            keep = (residual.norm(dim=-1) / inputs.norm(dim=-1).clamp_min(1e-30)) < self.distance_tol
            extended = {tuple(trial[:-1]) for trial, ok in zip(trials, keep.tolist(), strict=True) if ok}
            finished += [prefix for prefix in prefixes if tuple(prefix) not in extended and prefix]
            prefixes = [trial for trial, ok in zip(trials, keep.tolist(), strict=True) if ok]
            if len(prefixes) > limit:
                return None, f"{second.names[0]!r}: {len(prefixes)} prefixes at position {p}, too many"
        finished += prefixes
        if not finished:
            return None, f"{second.names[0]!r}: no prefix passes"
        sequences = torch.full((max(len(finished), 1), length), UNKNOWN, dtype=torch.int64)
        for k, sequence in enumerate(finished):
            sequences[k, : len(sequence)] = torch.tensor(sequence)
        note = f"causal: {len(finished)} sequences grown through {second.names[0]!r}"
        return sequences, note

    @staticmethod
    def _candidates(update: ObservedUpdate) -> tuple[Tensor, str]:
        """The embedding-gradient token set where the embedding trains, else the whole vocabulary;
        the padding row, which gets no gradient under `padding_idx`, is always a candidate."""
        _, embedding = token_embedding(update.model)
        try:
            tokens, _ = embedding_token_set(update)
            source = "the embedding gradient's token set"
        except AttackError:
            tokens = torch.arange(update.model.spec.vocab_size)
            source = "the whole vocabulary (frozen embedding)"
        if embedding.padding_idx is not None:
            tokens = torch.unique(torch.cat([tokens, torch.tensor([embedding.padding_idx])]))
        return tokens, source

    @staticmethod
    def _distances(
        model: ZooModel, projection: Projection, basis: Tensor, candidates: Tensor, length: int
    ) -> Tensor:
        """Relative distance of each candidate's layer input at each position to the span."""
        out = []
        for chunk in candidates.split(CHUNK):
            inputs = layer_inputs(model, projection, chunk[:, None].expand(-1, length))  # (n, L, d)
            residual = inputs - (inputs @ basis) @ basis.T
            out.append(residual.norm(dim=-1) / inputs.norm(dim=-1).clamp_min(1e-30))
        return torch.cat(out)

    @staticmethod
    def _assemble(candidates: Tensor, distances: Tensor, passed: Tensor, batch: int) -> Tensor:
        """(batch, L) sequences: at each position, sequence k takes the k-th closest passing token
        (the closest one where fewer passed: a token the sequences share, such as padding)."""
        length = distances.shape[1]
        sequences = torch.full((batch, length), UNKNOWN, dtype=torch.int64)
        for p in range(length):
            members = passed[:, p].nonzero().reshape(-1)
            if not len(members):
                continue
            ranked = candidates[members[distances[members, p].argsort()]]
            for k in range(batch):
                sequences[k, p] = ranked[min(k, len(ranked) - 1)]
        return sequences
