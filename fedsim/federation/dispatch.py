"""Hand the simulation's messages to its Ray workers without asking every node every 0.1 s.

Flower's simulation engine (`flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue`)
loops over all N virtual nodes every 0.1 s and asks the LinkState for each one's messages, and
each ask scans (and validates) every stored message: N × M checks per sweep, in the server's
process, for the whole of every round (delivered messages stay stored until their replies are
pulled). At 1,000–10,000 nodes that sweep, not the clients, is what the server spends its CPU
on. `install()` swaps in a sweep that first collects, in one pass, the nodes that have an
undelivered message, then asks only those, in node-registration (= partition) order as
Flower does. Other LinkStates than the in-memory one keep Flower's sweep.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from queue import Queue
from typing import Any

from flwr.server.superlink.fleet.vce import vce_api

_FLOWER_SWEEP = vce_api.add_messages_to_queue
SWEEP_SECONDS = 0.1  # Flower's pause between sweeps


def nodes_with_undelivered_messages(state: Any, nodes_mapping: Mapping[int, int]) -> Iterable[int]:
    """The nodes to ask this sweep: those with an undelivered message (one pass over the
    store), in `nodes_mapping`'s order; every node for a LinkState without an in-memory store."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return nodes_mapping.keys()
    with lock:
        waiting = {m.metadata.dst_node_id for m in store.values() if m.metadata.delivered_at == ""}
    return sorted((n for n in waiting if n in nodes_mapping), key=nodes_mapping.__getitem__)


def add_messages_to_queue(
    state: Any, queue: Queue, nodes_mapping: Mapping[int, int], f_stop: threading.Event
) -> None:
    """Flower's sweep (same signature, same queue, one message per node per sweep), asking only
    the nodes that have something waiting."""
    while not f_stop.is_set():
        for node_id in nodes_with_undelivered_messages(state, nodes_mapping):
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        f_stop.wait(SWEEP_SECONDS)


def install() -> None:
    """Use this sweep in this process's simulations (`run_api` looks the name up per run)."""
    vce_api.add_messages_to_queue = add_messages_to_queue


def uninstall() -> None:
    vce_api.add_messages_to_queue = _FLOWER_SWEEP
