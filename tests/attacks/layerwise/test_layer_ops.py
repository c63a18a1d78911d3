"""Layer-wise systems beyond R-GAP's setting: autograd-built systems, ReLU, BatchNorm, pooling,
residual blocks and embeddings, for both the attack and the security metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attacks.base import AttackError, ObservedUpdate, observe_gradient
from attacks.layerwise.attack import LayerwiseInversion
from attacks.layerwise.generic_systems import (
    OutputConstraints,
    bilinear_layer_of,
    constrained_rank,
    constrained_solve,
    gradient_matrix,
    projection,
)
from attacks.layerwise.systems import RANK_RTOL, build_system, geometry_of, solve_normal
from audits.security.metric import security_report
from fedsim.data.photos import photo_crops
from models import InputSpec, UnsupportedInputError, available_models, build_model
from models.classifiers import SequentialClassifier

SPEC16 = InputSpec((3, 16, 16), 10)


def psnr(reconstruction: torch.Tensor, original: np.ndarray) -> float:
    mse = float(np.mean((reconstruction.detach().numpy().astype(np.float64) - original) ** 2))
    return 10.0 * np.log10(1.0 / max(mse, 1e-30))


def relu_convnet() -> SequentialClassifier:
    """Two ReLU convs that stay full rank layer-wise on 16x16 crops: the first has 16 x 256
    outputs for 768 unknowns (about half survive the ReLU), the second 32 x 9 = 288 >= 256
    gradient rows per input channel."""
    torch.manual_seed(0)
    layers = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 16 * 16, 10),
    )
    return SequentialClassifier(layers, SPEC16)


def bn_pool_convnet() -> SequentialClassifier:
    """Conv, BatchNorm (eval, non-trivial statistics), average pooling, ReLU, twice. Pooling before
    the ReLU keeps the ReLU's output visible to the layer above; 32 channels keep it full rank."""
    torch.manual_seed(0)
    layers = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.AvgPool2d(2),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.AvgPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )
    model = SequentialClassifier(layers, SPEC16)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def crops16() -> tuple[np.ndarray, np.ndarray]:
    return photo_crops(2, size=16, seed=1)


def attack(model: nn.Module, image: np.ndarray, label: int):
    update = observe_gradient(model, torch.from_numpy(image[None]), torch.tensor([label]))
    return LayerwiseInversion().reconstruct(update)


# --- the attack through ReLU, BatchNorm (eval) and average pooling ------------------------------


@pytest.mark.parametrize("build", [relu_convnet, bn_pool_convnet], ids=["relu", "bn-eval-avgpool"])
def test_layerwise_inversion_through_relu_batchnorm_and_pooling(build, crops16) -> None:
    images, labels = crops16
    model = build()
    report = security_report(model, SPEC16.shape)
    assert report.complete and report.invertible and not report.upper_bound
    for i in range(2):
        result = attack(model, images[i], int(labels[i]))
        assert psnr(result.inputs, images[i : i + 1]) >= 40.0
        assert int(result.labels[0]) == int(labels[i])
        convs = [d for d in result.diagnostics["layers"] if d["type"] == "Conv2d"]
        assert all(d["deficit"] == 0 for d in convs)
        assert all("ReLU" in d["treatment"] for d in convs)
    if build is bn_pool_convnet:
        assert "BatchNorm2d (eval): affine" in convs[0]["treatment"] and "AvgPool2d" in convs[0]["treatment"]


@pytest.mark.parametrize("build", [relu_convnet, bn_pool_convnet], ids=["relu", "bn-eval-avgpool"])
def test_relu_pattern_survives_weight_delta_noise(build, crops16) -> None:
    """From a float32 weight delta at lr 0.01 the reconstructed zeros of a ReLU scatter around 0;
    the noise read off the negative entries keeps them zeros (with a fixed relative threshold
    four crops gave 12-21 dB on the ReLU net and below 0 dB through BatchNorm and pooling; now
    104-108 and 65-69 dB)."""
    images, labels = crops16
    model = build()
    exact = observe_gradient(model, torch.from_numpy(images[1:2]), torch.tensor([int(labels[1])]))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    after = {name: (p - 0.01 * exact.gradients[name]).float() for name, p in before.items()}
    update = ObservedUpdate.from_weight_delta(model, before, after, 0.01, 1, SPEC16.shape, 10)
    result = LayerwiseInversion().reconstruct(update)
    assert psnr(result.inputs, images[1:2]) >= 40.0


