"""ULMFiT (Howard & Ruder 2018): STLR and discriminative rates on the global round clock, gradual
unfreezing with frozen groups not sent and reset after aggregation, concat pooling, weight drop and embedding
dropout, the safetensors LM, and a federation that learns."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from models import InputSpec, TrainingSettings, build_model
from models.ulmfit import ULMFiT, discriminative_rates, save_pretrained, slanted_triangular

TOKENS = InputSpec.tokens(12, 40, 3)


def _ulmfit(**options: object) -> ULMFiT:
    torch.manual_seed(0)
    model = build_model("ulmfit", TOKENS, embedding=8, hidden=16, classifier_hidden=6, **options)
    assert isinstance(model, ULMFiT)
    return model


def _batches(count: int = 40, batch_size: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(1, 40, (count, 12), generator=generator)
    x[:, 9:] = 0  # right padding, as the text datasets pad
    y = torch.randint(0, 3, (count,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _round(model: ULMFiT, settings: TrainingSettings, server_round: int) -> None:
    """One client's local round through the model's hooks, as fedsim.training.local runs it."""
    optimizer = model.configure_optimizer(settings, server_round)
    loader = _batches()
    model.before_local_training(loader, server_round)
    model.train()
    for inputs, labels in loader:
        optimizer.zero_grad(set_to_none=True)
        model.training_loss(model, inputs, labels).backward()
        optimizer.step()
    model.after_local_training(loader, server_round)


def _state(model: ULMFiT) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_stlr_follows_the_papers_formula() -> None:
    # T = 1000, cut_frac 0.1 -> cut = 100; ratio 32: η_min = η_max / 32 at both ends
    assert slanted_triangular(0, 1000) == pytest.approx(1 / 32)
    assert slanted_triangular(50, 1000) == pytest.approx((1 + 0.5 * 31) / 32)
    assert slanted_triangular(100, 1000) == pytest.approx(1.0)
    assert slanted_triangular(550, 1000) == pytest.approx((1 + 0.5 * 31) / 32)
    assert slanted_triangular(1000, 1000) == pytest.approx(1 / 32)
    values = [slanted_triangular(t, 1000) for t in range(1001)]
    assert int(np.argmax(values)) == 100
    assert all(a < b for a, b in itertools.pairwise(values[:101]))
    assert all(a > b for a, b in itertools.pairwise(values[100:]))


def test_discriminative_rates_divide_by_2_6_per_group_down_from_the_top() -> None:
    assert discriminative_rates(0.01, 4) == pytest.approx([0.01 / 2.6**3, 0.01 / 2.6**2, 0.01 / 2.6, 0.01])
    model = _ulmfit(lm_rounds=1)
    settings = TrainingSettings(learning_rate=0.01, rounds=4)
    optimizer = model.configure_optimizer(settings, 1)  # the LM stage: every LM group trains
    names = [group["group"] for group in optimizer.param_groups]
    assert names == ["embedding", "decoder", "lstm0", "lstm1"]
    peaks = dict(zip(names, model._peak_rates, strict=True))
    assert peaks == pytest.approx(
        {"embedding": 0.01 / 2.6**3, "lstm0": 0.01 / 2.6**2, "lstm1": 0.01 / 2.6, "decoder": 0.01}
    )
    # at the stage's first step every group runs at its peak / ratio
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(peaks[group["group"]] / 32)


def test_stlr_runs_on_the_global_round_clock() -> None:
    model = _ulmfit(lm_rounds=0)
    settings = TrainingSettings(learning_rate=0.01, rounds=4)
    optimizer = model.configure_optimizer(settings, 3)  # third round of a 4-round stage
    loader = _batches()  # 5 batches per round -> T = 20 steps, this round starts at t = 10
    model.before_local_training(loader, 3)
    inputs, labels = next(iter(loader))
    (top,) = optimizer.param_groups[-1:]
    seen = []
    for _ in range(3):
        model.training_loss(model, inputs, labels)
        seen.append(top["lr"])
    expected = [0.01 * slanted_triangular(t, 20) for t in (10, 11, 12)]
    assert seen == pytest.approx(expected)
    assert seen[0] > seen[1] > seen[2], "past the cut the rate decays"


def test_gradual_unfreezing_trains_one_more_group_per_round_and_resets_the_frozen_ones() -> None:
    model = _ulmfit(lm_rounds=1)
    rounds = 6
    assert model.trained_groups(1, rounds) == ["embedding", "lstm0", "lstm1", "decoder"]
    assert [model.trained_groups(r, rounds) for r in range(2, 7)] == [
        ["classifier"],
        ["lstm1", "classifier"],
        ["lstm0", "lstm1", "classifier"],
        ["embedding", "lstm0", "lstm1", "classifier"],
        ["embedding", "lstm0", "lstm1", "classifier"],
    ]
    settings = TrainingSettings(learning_rate=0.05, rounds=rounds)
    model.run_settings = settings
    group_of = model.group_of()
    lm_groups = {"embedding", "lstm0", "lstm1", "decoder"}
    for server_round, trained in ((1, lm_groups), (3, {"lstm1", "classifier"})):
        before = _state(model)
        _round(model, settings, server_round)
        after = _state(model)
        sent = model.sent_names(server_round)
        for name, value in after.items():
            changed = not np.array_equal(value, before[name])
            assert changed == (group_of[name] in trained), (server_round, name)
            # frozen groups' tensors are unchanged and not sent back; the trained ones are
            assert (name in sent) == (group_of[name] in trained), (server_round, name)
        assert list(sent) == [name for name in after if name in sent], "sent in state-dict order"
        # the server's side: a reply whose frozen tensors moved (a bad client, a rounding average)
        # gets them back bit-exact from the round's global model
        tampered = {k: v + 1.0 for k, v in after.items()}
        merged = model.after_aggregation(tampered, before, [], settings, server_round)
        for name, value in merged.items():
            expected = tampered[name] if group_of[name] in trained else before[name]
            assert np.array_equal(value, expected), name


def test_concat_pooling_is_last_state_max_and_mean() -> None:
    states = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [-1.0, 4.0]]])
    pooled = ULMFiT.concat_pool(states)
    assert torch.allclose(pooled, torch.tensor([[-1.0, 4.0, 3.0, 4.0, 1.0, 2.0 / 3.0]]))
    model = _ulmfit()
    assert model.classifier[0].in_features == 3 * 8
    assert model(torch.randint(0, 40, (5, 12))).shape == (5, 3)


def test_weight_drop_is_active_in_training_only_and_the_raw_weight_stays_the_parameter() -> None:
    model = _ulmfit(weight_drop=0.5, embed_dropout=0.0, dropout=0.0)
    names = dict(model.named_parameters())
    assert "rnns.0.lstm.weight_hh_l0" in names and "rnns.1.lstm.weight_hh_l0" in names
    x = torch.randint(1, 40, (4, 12))
    model.train()
    first, second = model(x), model(x)
    assert not torch.allclose(first, second), "each training forward draws a new DropConnect mask"
    second.sum().backward()
    assert names["rnns.0.lstm.weight_hh_l0"].grad is not None
    assert names["rnns.0.lstm.weight_hh_l0"].grad.abs().sum() > 0
    model.eval()
    assert torch.equal(model(x), model(x))
    plain = _ulmfit(weight_drop=0.0, embed_dropout=0.0, dropout=0.0).eval()
    assert torch.allclose(model(x), plain(x)), "in eval the dropped model is the plain one"
    # the step-by-step recurrence (used under torch.func) matches the fused LSTM
    rnn = model.rnns[0]
    embedded = model.embed(x)
    assert torch.allclose(rnn.recurrence(embedded, rnn.lstm.weight_hh_l0), rnn(embedded), atol=1e-5)


def test_embedding_dropout_zeroes_whole_words() -> None:
    model = _ulmfit(embed_dropout=0.5)
    x = torch.full((2, 12), 7)  # one word everywhere
    model.train()
    rows = [model.embed(x) for _ in range(20)]
    dropped = [bool((r == 0).all()) for r in rows]
    assert any(dropped) and not all(dropped), "word 7 is dropped in some forwards, kept in others"
    kept = next(r for r, d in zip(rows, dropped, strict=True) if not d)
    assert torch.allclose(kept[0, 0], model.encoder.weight[7] * 2)
    model.eval()
    assert torch.equal(model.embed(x)[0, 0], model.encoder.weight[7])


def test_language_model_stage_trains_on_next_tokens_ignoring_padding() -> None:
    model = _ulmfit(embed_dropout=0.0, dropout=0.0, weight_drop=0.0).eval()
    x = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    logits = model.decoder(model.encode(model.embed(x)))
    expected = torch.nn.functional.cross_entropy(logits[0, :2], torch.tensor([6, 7]))
    assert torch.allclose(model.language_model_loss(x), expected)


def test_pretrained_language_model_round_trips_through_safetensors(tmp_path: Path) -> None:
    general = _ulmfit()
    with torch.no_grad():
        general.decoder.bias.fill_(0.25)
    path = tmp_path / "lm.safetensors"
    save_pretrained(general, path)
    torch.manual_seed(1)
    loaded = build_model("ulmfit", TOKENS, embedding=8, hidden=16, classifier_hidden=6, pretrained=str(path))
    for name, tensor in general.language_model_state().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not torch.equal(loaded.state_dict()["classifier.0.weight"], general.classifier[0].weight)
    with pytest.raises(ValueError, match="pretrain with the same vocabulary and sizes"):
        build_model("ulmfit", TOKENS, embedding=8, hidden=32, classifier_hidden=6, pretrained=str(path))
    with pytest.raises(ValueError, match="not found"):
        build_model("ulmfit", TOKENS, pretrained=str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"weight_drop": 1.0}, "weight_drop is a drop probability"),
        ({"lm_rounds": -1}, "lm_rounds must be >= 0"),
        ({"cut_frac": 0.0}, "cut_frac must be in"),
        ({"ratio": 0.5}, "ratio must be >= 1"),
        ({"lstm_layers": 0}, "lstm_layers must be >= 1"),
    ],
)
def test_builder_refuses_bad_options(options: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        build_model("ulmfit", TOKENS, **options)


def test_ulmfit_takes_tokens_only() -> None:
    with pytest.raises(ValueError, match="takes tokens inputs, not image"):
        build_model("ulmfit", InputSpec((1, 8, 8), 10))
