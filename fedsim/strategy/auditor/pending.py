"""The audit off the federation's critical path: attacks run in worker processes while the
following rounds train, through a bounded queue.

- Plain data in (`audit_jobs.ReplyJob`, the global state as numpy, how clients train),
  `UpdateAudit`s out: the workers run the same functions as the serial auditor, each reading the
  round's model and client step once per round, so rows and grids are identical.
- In order: a round's rows are appended, and its grid submitted, only once every earlier round's
  are, so audit.csv reads as the serial audit wrote it.
- Bounded: at most `MAX_PENDING_ROUNDS` rounds in flight; submitting another waits for the
  oldest (back-pressure: the federation slows to the audit's pace rather than queueing global
  states without limit).
- Commits after audits: a callback (the round's checkpoint) runs only once that round's audit is
  written, so a run killed with audits pending resumes from before them and re-audits those rounds.
- A worker that dies (a crash, the OOM killer) breaks the whole pool; every job in flight then
  fails alike. Each such job is retried alone in a one-worker pool of its own: the one that kills
  that pool too is the culprit and gets error rows; the others get their real results.
- Workers are started with `spawn`: the server runs in a threaded process (Flower, Ray), and
  forking one can deadlock the child.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from audits.scoring.engine import UpdateAudit, UpdateAuditor
from fedsim.strategy.auditor.jobs import (
    PlainState,
    ReplyJob,
    audit_reply,
    draw_round,
    round_model,
    security_score,
    with_rank_score,
)
from fedsim.training.client_step import ClientStep, ClientTraining
from models import ZooModel

# Two rounds: one being audited while the next is queued behind it, so a worker never idles
# waiting for the server to hand it work; more would only hold more global states in memory
# without auditing any faster (the workers' pace is the limit either way).
MAX_PENDING_ROUNDS = 2
CRASH_NOTE = "the audit worker process died while attacking this update ({error})"

log = logging.getLogger(__name__)


@dataclass
class _Job:
    """A submitted call, with what is needed to run it again alone if its pool breaks."""

    future: Future[Any]
    pool: ProcessPoolExecutor
    fn: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass
class _Round:
    number: int
    jobs: list[ReplyJob]
    security: _Job
    updates: list[_Job]
    grid: _Job | None = None
    after: list[Callable[[], None]] = field(default_factory=list)


class AuditQueue:
    """Audits rounds in `workers` processes; `write_rows` appends a round's finished audits."""

    def __init__(
        self,
        workers: int,
        auditor: UpdateAuditor,
        make_model: Callable[[], ZooModel],
        training: ClientTraining,
        grid_dir: Path,
        write_rows: Callable[[int, list[UpdateAudit]], None],
        max_rounds: int = MAX_PENDING_ROUNDS,
    ) -> None:
        self.workers, self.max_rounds = workers, max_rounds
        self.auditor, self.make_model, self.training = auditor, make_model, training
        self.grid_dir, self.write_rows = grid_dir, write_rows
        self._pool: ProcessPoolExecutor | None = None
        self._pending: deque[_Round] = deque()
        try:  # what each worker receives; fail here, not inside a round
            pickle.dumps((auditor, make_model, training))
        except Exception as err:
            raise TypeError(
                f"audit workers need a picklable auditor and model recipe ({err}); "
                "pass module-level functions or functools.partial, or use 0 workers"
            ) from err

    def start(self) -> None:
        """Start the workers (each loads its imports and data) while the first round trains."""
        if self._pool is None:
            self._pool = self._new_pool(self.workers)
            self._pool.submit(_warm_up)

    def submit(self, server_round: int, global_state: dict[str, torch.Tensor], jobs: list[ReplyJob]) -> None:
        """Queue a round's audit; waits first while `max_rounds` rounds are pending."""
        self._advance()
        while len(self._pending) >= self.max_rounds:  # back-pressure: wait for the oldest round
            self._advance(wait_for=self._pending[0].number)
        state = PlainState.of(global_state)
        security = self._submit(_security_job, server_round, state)
        updates = [self._submit(_audit_job, server_round, state, job, self.training) for job in jobs]
        self._pending.append(_Round(server_round, jobs, security, updates))

    def after(self, callback: Callable[[], None]) -> None:
        """Run `callback` once every round submitted so far is written (now if none is pending)."""
        if self._pending:
            self._pending[-1].after.append(callback)
        else:
            callback()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def drain(self) -> None:
        """Wait for every pending audit, writing each round in order (the run's end)."""
        if self._pending:
            self._advance(wait_for=self._pending[-1].number)

    def close(self) -> None:
        """Drain, then stop the workers."""
        try:
            self.drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None

    # -- internals ---------------------------------------------------------------------------

    def _new_pool(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.auditor, self.make_model, str(self.grid_dir)),
        )

    def _submit(self, fn: Callable[..., Any], *args: Any) -> _Job:
        self.start()
        assert self._pool is not None
        try:
            return _Job(self._pool.submit(fn, *args), self._pool, fn, args)
        except BrokenProcessPool:  # a worker died since the last submit: a fresh pool
            self._renew(self._pool)
            return _Job(self._pool.submit(fn, *args), self._pool, fn, args)

    def _renew(self, broken: ProcessPoolExecutor) -> None:
        if self._pool is broken:
            broken.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool(self.workers)

    def _result(self, job: _Job) -> Any:
        """The job's result; if its pool broke, run it again alone (raises BrokenProcessPool
        when it kills that pool too: it is the crashing job)."""
        try:
            return job.future.result()
        except BrokenProcessPool:
            self._renew(job.pool)
            log.warning(
                "an audit worker died; running %s again alone to find the crashing update", job.fn.__name__
            )
            alone = self._new_pool(1)
            try:
                return alone.submit(job.fn, *job.args).result()
            finally:
                alone.shutdown(wait=True, cancel_futures=True)

    def _advance(self, wait_for: int = 0) -> None:
        """Write the leading rounds whose work is done, waiting for those up to round `wait_for`."""
        while self._pending:
            head = self._pending[0]
            block = head.number <= wait_for
            if head.grid is None:
                if not block and not all(j.future.done() for j in [head.security, *head.updates]):
                    return
                self._write(head)
            assert head.grid is not None
            if not block and not head.grid.future.done():
                return
            try:
                self._result(head.grid)
            except Exception:  # the grid observes the audit; its loss never stops the run
                log.exception("round %d: the audit grid failed; the federation goes on", head.number)
            self._pending.popleft()
            for callback in head.after:  # e.g. the round's checkpoint: its errors propagate
                callback()

    def _write(self, head: _Round) -> None:
        """Collect the round's audits in client order, append its rows, submit its grid."""
        try:
            score = self._result(head.security)
        except Exception:
            log.exception("round %d: the security metric failed in its worker", head.number)
            score = None
        audits = [self._collected(job, reply) for job, reply in zip(head.updates, head.jobs, strict=True)]
        audits = with_rank_score(audits, score)
        try:
            self.write_rows(head.number, audits)
        except Exception:  # the audit observes the federation; it must never stop it
            log.exception("round %d: the audit failed; the federation goes on", head.number)
        partitions = [job.context.partition_id for job in head.jobs]
        head.grid = self._submit(_draw_job, audits, partitions, head.number)

    def _collected(self, job: _Job, reply: ReplyJob) -> UpdateAudit:
        try:
            return self._result(job)
        except BrokenProcessPool as err:
            return self.auditor.failed(reply.context, CRASH_NOTE.format(error=f"{type(err).__name__}: {err}"))
        except Exception as err:  # e.g. a result that could not be sent back
            return self.auditor.failed(reply.context, f"audit job failed: {type(err).__name__}: {err}")


