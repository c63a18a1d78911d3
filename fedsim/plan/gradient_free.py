"""Plan-time checks for a family not trained by gradients (`ZooModel.trained_by_gradients` False).

Such a family (LEDL) sends sufficient statistics and its server step replaces the aggregate, so
what assumes a gradient step or a weight average cannot work and is refused before the run:
client defences (DP-SGD clips per-sample gradients; clip/topk/gaussian transform a weight delta
that is zero), central DP (noise on an aggregate the server step overwrites), a strategy other
than FedAvg (FedProx's proximal term, FedAdam's server optimiser and the robust aggregators act
on weight updates, and the statistics would be summed unguarded anyway), and the federated
auditor (its attacks invert weight updates; `fedsim audit` reports the statistics instead).
SecAgg+ is refused by `secagg_plan.check_secagg_model` (the statistics are extra records).
"""

from __future__ import annotations

from fedsim.config.run_config import RunConfig
from fedsim.errors import UserInputError
from fedsim.strategy import central_dp
from fedsim.training.run_model import build_run_model
from models import InputSpec


def check_gradient_free(config: RunConfig, spec: InputSpec) -> None:
    """Raise UserInputError (one line) for a setting a gradient-free family cannot honour."""
    model = build_run_model(config.model, spec, config.model_options)
    if model.trained_by_gradients:
        return
    what = f"model {config.model!r} is not trained by gradients (its clients send statistics)"
    if config.transformation_names():
        raise UserInputError(
            f"--defence {config.defence} with {what}: client defences act on gradients or weight "
            "updates, and it has neither; drop --defence"
        )
    if config.central_dp != central_dp.OFF:
        raise UserInputError(
            f"--central-dp with {what}: its server step replaces the noised aggregate; drop --central-dp"
        )
    if config.strategy != "fedavg":
        raise UserInputError(
            f"--strategy {config.strategy} with {what}: its server step sums the statistics itself, so "
            "no strategy acts on them; use --strategy fedavg"
        )
    if config.audit:
        raise UserInputError(
            f"--audit with {what}: the gradient attacks see a zero weight update; drop --audit and run "
            f"`fedsim audit --model {config.model}` for what its statistics reveal"
        )
