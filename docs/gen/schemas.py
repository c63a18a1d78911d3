"""The CSV files fedsim writes: their column lists imported from where the code declares them, and
the words the reference page adds for each column (the one thing a column list does not say).

`tests/docs/test_reference_pages.py` checks that every declared column has words here and that no
words are left for a column the code dropped.
"""

from __future__ import annotations

from docs.gen.reference import CsvSchema

METRICS = {
    "round": "the round (0: the initial model, server row only)",
    "partition_id": "the client; empty on server rows",
    "stage": "`train` (the client's local training), `evaluate` (the global model on the client's held-out "
    "10 %) or `server` (the global model on the held-out test split)",
    "train_loss": "the client's mean training loss over its local steps (train rows)",
    "eval_loss": "the model's evaluation loss (evaluate and server rows)",
    "eval_accuracy": "one `eval_<metric>` column per metric the model declares (`ZooModel.metric_names`; "
    "classifiers: `eval_accuracy`, language models add e.g. `eval_perplexity`)",
    "num_examples": "the examples the row is about",
    "seconds": "the client's seconds for train and evaluate rows; on server rows the round's wall time",
    "epsilon_central": "server rows: central DP's client-level ε after the round; empty without central DP",
    "epsilon_client_max": "server rows: the largest cumulative DP-SGD (sample-level) ε of any client; "
    "empty without DP-SGD",
}

AUDIT = {
    "round": "the federation round; empty for `fedsim audit`",
    "partition_id": "the audited client; empty for `fedsim audit` and for a SecAgg+ aggregate",
    "sample": "`fedsim audit`: the attacked sample's test-split index; empty in a federation",
    "attack": "the attack's registry name",
    "threat": "what the server saw: FedSGD with batch 1 and one step, a multi-step or batched update "
    "(the mean gradient along the local trajectory), or a SecAgg+ aggregate of n clients",
    "defences": "the labels the client reported, e.g. `dp-sgd(z=1.1,C=1) topk(0.1)`, and central DP's, "
    "marked `:after-view` (server side) or `:clipped-before-view` (client-side clipping); `secagg` last "
    "under SecAgg+",
    "batch_size": "the client's batch size (SecAgg+: the round's total examples)",
    "local_steps": "the client's local steps (SecAgg+: the clients' example-weighted mean)",
    "status": "`reconstructed`, `declined` (the attack does not apply; `note` says why), `failed` "
    "(it raised; the federation goes on) or `noise only` (a DP-SGD client whose Poisson batches were "
    "all empty: no sample to reconstruct)",
    "psnr": "mean PSNR (dB) over the reconstructed images, each against its nearest true sample; empty "
    "where the node shares no samples",
    "ssim": "mean SSIM, as `psnr`",
    "label_score": "share of recovered labels that match a distinct true label (a multiset match: a "
    "batch-8 update with 6 labels right scores 0.75)",
    "token_precision": "text attacks: precision of the recovered token set (empty for images)",
    "token_recall": "text attacks: recall of the recovered token set",
    "exact_sequence": "text attacks: share of true sequences recovered verbatim",
    "rouge1": "text attacks: ROUGE-1 F of the recovered words (`rouge-score`)",
    "rouge2": "text attacks: ROUGE-2 F",
    "bleu": "text attacks: BLEU (0..100, `sacrebleu`) of the recovered words",
    "recovered_labels": "the labels the attack recovered, space-separated, as the model's targets",
    "true_labels": "the dataset labels of the update's samples; empty without ground truth",
    "rank_score": "the security metric of the model at that round (COPA's input-weighted layer-wise "
    "score; 0 = every layer invertible)",
    "seconds": "the attack's wall time on this update",
    "note": "why the attack declined or failed, which attack `auto` chose, or that leakage is not "
    "measurable (the node shares no samples)",
}

PRIVACY = {
    "round": "the round",
    "partition_id": "the client (DP-SGD rows); empty on central-DP rows",
    "mechanism": "`dp-sgd` or `central-dp(server)` / `central-dp(client)`",
    "epsilon": "DP-SGD: that client's cumulative ε, composed over its rounds with Opacus's RDP "
    "accountant; central DP: Flower's accountant's ε after the round; empty for adaptive clipping",
    "epsilon_round": "the round's ε as the client reported it",
    "delta": "the δ at which ε is stated (`target-delta`)",
    "noise_multiplier": "z (DP-SGD: the calibrated one under `--target-epsilon`)",
    "clip_norm": "C: the per-sample (DP-SGD) or per-update (central DP) clipping norm",
    "sample_rate": "Opacus's sampling rate q",
    "steps": "the steps the round took",
    "sampling": "what the ε assumes: `poisson`; `shuffle` (batches were shuffled: the ε is Opacus's value "
    "for Poisson sampling at the same rate, not a proven bound); `no-amplification` (central DP); "
    "`adaptive` (no accountant)",
}