def test_relu_zeros_remove_weight_equations() -> None:
    """R-GAP's CNN6 with ReLU: the first conv keeps only the weight equations of positive outputs,
    which leaves it rank-deficient (LeakyReLU's CNN6 is full rank there)."""
    torch.manual_seed(0)
    report = security_report(build_model("cnn6-relu", InputSpec((3, 32, 32), 10)), (3, 32, 32))
    first = report.layers[0]
    zeros = int(first.treatment.split("ReLU: ")[1].split(" of ")[0])
    assert first.equations == 12 * 3 * 16 + (12 * 17 * 17 - zeros) + (3888 - 3072)
    assert first.deficit > 0 and report.deficient_layers[0] == 0


# --- what the server cannot know ---------------------------------------------------------------


def test_max_pooling_is_an_upper_bound_and_the_attack_declines() -> None:
    torch.manual_seed(0)
    spec = InputSpec((3, 16, 16), 10)
    model = build_model("convnet-maxpool", spec)
    report = security_report(model, spec.shape)
    assert report.upper_bound and report.complete
    assert all(
        "MaxPool2d: winners assumed known (upper bound on leakage)" in r.treatment for r in report.layers[:2]
    )
    images, labels = photo_crops(1, size=16, seed=0)
    with pytest.raises(AttackError, match=r"layer 5 \(MaxPool2d\).*which input won"):
        attack(model, images[0], int(labels[0]))


def test_residual_blocks_are_named_not_guessed() -> None:
    torch.manual_seed(0)
    spec = InputSpec((3, 16, 16), 10)
    model = build_model("resnet-mini", spec)
    report = security_report(model, spec.shape)
    assert not report.complete and not report.invertible
    notes = [part.note for part in report.untreated]
    assert notes[1].startswith(
        "layer 3 (ResidualBlock): not treated layer-wise — see the end-to-end identifiability"
    )
    assert notes[0].startswith(
        "layer 0 (Conv2d): its output reaches the next layer through layer 3 (ResidualBlock)"
    )
    assert [r.kind for r in report.layers] == ["Linear"]  # the head is still analysed
    assert "ResidualBlock" in report.to_table() and report.to_dict()["complete"] is False
    images, labels = photo_crops(1, size=16, seed=0)
    with pytest.raises(AttackError, match=r"layer 3 \(ResidualBlock\): not treated layer-wise"):
        attack(model, images[0], int(labels[0]))


def test_train_mode_batchnorm_counts_its_statistics() -> None:
    """Batch statistics are unknown: 2 C extra unknowns, and the input only up to scale. The zoo's
    convnet-bn also pools after its ReLUs, which hides their pattern from the attack."""
    torch.manual_seed(0)
    spec = InputSpec((3, 16, 16), 10)
    model = build_model("convnet-bn", spec)  # built in train mode
    report = security_report(model, spec.shape)
    first = report.layers[0]
    assert first.extra_unknowns == 32 and first.unknowns == 3 * 18 * 18 + 32
    assert first.deficit >= 1 and "BatchNorm2d (train)" in first.treatment
    assert first.upper_bound and "ReLU: pattern under the op above assumed known" in first.treatment
    images, labels = photo_crops(1, size=16, seed=0)
    with pytest.raises(AttackError, match=r"layer 6 \(ReLU\): which entries pass is hidden"):
        attack(model, images[0], int(labels[0]))
    layers = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.LeakyReLU(0.2), nn.Flatten(), nn.LazyLinear(10)
    )
    plain = SequentialClassifier(layers, spec)
    plain(torch.zeros(1, *spec.shape))
    with pytest.raises(AttackError, match=r"layer 1 \(BatchNorm2d\) normalises with the batch's own mean"):
        attack(plain, images[0], int(labels[0]))


