"""End-to-end identifiability: exact deficits, agreement of the methods, finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from audits.security.identifiability import identifiability, observed_jacobian
from models import InputSpec, build_model
from models.base import ZooModel
from models.classifiers import SequentialClassifier


def _seeded(builder, *args, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return builder(*args, **kwargs)


def _strided_net() -> SequentialClassifier:
    """A 2x2 conv with stride 3 on 8x8: windows start at 0, 3, 6, so rows and columns 2 and 5
    are read by no window: 8*8 - 6*6 = 28 pixels per channel."""
    spec = InputSpec((3, 8, 8), 10)
    layers = nn.Sequential(
        nn.Conv2d(3, 16, 2, stride=3), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(16 * 3 * 3, 10)
    )
    return SequentialClassifier(layers, spec)


@pytest.mark.parametrize("method", ["dense", "gram"])
def test_pixels_no_window_reads_are_the_deficit(method: str) -> None:
    net = _seeded(_strided_net)
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    result = identifiability(net, x, torch.tensor([3]), method)
    assert result.unknowns == 192 and result.method == method
    assert result.unseen_inputs == 28 * 3
    assert result.deficit == 28 * 3 and result.rank == 192 - 84
    assert list(result.singular_values) == sorted(result.singular_values, reverse=True)
    assert result.to_dict()["deficit"] == 84


def test_full_rank_fc_net_and_small_cnn6() -> None:
    mlp = _seeded(build_model, "mlp", InputSpec((1, 8, 8), 10))
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert identifiability(mlp, x, torch.tensor([2])).deficit == 0
    cnn6 = _seeded(build_model, "cnn6", InputSpec((3, 16, 16), 10))
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    result = identifiability(cnn6, x, torch.tensor([2]), "gram")
    assert (result.rank, result.deficit, result.unseen_inputs) == (768, 0, 0)


@pytest.mark.slow
def test_cnn6_at_32x32_has_full_rank() -> None:
    """The audit's size (about a minute on two cores)."""
    cnn6 = _seeded(build_model, "cnn6", InputSpec((3, 32, 32), 10))
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert identifiability(cnn6, x, torch.tensor([2])).deficit == 0


def _tiny_tanh_net() -> SequentialClassifier:
    spec = InputSpec((2, 4, 4), 3)
    layers = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=1, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 3)
    )
    return SequentialClassifier(layers, spec).double()


def _flat_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    loss = model.loss(model(x), model.targets(y))
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def test_dense_jacobian_matches_finite_differences() -> None:
    net = _seeded(_tiny_tanh_net)
    x = torch.rand(1, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1])
    jac = observed_jacobian(net, x, y)
    step = 1e-6
    columns = []
    for i in range(x.numel()):
        e = torch.zeros(x.numel(), dtype=torch.float64)
        e[i] = step
        e = e.view_as(x)
        columns.append((_flat_gradient(net, x + e, y) - _flat_gradient(net, x - e, y)) / (2 * step))
    numeric = torch.stack(columns, dim=1)
    assert jac.shape == numeric.shape == (sum(p.numel() for p in net.parameters()), 32)
    assert torch.allclose(jac, numeric, rtol=1e-5, atol=1e-8)


class _FrozenProjection(ZooModel):
    """A frozen Linear(64 -> 5) before a trained Linear(5 -> 10): the gradient depends on the
    input only through 5 numbers, so J has rank <= 5 although no column of it is zero."""

    def __init__(self) -> None:
        super().__init__(InputSpec.features(64, 10))
        self.project = nn.Linear(64, 5).requires_grad_(False)
        self.out = nn.Linear(5, 10)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.out(torch.tanh(self.project(inputs)))