FAULTS = {
    "round": "the round",
    "stage": "`train` or `evaluate`",
    "partition_id": "the client, where known",
    "node_id": "Flower's node id",
    "kind": "`rejected` (reply validation refused it), `failed` (the client raised) or `no-reply` "
    "(sampled, silent within `round-timeout`)",
    "reason": "validation's reason, or the client's exception message",
}

COMPARE = {
    "cell": "the cell id, `<model label>__<dataset label>__<defence slug>__s<seed>` (its run directory's "
    "name under `runs/`)",
    "model": "as run",
    "dataset": "as run",
    "defence": "short label: `none`, `clip(C=1)`, `top-k(0.1)`, `dp-sgd(ε=8)` / `dp-sgd(z=1.1)`, "
    "`gaussian(σ=0.01)`, `central-dp(z=0.5)`",
    "defence_params": "JSON object of the run-config keys the defence set, e.g. "
    '`{"clipping-norm": 1.0, "defence": "clip"}`; `{}` for none',
    "seed": "as run",
    "status": "`ok`, or `failed`",
    "error": "empty, or the one-line error of a failed cell",
    "accuracy": "the server's test accuracy after the last round",
    "model_metrics": "JSON of the other final server metrics without their `eval_` prefix, "
    'e.g. `{"loss": 2.30}`',
    "epsilon": "the larger of metrics.csv's `epsilon_central` and `epsilon_client_max` in the final round; "
    "empty without DP",
    "layerwise_score": "COPA's input-weighted layer-wise score on the final model (0: every layer "
    "invertible); empty where the metric does not apply",
    "e2e_deficit": "the rank deficit of J = ∂∇θL/∂x at the first report sample; empty where it cannot be "
    "computed (not gradient-trained; over 5 M parameters)",
    "psnr_ceiling": "Cramér–Rao PSNR ceiling in dB at the cell's noise level",
    "best_attack": "among the attacks that reconstructed something over the whole run, the one with the "
    "highest mean PSNR (text: the highest mean token recall)",
    "best_psnr": "that attack's mean PSNR",
    "best_ssim": "that attack's mean SSIM",
    "token_recall": "text cells: the best attack's mean token recall",
    "rouge1": "text cells: the best attack's mean ROUGE-1",
    "linear_regions": "mean linear regions per segment between the report samples; empty where the "
    "network is not piecewise linear",
    "wall_s": "wall time of the attempt that finished the cell: federation plus security report",
    "run_dir": "`runs/<cell>`, relative to the compare folder",
}


def csv_schemas() -> list[CsvSchema]:
    """The files as the code declares them today."""
    from audits.scoring.engine import AUDIT_COLUMNS
    from fedsim.grid.row import COLUMNS
    from fedsim.store.fault_log import FAULT_COLUMNS
    from fedsim.store.run_store import metric_columns
    from fedsim.strategy.privacy_ledger import PRIVACY_COLUMNS

    return [
        CsvSchema(
            "metrics.csv",
            "fedsim.store.run_store.metric_columns",
            "One row per round × client × stage, plus a server row per round (shown for a classifier).",
            metric_columns(("accuracy",)),
            METRICS,
        ),
        CsvSchema(
            "audit.csv",
            "audits.scoring.engine.AUDIT_COLUMNS",
            "One schema for federations (`--audit`: one row per round × audited client × attack) and "
            "for `fedsim audit` (one row per sample × attack).",
            AUDIT_COLUMNS,
            AUDIT,
        ),
        CsvSchema(
            "privacy.csv",
            "fedsim.strategy.privacy_ledger.PRIVACY_COLUMNS",
            "Written by a run that spends privacy budget: one row per client and round for DP-SGD, one "
            "per round for central DP.",
            PRIVACY_COLUMNS,
            PRIVACY,
        ),
        CsvSchema(
            "faults.csv",
            "fedsim.store.fault_log.FAULT_COLUMNS",
            "One row per unusable reply, train or evaluate.",
            FAULT_COLUMNS,
            FAULTS,
        ),
        CsvSchema(
            "compare.csv",
            "fedsim.grid.row.COLUMNS",
            "`fedsim compare`: one row per cell, in the spec's cell order; `cells.json` beside it lists "
            "every cell with its full run config.",
            COLUMNS,
            COMPARE,
        ),
    ]
