"""The security report of a cell's final global model, at the noise the cell's server faced.

Run as `python -m fedsim.grid.security RUN_DIR` (its own process, as each federation is: the
end-to-end analysis is CPU-bound torch work and must not share the grid's threads or global RNG),
it writes `RUN_DIR/compare-cell.json`: the layer-wise score, the end-to-end rank deficit, the
Cramér–Rao PSNR ceiling and the linear regions of `audits.architecture.report`, on the last
checkpoint and `SAMPLES` seeded test samples.

The noise level is what a curious server sees on its gradient estimate Δw / (lr · steps):
- `dp-sgd`: each step adds N(0, (zC)²) to the sum of a batch's clipped per-sample gradients and
  divides by the batch size B, so the per-step gradient carries std zC/B and the mean over a
  round's `steps` steps zC / (B √steps) (z as calibrated, from privacy.csv);
- `gaussian`: N(0, s²) on the update, i.e. s / (lr · steps) on the gradient estimate;
- `clip`, `topk`, no defence and central DP (whose noise is added after the server's view):
  none, and the bound is stated at the float32 rounding of the weight delta at the cell's lr.
Several noises add in quadrature.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audits.architecture.report import ObservationNoise, architecture_report
from fedsim.config.run_config import RunConfig
from fedsim.data.clients import dataset_for
from fedsim.store.audit_folder import AUDIT_FILE
from fedsim.store.csv_log import read_csv_rows
from fedsim.store.files import atomic_write
from fedsim.store.run_store import RunStore
from fedsim.strategy.privacy_ledger import PRIVACY_FILE
from fedsim.training.local import model_for
from models.base import load_federated_state

CELL_FILE = "compare-cell.json"
# Test samples the report is computed on: the first carries the end-to-end analysis and the
# PSNR ceiling, all three the linear regions (segments between them and the plane through them).
SAMPLES = 3


def observation_noise(config: RunConfig, run_dir: Path) -> tuple[float, str]:
    """The per-entry noise std on the server's gradient estimate, and how it was derived."""
    variance, parts = 0.0, []
    defences = config.transformation_names()
    if "dp-sgd" in defences:
        z, steps = _dp_sgd_noise(run_dir)
        sigma = z * config.max_grad_norm / (config.batch_size * math.sqrt(steps))
        variance += sigma**2
        clip, batch = config.max_grad_norm, config.batch_size
        parts.append(f"dp-sgd zC/(B √steps) = {z:.4g}·{clip:g}/({batch}·√{steps})")
    if "gaussian" in defences:
        steps = _local_steps(run_dir)
        sigma = config.noise_std / (config.learning_rate * steps)
        variance += sigma**2
        parts.append(f"gaussian s/(lr steps) = {config.noise_std:g}/({config.learning_rate:g}*{steps})")
    return math.sqrt(variance), "; ".join(parts) or "no noise before the server's view"


def _dp_sgd_noise(run_dir: Path) -> tuple[float, int]:
    """The last round's noise multiplier and steps (the largest over its clients) from privacy.csv."""
    rows = read_csv_rows(run_dir / PRIVACY_FILE)
    rows = [r for r in rows if r.get("mechanism") == "dp-sgd" and r.get("noise_multiplier")]
    if not rows:
        raise ValueError(f"{run_dir / PRIVACY_FILE} has no dp-sgd rows to read the noise multiplier from")
    last = max(int(r["round"]) for r in rows)
    final = [r for r in rows if int(r["round"]) == last]
    return max(float(r["noise_multiplier"]) for r in final), max(max(int(r["steps"]) for r in final), 1)


def _local_steps(run_dir: Path) -> int:
    """A client's local steps per round, as the auditor recorded them (1 when nothing was audited)."""
    steps = [int(r["local_steps"]) for r in read_csv_rows(run_dir / AUDIT_FILE) if r.get("local_steps")]
    return max(steps[-1], 1) if steps else 1


def cell_security(run_dir: Path) -> dict[str, Any]:
    """The architecture report's numbers on the run's last checkpoint (None where n/a, with notes)."""
    store = RunStore.open(run_dir)
    config = store.config
    last = store.last_complete_round()
    if last is None:
        raise ValueError(f"{run_dir} has no checkpoint")
    data = dataset_for(config)
    model = model_for(config, data)
    state, _ = store.load_checkpoint(last)
    load_federated_state(model, state)
    chosen = np.random.default_rng(config.seed).choice(
        len(data.y_test), size=min(SAMPLES, len(data.y_test)), replace=False
    )
    inputs = torch.from_numpy(np.ascontiguousarray(data.x_test[chosen]))
    labels = torch.from_numpy(np.asarray(data.y_test[chosen], dtype=np.int64))
    sigma, derived = observation_noise(config, run_dir)
    noise = ObservationNoise(sigma, rounding_learning_rate=config.learning_rate)
    report = architecture_report(
        model, inputs[:1], labels[:1], noise, bound_sample=int(chosen[0]), seed=config.seed, data=inputs
    )
    regions = report.regions
    applicable = regions is not None and regions.applicable and regions.mean_line_regions is not None
    return {
        "round": last,
        "layerwise_score": report.score,
        "layerwise_note": report.layerwise_note or None,
        "e2e_deficit": report.end_to_end_deficit,
        "e2e_note": report.identifiability_note or None,
        "psnr_ceiling": report.psnr_ceiling,
        "noise_sigma": sigma,
        "noise_derived": derived,
        "bound_at": noise.bound_at,
        "linear_regions": regions.mean_line_regions if applicable else None,
        "linear_regions_note": (regions.note if regions is not None else report.regions_note) or None,
        "samples": [int(i) for i in chosen],
        "security_seconds": report.seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = cell_security(args.run_dir)
    text = json.dumps(result, indent=2, default=_json_default) + "\n"
    atomic_write(args.run_dir / CELL_FILE, lambda tmp: Path(tmp).write_text(text))
    return 0


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
