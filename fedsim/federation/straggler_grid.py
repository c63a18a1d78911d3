"""A Grid view that waits for late replies only so long once a round's first reply is in.

Flower's `send_and_receive(timeout=T)` counts T from the send, so T must cover the slowest
honest round, the first one included, where every simulated actor imports torch and loads its
data (minutes on a loaded machine). A straggler deadline counts from the first reply instead,
as NVIDIA FLARE's `wait_time_after_min_received` does: cold starts cost nothing, and a hung or
dropped-out client costs one `round-timeout` wait per round, not the run. Flower's own timeout
(an hour) still bounds a round in which nobody answers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class StragglerDeadlineGrid:
    """Delegates to `grid`; `send_and_receive` stops waiting `after_first` seconds after the
    first reply arrived (or at the caller's `timeout`, whichever comes first)."""

    def __init__(self, grid: Grid, after_first: float, pull_interval: float = 0.1) -> None:
        self.wrapped = grid
        self.after_first = after_first
        self.pull_interval = pull_interval

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        waiting = set(self.wrapped.push_messages(messages))
        hard = time.monotonic() + timeout if timeout is not None else math.inf
        soft = math.inf
        replies: list[Message] = []
        while waiting and time.monotonic() < min(hard, soft):
            arrived = list(self.wrapped.pull_messages(waiting))
            if arrived and soft == math.inf:
                soft = time.monotonic() + self.after_first
            replies += arrived
            waiting.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
            if waiting:
                time.sleep(self.pull_interval)
        return replies

    def __getattr__(self, name: str):
        return getattr(self.wrapped, name)