@pytest.mark.parametrize("builder", [_FrozenProjection, _strided_net])
def test_gram_and_randomized_agree_with_dense(builder) -> None:
    net = _seeded(builder)
    x = torch.rand(1, *net.spec.shape, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([4])
    dense = identifiability(net, x, y, "dense")
    gram = identifiability(net, x, y, "gram")
    fast = identifiability(net, x, y, "gram", dtype=torch.float32, chunk=7)
    assert dense.rank == gram.rank == dense.unknowns - dense.deficit
    assert fast.rank == dense.rank
    count = min(dense.rank, 5)
    np.testing.assert_allclose(gram.singular_values[:count], dense.singular_values[:count], rtol=1e-5)
    randomized = identifiability(net, x, y, "randomized", top_k=count + 3)
    assert randomized.rank is None and not randomized.complete
    assert randomized.unseen_inputs == dense.unseen_inputs
    assert len(randomized.singular_values) == count + 3
    # Ritz values never exceed the singular values they estimate (interlacing; float32 products) ...
    slack = 1e-6 * dense.singular_values[0]
    assert (randomized.singular_values <= dense.singular_values[: count + 3] + slack).all()
    assert randomized.frobenius_sq == pytest.approx(dense.frobenius_sq, rel=0.5)  # a 16-vector Hutchinson
    if builder is _FrozenProjection:  # ... and find them exactly when the spectrum ends within reach
        assert dense.rank == 5 and dense.unseen_inputs == 0
        np.testing.assert_allclose(randomized.singular_values[:5], dense.singular_values[:5], rtol=1e-6)


class _TinyTokenModel(ZooModel):
    """Embedding(11, 4) over 3 tokens, then a linear head on the flattened embeddings."""

    def __init__(self) -> None:
        super().__init__(InputSpec.tokens(3, 11, 2))
        self.table = nn.Embedding(11, 4)
        self.out = nn.Linear(12, 2)

    def embed(self, inputs: Tensor) -> Tensor:
        return self.table(inputs)

    def forward_embedded(self, embedded: Tensor) -> Tensor:
        return self.out(torch.tanh(embedded).flatten(1))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.forward_embedded(self.embed(inputs))


def test_token_model_is_differentiated_at_its_embedding() -> None:
    net = _seeded(_TinyTokenModel).double()
    tokens, y = torch.tensor([[3, 7, 3]]), torch.tensor([1])
    jac = observed_jacobian(net, tokens, y)
    assert jac.shape == (11 * 4 + 2 * 12 + 2, 12)

    def gradient(delta: Tensor) -> Tensor:  # the table keeps its gradient: rows 3 and 7
        loss = net.loss(net.forward_embedded(net.embed(tokens) + delta), y)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net.parameters()))])

    step, base = 1e-6, torch.zeros(1, 3, 4, dtype=torch.float64)
    columns = []
    for i in range(12):
        e = torch.zeros(12, dtype=torch.float64)
        e[i] = step
        columns.append((gradient(base + e.view_as(base)) - gradient(base - e.view_as(base))) / (2 * step))
    assert torch.allclose(jac, torch.stack(columns, 1), rtol=1e-5, atol=1e-8)
    result = identifiability(net, tokens, y)
    assert result.unknowns == 12 and result.rank is not None and result.method == "dense"
    with pytest.raises(ValueError, match="override embed/forward_embedded"):
        identifiability(SequentialClassifier(nn.Sequential(nn.Flatten()), net.spec), tokens, y)


def test_clipping_projects_out_the_gradient_direction() -> None:
    """J of g * C / |g| is (C / |g|) (I - g g^T / |g|^2) J when |g| > C."""
    net = _seeded(_tiny_tanh_net)
    x = torch.rand(1, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0])
    g = _flat_gradient(net, x, y).detach()
    jac = observed_jacobian(net, x, y)
    assert torch.allclose(observed_jacobian(net, x, y, clip_norm=10 * float(g.norm())), jac)
    clip = 0.5 * float(g.norm())
    unit = g / g.norm()
    expected = clip / g.norm() * (jac - torch.outer(unit, unit @ jac))
    assert torch.allclose(observed_jacobian(net, x, y, clip_norm=clip), expected, atol=1e-10)