# -- in the worker processes ---------------------------------------------------------------------

_worker: dict[str, Any] = {}


def _init_worker(auditor: UpdateAuditor, make_model: Callable[[], ZooModel], grid_dir: str) -> None:
    # One thread per worker: the attacks' small graphs gain nothing from more, and the
    # federation's own processes need the other cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    # A killed server (`kill -9`, a test's timeout) cannot stop its pool: a worker leaves with it.
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _worker.update(auditor=auditor, make_model=make_model, grid_dir=Path(grid_dir), model=None, step=None)


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _warm_up() -> None:
    """Build the model once: imports and the dataset's load happen before the first audit."""
    with torch.random.fork_rng(devices=[]):
        _worker["make_model"]()


def _model(server_round: int, state: PlainState) -> tuple[ZooModel, dict[str, torch.Tensor]]:
    """The round's model, built once per round and worker, as the serial auditor builds it once."""
    cached = _worker["model"]
    if cached is None or cached[0] != server_round:
        tensors = state.tensors()
        cached = (server_round, round_model(_worker["make_model"], tensors), tensors)
        _worker["model"] = cached
    return cached[1], cached[2]


def _step(server_round: int, model: ZooModel, training: ClientTraining) -> ClientStep:
    """The round's client step, read once per round and worker from the round's model."""
    cached = _worker.get("step")
    if cached is None or cached[0] != server_round:
        cached = (server_round, training.step(model, server_round))
        _worker["step"] = cached
    return cached[1]


def _security_job(server_round: int, state: PlainState) -> float | None:
    return security_score(_model(server_round, state)[0])


def _audit_job(server_round: int, state: PlainState, job: ReplyJob, training: ClientTraining) -> UpdateAudit:
    model, global_state = _model(server_round, state)
    step = _step(server_round, model, training)
    return audit_reply(_worker["auditor"], model, global_state, job, step)


def _draw_job(audits: Sequence[UpdateAudit], partitions: Sequence[int | None], server_round: int) -> None:
    draw_round(audits, partitions, server_round, _worker["grid_dir"], _worker["auditor"].decode)
