"""Client defences in a federation: DP-SGD and top-k stop the attacks that reconstruct an
undefended update."""

from __future__ import annotations

import pytest

from attacks.base import ObservedUpdate
from attacks.registry import available_attacks
from audits.scoring.engine import RECONSTRUCTED, AuditContext, Truth, UpdateAuditor, threat_model
from fedsim.config.run_config import RunConfig
from fedsim.data.clients import client_data
from fedsim.training.local import model_for, train_locally

# --- what the defences buy: the FedSGD setting, attacked ---------------------------------
FEDSGD = RunConfig(
    dataset="photos", model="cnn6", image_size=32, num_clients=4, batch_size=1, max_local_steps=1,
    learning_rate=0.1, momentum=0.0, poisson_sampling=False, noise_multiplier=1.1, max_grad_norm=1.0,
)  # fmt: skip


def attack_one_client(config: RunConfig, attacks: list[str]) -> dict[str, object]:
    """Train client 0 for one round, observe its update as the server's auditor does, attack it."""
    model = model_for(config)
    start = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    data = client_data(config, 0)
    result = train_locally(model, data, config, server_round=1, partition_id=0)
    reference = model_for(config)
    names = [name for name, _ in reference.named_parameters()]
    update = ObservedUpdate.from_weight_delta(
        reference, {n: start[n] for n in names}, {n: result.weights[n] for n in names},
        config.learning_rate, result.steps, tuple(reference.spec.shape), reference.spec.num_classes,
        result.num_examples,
    )  # fmt: skip
    truth = Truth(data.x_train[result.seen].numpy(), data.y_train[result.seen].numpy())
    context = AuditContext(threat_model(1, 1), round=1, partition_id=0)
    return {row.attack: row for row in UpdateAuditor(attacks).audit(update, truth, context).rows}


@pytest.mark.slow
def test_dp_sgd_and_topk_stop_the_attacks_that_reconstruct_an_undefended_fedsgd_update() -> None:
    plain = attack_one_client(FEDSGD, ["layerwise"])["layerwise"]
    assert plain.status == RECONSTRUCTED and plain.psnr >= 40 and "sparsified" not in plain.note

    private = attack_one_client(FEDSGD.replace(defence="dp-sgd"), available_attacks())
    for attack, row in private.items():
        assert row.status != RECONSTRUCTED or row.psnr < 20, (attack, row.psnr)
    assert sum(row.status == RECONSTRUCTED for row in private.values()) >= 4

    sparse = attack_one_client(FEDSGD.replace(defence="topk", keep=0.1), ["layerwise"])["layerwise"]
    assert sparse.status == RECONSTRUCTED and sparse.psnr < plain.psnr - 20
    assert "update sparsified: 90% of gradient entries are zero" in sparse.note
