"""A pretrained family whose base stays frozen: only a few tensors train and travel.

Every node rebuilds the same frozen base from the installed package, so the federated model
(`federated_names`) is the trained part alone, and what a client's update can reveal is decided
by *which* tensors train: `exposure` says so in words for the architecture report, because the
end-to-end analysis of a 20-135 M parameter forward pass does not fit an audit's budget.
"""

from __future__ import annotations

from models.base import ZooModel


class FrozenBaseModel(ZooModel):
    """A ZooModel with a frozen pretrained base and a small trained part."""

    def federated_names(self) -> tuple[str, ...]:
        """The trained state-dict entries (what is sent, aggregated and audited)."""
        trained = {name for name, p in self.named_parameters() if p.requires_grad}
        return tuple(name for name in self.state_dict() if name in trained)

    def exposure(self) -> str:
        """What a client's update carries, and which gradient attacks it admits, in one paragraph."""
        raise NotImplementedError
