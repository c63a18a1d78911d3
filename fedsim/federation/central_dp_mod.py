"""The client's half of central DP with client-side clipping: Flower's own clipping mods.

Flower's `DifferentialPrivacyClientSide{Fixed,Adaptive}Clipping` wrappers put the clipping norm
into the train message; the matching mod clips the update the client returns to that norm, so the
server only ever receives clipped updates. The mod is attached to `train` only (on evaluate
messages Flower's central-DP mods break the reply), and runs only when the server asks for it,
so one ClientApp serves runs with and without central DP. Flower's mods pair the reply's arrays
with the message's by name and order, so a client asked to clip replies with its whole federated
model even in a round whose `sent_names` are fewer (`asks_for_client_clipping`).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedsim import wire

ADAPTIVE_KEY = wire.RUN_CONFIG_PREFIX + "adaptive-clipping"


def asks_for_client_clipping(msg: Message) -> bool:
    """Whether the server's central-DP wrapper asks this client to clip its update."""
    config = msg.content.config_records.get(wire.CONFIG)
    return config is not None and KEY_CLIPPING_NORM in config


def central_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip this reply's update as the server's central-DP wrapper asked; otherwise pass it on."""
    if not asks_for_client_clipping(msg):
        return call_next(msg, context)
    config = msg.content.config_records[wire.CONFIG]
    mod = adaptiveclipping_mod if config.get(ADAPTIVE_KEY) is True else fixedclipping_mod
    return mod(msg, context, call_next)
