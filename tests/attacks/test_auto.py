"""`auto` picks the layer-wise inversion where it applies and says why it fell back elsewhere."""

from __future__ import annotations

import pytest
import torch

from attacks.auto import CHOICE_KEY, AutoAttack
from attacks.base import AttackError, ObservedUpdate, observe_gradient
from attacks.optimisation.gradient_matching import InvertingGradients
from audits.scoring.engine import AuditContext, UpdateAuditor
from models import InputSpec, build_model

SPEC = InputSpec.image((3, 16, 16), 10)


def _update(name: str, batch: int = 1) -> ObservedUpdate:
    torch.manual_seed(0)
    model = build_model(name, SPEC)
    return observe_gradient(model, torch.rand(batch, *SPEC.shape), torch.arange(batch))


def test_auto_uses_the_layerwise_inversion_where_the_network_plan_covers_the_model() -> None:
    torch.manual_seed(1)
    image = torch.rand(1, *SPEC.shape)
    update = observe_gradient(build_model("cnn6-relu", SPEC), image, torch.tensor([3]))
    rec = AutoAttack(fallback=InvertingGradients(iterations=5)).reconstruct(update)
    assert rec.diagnostics[CHOICE_KEY] == "auto chose layerwise: its systems cover the network"
    assert torch.allclose(rec.inputs.float(), image, atol=1e-3)  # exact, as the layer-wise solve is


@pytest.mark.parametrize(
    ("name", "batch", "reason"),
    [("resnet-mini", 1, "see the end-to-end identifiability"), ("cnn6-relu", 2, "needs a batch-1 gradient")],
)
def test_auto_falls_back_to_an_optimisation_attack_and_the_row_says_why(
    name: str, batch: int, reason: str
) -> None:
    auditor = UpdateAuditor([AutoAttack(fallback=InvertingGradients(iterations=5))])
    audit = auditor.audit(_update(name, batch), None, AuditContext(threat="test", batch_size=batch))
    (row,) = audit.rows
    assert row.status == "reconstructed"
    assert row.note.startswith("auto chose inverting-gradients: layerwise declined (")
    assert reason in row.note


def test_auto_declines_when_neither_attack_applies() -> None:
    class Refuses:
        name = "refuses"

        def reconstruct(self, update):
            raise AttackError("never applies")

    with pytest.raises(AttackError, match=r"layerwise declined \(.*\); refuses: never applies"):
        AutoAttack(fallback=Refuses()).reconstruct(_update("resnet-mini"))
