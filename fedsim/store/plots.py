"""The per-run plot: every evaluation metric the model reports, and the losses, per round."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure  # no pyplot: files only, the caller's backend untouched
from matplotlib.ticker import MaxNLocator

from fedsim.store.run_store import EPSILON_COLUMNS

# Metrics that are shares (accuracy and the like) get a fixed [0, 1] axis, so runs compare by eye.
UNIT_INTERVAL_METRICS = frozenset({"accuracy", "balanced_accuracy", "f1", "precision", "recall"})


def metric_columns_of(frame: pd.DataFrame) -> list[str]:
    """The model's evaluation metrics in a metrics.csv: every eval_ column but the loss."""
    return [c for c in frame.columns if c.startswith("eval_") and c != "eval_loss"]


def plot_metrics(metrics_csv: Path, output: Path) -> None:
    """One panel per evaluation metric (server test set, mean client validation), then losses."""
    frame = pd.read_csv(metrics_csv)
    server = frame[frame["stage"] == "server"].sort_values("round")
    clients_eval = frame[frame["stage"] == "evaluate"].groupby("round")
    clients_train = frame[frame["stage"] == "train"].groupby("round")
    metrics = metric_columns_of(frame)
    budgets = [c for c in EPSILON_COLUMNS if c in server and server[c].notna().any()]
    panels = len(metrics) + 1 + bool(budgets)
    fig = Figure(figsize=(5 * panels, 4))
    axes = fig.subplots(1, panels, squeeze=False)
    for ax, column in zip(axes[0], metrics, strict=False):
        name = column.removeprefix("eval_")
        ax.plot(server["round"], server[column], marker="o", label="server test")
        if len(clients_eval):
            mean_eval = clients_eval[column].mean()
            ax.plot(mean_eval.index, mean_eval.values, marker="s", label="clients' validation (mean)")
        ax.set(xlabel="round", ylabel=name, title=name.replace("_", " ").capitalize())
        if name in UNIT_INTERVAL_METRICS:
            ax.set_ylim(0, 1)
    if budgets:
        budget_ax = axes[0][-1]
        for column in budgets:
            budget_ax.plot(server["round"], server[column], marker="o", label=column.replace("_", " "))
        budget_ax.set(xlabel="round", ylabel="ε", title="Privacy budget spent")
    loss_ax = axes[0][len(metrics)]
    loss_ax.plot(server["round"], server["eval_loss"], marker="o", label="server test")
    if len(clients_train):
        mean_train = clients_train["train_loss"].mean()
        loss_ax.plot(mean_train.index, mean_train.values, marker="^", label="clients' training (mean)")
    loss_ax.set(xlabel="round", ylabel="loss", title="Loss")
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=100)
