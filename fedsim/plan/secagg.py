"""Secure aggregation's fixed settings and its plan-time checks (no Flower import: planning runs them).

Flower's SecAgg+ (`SecAggPlusWorkflow` + `secaggplus_mod`) masks integers, so each client's update
is quantised first: the client multiplies its update by its weight `w_i = num_examples /
max_weight` (itself rounded to a multiple of 1/QUANTIZATION_RANGE), clips every entry to
±CLIPPING_RANGE and rounds it stochastically to one of QUANTIZATION_RANGE levels, a step of
QUANTIZATION_STEP. The server unmasks the sum and divides by Σ w_i: the FedAvg average, off by at
most `n · QUANTIZATION_STEP / Σ w_i` per entry for n clients. fedsim's clients send the update
Δ = local − global (not their weights, as Flower's example does), whose entries are far inside
±CLIPPING_RANGE, and `max_weight` is the largest partition, so every w_i is close to 1.
"""

from __future__ import annotations

from functools import lru_cache

from fedsim.config.run_config import DEFAULT_REJECT_NORM_RATIO, RunConfig
from fedsim.data.clients import dataset_for
from fedsim.data.partition import partition
from fedsim.errors import UserInputError
from fedsim.strategy.model_hook import overrides_after_aggregation
from fedsim.training.local import training_settings
from fedsim.training.run_model import build_run_model
from models import InputSpec

# Flower's defaults, passed explicitly so that client checks and docs cannot drift from them.
CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32
QUANTIZATION_STEP = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
# The unmasked sum of n clients' quantised entries (each < QUANTIZATION_RANGE) must stay below
# the modulus, or it wraps around silently.
MAX_CLIENTS_PER_ROUND = MODULUS_RANGE // QUANTIZATION_RANGE - 1


@lru_cache(maxsize=4)
def max_weight(config: RunConfig) -> int:
    """SecAgg+'s `max_weight`: the largest partition, which bounds any client's example count.

    Server and clients derive it from the config alike (partitions are a function of it), so no
    extra key travels; a client's weight `num_examples / max_weight` is then at most 1 (Flower
    warns of overflow above) and as large as possible (its precision grows with it)."""
    data = dataset_for(config)
    return max(len(part) for part in partition(data.y_train, config.partition_spec(), data.covariate_train))


def check_secagg(config: RunConfig) -> None:
    """Raise UserInputError for a `--secagg` run that Flower's SecAgg+ or fedsim cannot carry out."""
    if not config.secagg:
        return
    if config.strategy != "fedavg":
        raise UserInputError(
            f"--secagg needs --strategy fedavg (got {config.strategy}): under SecAgg+ the server gets only "
            "the weighted sum of the updates, which other aggregators cannot use; pass --strategy fedavg"
        )
    if config.central_dp != "off":
        raise UserInputError(
            f"--secagg and --central-dp {config.central_dp} are not combined yet; drop one of them"
        )
    # The default norm check is a safety net where the server sees updates; SecAgg+ hides them, so
    # only a value the user chose is an error.
    if config.reject_norm_ratio not in (0, DEFAULT_REJECT_NORM_RATIO):
        raise UserInputError(
            "--reject-norm-ratio cannot work with --secagg: the server never sees a client's update, "
            "so it cannot measure its norm; pass --reject-norm-ratio 0"
        )
    sampled = config.sampled_clients()
    if sampled < 2:
        raise UserInputError(
            f"--secagg needs at least 2 clients per round (got {sampled}): a sum of one update is that "
            "update; add clients or raise --fraction-train"
        )
    if sampled > MAX_CLIENTS_PER_ROUND:
        raise UserInputError(
            f"--secagg sums at most {MAX_CLIENTS_PER_ROUND} clients per round (got {sampled}): SecAgg+'s "
            f"2^32 modulus holds that many quantised updates; lower --fraction-train or --clients"
        )
    shares, threshold = config.secagg_shares, config.secagg_threshold
    if shares > sampled:
        raise UserInputError(
            f"secagg-shares {shares} exceeds the {sampled} clients sampled per round; "
            f"pass --secagg-shares {sampled} or fewer"
        )
    if shares % 2 == 0 and shares != sampled:
        # Flower builds each client's neighbourhood from `shares // 2` clients on either side, so an
        # even count below the sample size gives one neighbour more than there are shares.
        raise UserInputError(
            f"secagg-shares {shares} must be odd or equal to the {sampled} clients sampled per round "
            f"(SecAgg+ shares each key with a ring of neighbours around the client); "
            f"pass --secagg-shares {shares - 1}"
        )
    if threshold >= shares:
        raise UserInputError(
            f"secagg-threshold {threshold} must be below secagg-shares {shares} (SecAgg+ rebuilds a dropped "
            f"client's key from that many of its shares); pass --secagg-threshold {shares - 1} or less"
        )


def check_secagg_model(config: RunConfig, spec: InputSpec) -> None:
    """A family with a server-side step on its clients' extra records (ProtoPNet's push) cannot
    run under SecAgg+, whose messages carry only the masked weights; nor can one whose clients
    send only part of the federated model in some round (`sent_names`): SecAgg+ sums one masked
    vector of the same length from every client."""
    if not config.secagg:
        return
    model = build_run_model(config.model, spec, config.model_options)
    if overrides_after_aggregation(model):
        raise UserInputError(
            f"--secagg with model {config.model!r}: its server-side step reads each client's extra "
            "records (e.g. ProtoPNet's push candidates), which SecAgg+ does not carry; drop --secagg"
        )
    model.run_settings = training_settings(config)
    federated = model.federated_names()
    partial = next((r for r in range(1, config.rounds + 1) if model.sent_names(r) != federated), None)
    if partial is not None:
        raise UserInputError(
            f"--secagg with model {config.model!r}: in round {partial} its clients send only part of "
            "its federated model, and SecAgg+ masks one vector of the same arrays from every client "
            "in every round; drop --secagg"
        )