def test_whitening_divides_rows_and_batchnorm_buffers_stay_untouched() -> None:
    net = _seeded(build_model, "convnet-bn", InputSpec((1, 8, 8), 10))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([7])
    stds = {n: torch.full_like(p, 0.5) for n, p in net.named_parameters()}
    plain = observed_jacobian(net, x, y)
    assert torch.allclose(observed_jacobian(net, x, y, noise_std=stds), plain / 0.5)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training
    with pytest.raises(ValueError, match="positive and finite"):
        observed_jacobian(net, x, y, noise_std={n: torch.zeros_like(p) for n, p in net.named_parameters()})


def test_gram_products_match_the_dense_jacobian_with_clipping_and_whitening() -> None:
    """J^T J v from the two product paths equals J^T (J v) from J itself."""
    from audits.security.identifiability import _ObservedGradient

    net = _seeded(_tiny_tanh_net)
    x = torch.rand(1, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    y = torch.tensor([2])
    g = _flat_gradient(net, x, y).detach()
    stds = {n: torch.rand(p.shape, dtype=torch.float64) + 0.5 for n, p in net.named_parameters()}
    for clip in (None, 0.3 * float(g.norm())):
        jac = observed_jacobian(net, x, y, noise_std=stds, clip_norm=clip)
        observed = _ObservedGradient(net, x, y, torch.float64, stds, clip)
        vectors = torch.randn(3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        expected = (jac.T @ (jac @ vectors.T)).T
        assert torch.allclose(observed.gram_columns(vectors), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gram_matches_dense_on_batchnorm_nets_in_either_mode(mode: str) -> None:
    """torch's forward mode gave Jᵀu off by 37 % through a training-mode BatchNorm, which turned
    convnet-bn's full rank at 32×32 into a deficit of 3020; the forward-mode check catches it."""
    torch.manual_seed(0)
    net = build_model("convnet-bn", InputSpec.image((3, 8, 8), 10))
    net.train(mode == "train")
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([3])
    dense = identifiability(net, x, y, "dense")
    gram = identifiability(net, x, y, "gram")
    assert dense.deficit == gram.deficit == 0
    np.testing.assert_allclose(gram.singular_values, dense.singular_values, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "options"), [("cloze", {"width": 8, "layers": 1, "heads": 2}), ("ulmfit", {})]
)
def test_dropout_models_in_training_mode_get_the_same_rank_from_gram_and_dense(
    name: str, options: dict
) -> None:
    """Models in training mode with dropout and attention: every product must see the same
    function (dropout off) on kernels forward-mode AD supports (the fused attention ones have no
    forward derivative). Before, the cloze transformer raised NotImplementedError and the Gram
    of both models, asymmetric from fresh dropout masks, gave rank 0."""
    model = _seeded(build_model, name, InputSpec.tokens(6, 50, 2), **options)
    assert model.training
    x = torch.randint(4, 50, (1, 6), generator=torch.Generator().manual_seed(2))
    dense = identifiability(model, x, torch.tensor([1]), "dense")
    gram = identifiability(model, x, torch.tensor([1]), "gram")
    # The float32 Gram can lift null directions just over its tolerance (cloze: 2.7e-7 against
    # 1.6e-7, the count varying with the threads), far below the smallest identified singular
    # value (3.2e-2): compare the identified part of the spectrum, which the bugs destroyed.
    top = dense.singular_values[: dense.rank]
    assert dense.rank > dense.unknowns // 2 and gram.rank >= dense.rank
    assert np.allclose(gram.singular_values[: dense.rank], top, rtol=1e-4)
    if dense.rank < dense.unknowns:  # cloze: a clear gap after the identified part
        assert gram.singular_values[dense.rank] < 1e-4 * top[-1]
    assert torch.backends.mha.get_fastpath_enabled(), "the attention fast path is restored"
