"""The protopnet family in a federation, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsim.data.registry import load_dataset
from tests.support.protopnet import FORWARD_ROUNDING, latent_patches, nearest_gap, protopnet_for
from tests.support.runs import final_server_accuracy, read_metrics, run_fedsim


@pytest.mark.slow
def test_federation_learns_and_its_push_round_leaves_real_patches(tmp_path: Path) -> None:
    """Digits, 3 clients, 4 rounds (no warm round): joint, joint, push (last layer), last layer; audited."""
    result = run_fedsim(
        ["run", "--name", "proto", "--model", "protopnet", "--dataset", "digits", "--clients", "3",
         "--rounds", "4", "--local-epochs", "3", "--model-options", "warm_rounds=0",
         "--fraction-evaluate", "0",
         "--audit", "--audit-attacks", "layerwise", "--audit-clients", "1"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "proto"
    assert final_server_accuracy(run) >= 0.80
    rows = [r for r in read_metrics(run) if r["stage"] == "server"]
    assert len(rows) == 5

    model = protopnet_for()
    model.load_state_dict(load_file(run / "checkpoints" / "round-0004.safetensors"))
    data = load_dataset("digits")
    inputs, labels = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    patches = latent_patches(model, inputs)
    classes = model.prototype_classes()
    prototypes = model.prototype_vectors.detach().flatten(1)
    for j in range(model.num_prototypes):
        own = patches[labels == classes[j]].reshape(-1, patches.shape[-1])
        assert nearest_gap(own, prototypes[j]) <= FORWARD_ROUNDING, f"prototype {j} is no patch of its class"