def test_gelu_says_where_it_is_not_invertible() -> None:
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(16 * 64, 10))
    spec = InputSpec((3, 8, 8), 10)
    report = security_report(SequentialClassifier(layers, spec), spec.shape)
    assert "GELU:" in report.layers[0].treatment and "two preimages" in report.layers[0].treatment
    assert report.layers[0].upper_bound and report.layers[0].deficit == 0


# At 3x32x32 cnn6, cnn6-d, mlp and lenet are covered by test_security_metric, cnn6-relu above.
# Every model with a flat layer chain; a branched family (e.g. hybrid-sc) has no layer-wise report.
def _flat_on_digits(name: str) -> bool:
    """Whether `name` takes 8x8 images as a flat layer chain (a token-only family takes none)."""
    try:
        return build_model(name, InputSpec((1, 8, 8), 10)).layers is not None
    except UnsupportedInputError:
        return False


REPORTED = [(name, (1, 8, 8)) for name in available_models() if _flat_on_digits(name)]
REPORTED += [(name, (3, 32, 32)) for name in ("convnet-bn", "convnet-maxpool", "resnet-mini")]


@pytest.mark.parametrize(("name", "shape"), REPORTED, ids=[f"{n}-{s[0]}x{s[1]}" for n, s in REPORTED])
def test_every_registered_model_gets_a_report(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    report = security_report(build_model(name, InputSpec(shape, 10)), shape)
    assert report.layers and report.layers[-1].kind == "Linear"
    assert report.complete == (name != "resnet-mini")
    assert all(r.rank <= r.unknowns for r in report.layers) and report.to_table()


# --- autograd-built systems agree with the structured ones --------------------------------------


def _random_k(layer, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(layer.out_shape)


@pytest.mark.parametrize(
    ("module", "in_shape"),
    [(nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False), (3, 9, 9)), (nn.Linear(20, 7), (20,))],
    ids=["conv2d", "linear"],
)
@pytest.mark.parametrize("masked", [False, True], ids=["all-rows", "relu-rows"])
def test_generic_and_structured_agree(module: nn.Module, in_shape: tuple[int, ...], masked: bool) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    layer = bilinear_layer_of(module, in_shape, 0)
    geom = geometry_of(module, in_shape, 0)
    weight = layer.weight.numpy()
    x = rng.standard_normal(layer.unknowns)
    k = _random_k(layer, rng)
    rows = rng.random(layer.out_size) < (0.5 if masked else 2.0)
    z = layer.apply(x[None])[0]
    grad_w = layer.weight_gradient(k, x[None])[0].reshape(weight.shape)
    cons = OutputConstraints(rows, np.where(rows, z, 0.0))
    weight_rows = rows.reshape(layer.out_shape) if masked else None
    structured = build_system(geom, weight, k, grad_w, z.reshape(layer.out_shape), weight_rows)
    x_s, info_s = solve_normal(structured)
    x_g, info_g, alpha = constrained_solve(layer, None, k, cons, grad_w)
    assert alpha == pytest.approx(structured.alpha, rel=1e-12)
    rank_g, parts = constrained_rank(layer, None, k, cons)
    assert np.allclose(
        parts.system.gram, structured.gram, rtol=1e-10, atol=1e-10 * abs(structured.gram).max()
    )
    assert info_g.rank == info_s.rank == rank_g.rank
    if info_s.deficit == 0:
        assert np.allclose(x_g, x, atol=1e-8) and np.allclose(x_s, x, atol=1e-8)


def _dense_rank(
    module: nn.Module, in_shape: tuple[int, ...], k: np.ndarray, rows: np.ndarray
) -> tuple[int, int]:
    """Reference: dense [alpha K; W[rows]] from torch.autograd.functional.jacobian of the module
    itself (bias-free), SVD rank with the same tolerance rule."""
    module = module.double()
    weight = module.weight.detach()
    kt = torch.from_numpy(k)[None]

    def forward(x: torch.Tensor) -> torch.Tensor:
        return module(x.reshape(1, *in_shape)).reshape(-1)

    def weight_grad(x: torch.Tensor) -> torch.Tensor:
        w = weight.clone().requires_grad_(True)
        out = torch.func.functional_call(module, {"weight": w}, (x.reshape(1, *in_shape),))
        (g,) = torch.autograd.grad((out * kt).sum(), w, create_graph=True)
        return g.reshape(-1)

    x0 = torch.zeros(int(np.prod(in_shape)), dtype=torch.float64)
    wmat = torch.autograd.functional.jacobian(forward, x0).numpy()[rows]
    kmat = torch.autograd.functional.jacobian(weight_grad, x0).numpy()
    alpha = np.sqrt((wmat**2).sum() / (kmat**2).sum())
    s = np.linalg.svd(np.vstack([alpha * kmat, wmat]), compute_uv=False)
    return int((s > RANK_RTOL * s[0]).sum()), x0.numel()


@pytest.mark.parametrize(
    ("module", "in_shape"),
    [
        (nn.Conv2d(2, 2, 3, padding=2, dilation=2, bias=False), (2, 7, 7)),
        (nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False), (4, 6, 6)),
        (nn.Conv1d(3, 2, 3, stride=2, padding=1, bias=False), (3, 11)),
        (nn.Conv1d(2, 1, 2, padding=1, padding_mode="circular", bias=False), (2, 8)),
        (nn.Linear(4, 3, bias=False), (5, 4)),
    ],
    ids=["dilated-conv2d", "grouped-conv2d", "strided-conv1d", "circular-conv1d", "linear-on-a-sequence"],
)
def test_generic_rank_matches_a_dense_reference(module: nn.Module, in_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    layer = bilinear_layer_of(module, in_shape, 0)
    k = _random_k(layer, rng)
    ranks = []
    for fraction in (1.0, 0.3):  # all weight rows known; few known (ReLU-like): deficient here
        rows = rng.random(layer.out_size) < fraction
        cons = OutputConstraints(rows, np.zeros(layer.out_size))
        info, _ = constrained_rank(layer, None, k, cons)
        reference, unknowns = _dense_rank(module, in_shape, k, rows)
        assert info.rank == reference and info.unknowns == unknowns
        ranks.append(info.rank)
    assert ranks[1] < layer.unknowns


def test_attention_input_projection_is_a_sequence_linear() -> None:
    """The q/k/v projection of attention: dL/dW = sum_t k_t x_t^T, built from the weight alone."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(4, 2)
    layer = projection(attention.in_proj_weight, (5, 4))
    linear = nn.Linear(4, 12, bias=False)
    with torch.no_grad():
        linear.weight.copy_(attention.in_proj_weight)
    reference = bilinear_layer_of(linear, (5, 4), 0)
    k = np.random.default_rng(0).standard_normal(layer.out_shape)
    cons = OutputConstraints.full(np.zeros(layer.out_size))
    assert layer.out_shape == (5, 12)
    assert (gradient_matrix(layer, k) != gradient_matrix(reference, k)).nnz == 0
    assert constrained_rank(layer, None, k, cons)[0].rank == 20


def test_embedding_tokens_are_recovered() -> None:
    """Embedding (one-hot unknowns) -> Flatten -> Linear: with embedding_dim >= length every token is
    determined by the embedding's gradient (dL/dE[v] = sum over positions of token v of k_t)."""
    torch.manual_seed(0)
    spec = InputSpec.tokens(4, vocab_size=12, num_classes=3)
    layers = nn.Sequential(nn.Embedding(12, 6), nn.Tanh(), nn.Flatten(), nn.Linear(24, 3))
    model = SequentialClassifier(layers, spec)
    report = security_report(model, spec.shape)
    assert [(r.kind, r.unknowns, r.deficit) for r in report.layers] == [
        ("Embedding", 48, 0),
        ("Linear", 24, 0),
    ]
    tokens = torch.tensor([[3, 7, 7, 0]])
    update = observe_gradient(model, tokens, torch.tensor([1]))
    result = LayerwiseInversion(input_range=None).reconstruct(update)
    assert result.inputs.tolist() == tokens.tolist()
