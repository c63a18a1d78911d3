"""SmolLM2-135M with LoRA: its dataset, what travels, its next-token loss, and that it learns."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedsim.config.run_config import RunConfig
from fedsim.data.clients import ClientData, client_data
from fedsim.data.registry import load_dataset
from fedsim.training.local import evaluate, train_locally
from models import InputSpec, UnsupportedInputError, build_model
from models.pretrained import load_smollm2
from models.smollm2 import PAD, parse_layers
from tests.support.optional import require_fortunes, require_smollm2

VOCAB = 49152


@pytest.fixture(scope="module")
def data():
    require_fortunes()
    require_smollm2()
    return load_dataset("fortunes-smollm2")


def _spec(length: int = 12) -> InputSpec:
    return InputSpec.tokens(length, VOCAB, 6, "smollm2")


def test_dataset_is_the_fortunes_split_in_smollm2_ids(data) -> None:
    fortunes = load_dataset("fortunes")
    assert data.x_train.shape == (len(fortunes.y_train), 32) and data.x_test.shape[1] == 32
    np.testing.assert_array_equal(data.y_train, fortunes.y_train)  # same stratified split
    assert data.spec.vocabulary == "smollm2" and data.spec.vocab_size == VOCAB
    for rows in (data.x_train, data.x_test):  # padding (id 0) only ever trails the text
        real = rows != PAD
        assert real[:, 0].all() and (np.diff(real.astype(int), axis=1) <= 0).all()
    text = "You know, of course, that the Tasmanians are now extinct."
    row = data.tokenizer.encode([text])[0]
    assert (row == PAD).any() and data.tokenizer.decode(row) == text  # padding decodes to nothing


def test_refuses_other_ids_before_loading_any_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load() -> None:
        raise AssertionError("weights loaded for a spec the model refuses")

    monkeypatch.setattr(sys.modules["models.smollm2"], "load_smollm2", no_load)
    for spec, message in (
        (InputSpec.tokens(32, 5000, 6), "use --dataset fortunes-smollm2"),
        (InputSpec.tokens(32, VOCAB, 6, "minilm"), "use --dataset fortunes-smollm2"),
        (InputSpec((1, 8, 8), 10), "takes tokens inputs, not image"),  # the registry's modality line
    ):
        with pytest.raises(UnsupportedInputError, match=message):
            build_model("smollm2", spec)
    for options, problem in (
        ({"rank": 0}, "rank must be at least 1"),
        ({"layers": "28-31"}, "not a set of SmolLM2 layers"),
        ({"layers": "x"}, "not a set of SmolLM2 layers"),
        ({"targets": "q_proj+embed"}, "names no LoRA target"),
    ):
        with pytest.raises(ValueError, match=problem):
            build_model("smollm2", _spec(), **options)
    assert parse_layers("0+15+29") == (0, 15, 29) and parse_layers("28-29") == (28, 29)


def test_only_the_adapters_train_and_travel_and_start_at_the_base() -> None:
    require_smollm2()
    torch.manual_seed(0)
    model = build_model("smollm2", _spec(), layers="28-29", targets="q_proj+v_proj+o_proj")
    names = model.federated_names()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(names) == trained and len(names) == 2 * 3 * 2  # A and B, 3 projections, 2 layers
    assert all(".lora_" in n and (".layers.28." in n or ".layers.29." in n) for n in names)
    assert sum(model.state_dict()[n].numel() for n in names) < 0.001 * sum(
        p.numel() for p in model.parameters()
    )
    # LoRA's B starts at zero: the adapted model computes exactly the pretrained one.
    tokens = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = load_smollm2().model(tokens).logits
        assert torch.allclose(model.eval()(tokens), base, atol=1e-4)
        assert torch.equal(model.forward_embedded(model.embed(tokens)), model(tokens))


def test_lora_init_repeats_under_the_seed() -> None:
    require_smollm2()

    def adapters(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        model = build_model("smollm2", _spec(), layers="29")
        return {n: model.state_dict()[n] for n in model.federated_names()}

    first, again, other = adapters(3), adapters(3), adapters(4)
    a_name = next(n for n in first if ".lora_A." in n)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(first[a_name], other[a_name]) and first[a_name].abs().sum() > 0


def test_loss_is_next_token_cross_entropy_over_non_pad_targets() -> None:
    require_smollm2()
    torch.manual_seed(0)
    model = build_model("smollm2", _spec(6), layers="29").eval()
    tokens = torch.tensor([[5, 9, 11, 0, 0, 0], [7, 8, 9, 10, 12, 0]])
    targets = model.sample_targets(tokens, torch.tensor([0, 1]))
    with torch.no_grad():
        logits = model(tokens)
    by_hand = [
        F.cross_entropy(logits[b, t], tokens[b, t + 1])
        for b, t in [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3)]
    ]
    assert model.metric_weight(targets) == 6
    assert torch.allclose(model.loss(logits, targets), torch.stack(by_hand).mean(), atol=1e-5)
    metrics = model.metrics(logits, targets)
    assert metrics["perplexity"] == pytest.approx(float(torch.stack(by_hand).mean().exp()), rel=1e-5)


def test_a_few_local_lora_steps_lower_the_loss_on_the_clients_text(data) -> None:
    """The client loop (AdamW on the adapters) on one client's texts: its own loss falls, and
    nothing outside `federated_names` moves."""
    config = RunConfig(
        model="smollm2", dataset="fortunes-smollm2", num_clients=2, batch_size=8, local_epochs=3,
        max_local_steps=6, learning_rate=3e-3, seed=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model("smollm2", data.spec)
    client = client_data(config, 0)
    x, y = client.x_train[:16], client.y_train[:16]  # a client of 16 texts: two batches an epoch
    before_state = {n: t.clone() for n, t in model.state_dict().items()}
    before = evaluate(model, x, y).loss
    train_locally(model, ClientData(x, y, client.x_val[:8], client.y_val[:8]), config, 1, 0)
    after = evaluate(model, x, y).loss
    assert after < before - 0.1, (before, after)
    moved = {n for n, t in model.state_dict().items() if not torch.equal(t, before_state[n])}
    assert moved and moved <= set(model.federated_names())


def test_train_blocks_sends_whole_blocks_and_dager_recovers_a_fortune_through_the_model() -> None:
    """The DAGER threat from the zoo: with `train_blocks=0+1` the first blocks' base weights
    train and travel beside the adapters, and dager-llm reads the text back from the model's own
    update; without them it declines, saying why."""
    from attacks.base import AttackError, observe_gradient
    from attacks.registry import build_attack

    require_smollm2()
    torch.manual_seed(0)
    model = build_model("smollm2", _spec(), train_blocks="0+1")
    names = model.federated_names()
    assert model.full_blocks() == (0, 1) and "dager-llm" in model.exposure()
    assert any(".layers.0.self_attn.q_proj.base_layer.weight" in n for n in names)
    assert not any(".layers.2." in n and ".lora_" not in n for n in names)
    tokenizer = load_smollm2().tokenizer
    ids = tokenizer("Never trust a computer you cannot throw out a window.").input_ids
    tokens = torch.tensor([ids + [PAD] * (12 - len(ids))])
    update = observe_gradient(model, tokens, torch.tensor([0]))
    recovered = build_attack("dager-llm").reconstruct(update)
    # Every token but the last: it predicts padding, which the loss ignores, so no gradient
    # reaches its input (DAGER's documented blind spot).
    assert [int(t) for t in recovered.inputs[0, : len(ids) - 1]] == ids[:-1]
    with pytest.raises(AttackError, match="do not train"):
        lora_only = build_model("smollm2", _spec())
        build_attack("dager-llm").reconstruct(observe_gradient(lora_only, tokens, torch.tensor([0])))
    with pytest.raises(ValueError, match="train_blocks="):
        build_model("smollm2", _spec(), train_blocks="30")
