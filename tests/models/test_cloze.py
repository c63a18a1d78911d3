"""The cloze two-tower transformer (Baevski et al. 2019): no position sees its own token, the
combination layer reads only f_{<i} and b_{>i}, the loss is a token-level mean that falls, and a
federation on fortunes learns."""

from __future__ import annotations

import pytest
import torch

from fedsim.training.local import evaluate
from models import InputSpec, build_model
from models.cloze_transformer import PAD, ClozeTransformer, combination_mask

SPEC = InputSpec.tokens(10, 30, 2)


def _model(direction: str = "both", **options: object) -> ClozeTransformer:
    torch.manual_seed(0)
    model = build_model(
        "cloze", SPEC, width=32, layers=1, heads=2, dropout=0.0, direction=direction, **options
    )
    assert isinstance(model, ClozeTransformer)
    return model.eval()


def _perturbed(tokens: torch.Tensor, position: int) -> torch.Tensor:
    changed = tokens.clone()
    changed[:, position] = (tokens[:, position] - 2 + 5) % (SPEC.vocab_size - 2) + 2  # another real token
    assert not torch.equal(changed, tokens)
    return changed


@torch.no_grad()
def test_no_position_sees_its_own_token() -> None:
    """Perturb token i: the prediction at i is unchanged, and other positions' predictions change."""
    model = _model()
    tokens = torch.randint(2, SPEC.vocab_size, (3, SPEC.shape[0]), generator=torch.Generator().manual_seed(1))
    before = model(tokens)
    for position in range(SPEC.shape[0]):
        after = model(_perturbed(tokens, position))
        change = (after - before).abs().amax(dim=(0, 2))
        assert change[position] == 0, f"position {position} sees its own token ({change[position]})"
        others = torch.cat([change[:position], change[position + 1 :]])
        assert others.max() > 1e-3, f"token {position} reaches no other position"


@torch.no_grad()
def test_forward_baseline_reads_only_the_left_context() -> None:
    model = _model("forward")
    tokens = torch.randint(2, SPEC.vocab_size, (2, SPEC.shape[0]), generator=torch.Generator().manual_seed(2))
    before = model(tokens)
    position = 4
    change = (model(_perturbed(tokens, position)) - before).abs().amax(dim=(0, 2))
    assert change[: position + 1].max() == 0, change
    assert change[position + 1 :].min() > 0, change


def test_combination_layer_attends_only_to_f_before_and_b_after() -> None:
    tokens = SPEC.shape[0]
    length = tokens + 2  # BOS, the tokens, EOS
    blocked = combination_mask(tokens, backward=True)
    assert blocked.shape == (tokens, 2 * length)
    for i in range(1, tokens + 1):  # padded coordinates: token i at position i
        allowed = {("f", j) for j in range(length) if j < i} | {("b", j) for j in range(length) if j > i}
        seen = {("f" if k < length else "b", k % length) for k in range(2 * length) if not blocked[i - 1, k]}
        assert seen == allowed, i
    # and the layer itself puts zero weight on every blocked key
    model = _model()
    x = torch.randint(2, SPEC.vocab_size, (2, tokens))
    with torch.no_grad():
        states = torch.cat(
            [model.boundary[:1].expand(2, 1, -1), model.embed(x), model.boundary[1:].expand(2, 1, -1)], 1
        )
        states = states + model.positions
        forward = model.forward_tower(states, model.causal)
        assert model.backward_tower is not None
        backward = model.backward_tower(states, model.anticausal)
        keys = torch.cat([forward, backward], 1)
        _, weights = model.combine(forward[:, :-2] + backward[:, 2:], keys, keys, attn_mask=model.combination)
    assert weights[:, blocked].abs().max() == 0
    assert torch.allclose(weights.sum(-1), torch.ones(2, tokens))


def test_same_size_baseline_and_options_are_validated() -> None:
    both, forward = _model(), _model("forward")
    count = [sum(p.numel() for p in m.parameters()) for m in (both, forward)]
    assert abs(count[0] - count[1]) <= 2 * 32, count  # one tower-final LayerNorm apart
    assert len(forward.forward_tower.stack.layers) == 2 and forward.backward_tower is None
    for options, message in [
        ({"direction": "backward"}, "direction must be one of"),
        ({"width": 30, "heads": 4}, "divisible by heads"),
        ({"dropout": 1.0}, "dropout must be in"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_model("cloze", SPEC, **options)
    with pytest.raises(ValueError, match="takes tokens inputs, not image"):
        build_model("cloze", InputSpec((1, 8, 8), 10))


def test_padding_is_never_a_target_and_evaluation_is_a_token_mean() -> None:
    model = _model()
    tokens = torch.randint(2, SPEC.vocab_size, (6, SPEC.shape[0]), generator=torch.Generator().manual_seed(3))
    tokens[::2, 5:] = PAD  # half the texts are short
    labels = torch.zeros(6, dtype=torch.long)
    targets = model.sample_targets(tokens, labels)
    assert torch.equal(targets, tokens) and model.metric_weight(targets) == int((tokens != PAD).sum())
    with torch.no_grad():
        outputs = model(tokens)
    real = tokens != PAD
    nll = torch.nn.functional.cross_entropy(outputs[real], tokens[real])
    assert torch.isclose(model.loss(outputs, targets), nll, atol=1e-6)
    # batches of unequal token counts: weighted by tokens, any batch size gives the same means
    whole, split = (
        evaluate(model, tokens, labels, batch_size=6),
        evaluate(model, tokens, labels, batch_size=4),
    )
    assert abs(whole.loss - float(nll)) < 1e-5 and abs(split.loss - whole.loss) < 1e-5
    assert abs(split.metrics["accuracy"] - whole.metrics["accuracy"]) < 1e-9


def test_loss_falls_and_fill_in_beats_chance_on_a_tiny_corpus() -> None:
    """Texts counting up from a random start (t, t+1, ...): each token is fixed by its neighbours."""
    generator = torch.Generator().manual_seed(4)
    starts = torch.randint(2, SPEC.vocab_size, (64, 1), generator=generator)
    tokens = (starts - 2 + torch.arange(SPEC.shape[0])) % (SPEC.vocab_size - 2) + 2
    labels = torch.zeros(64, dtype=torch.long)
    model = _model().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = model.training_loss(model, tokens, model.sample_targets(tokens, labels))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    assert evaluate(model, tokens, labels).metrics["accuracy"] > 0.5  # chance: 1/28
