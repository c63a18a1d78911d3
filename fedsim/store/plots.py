"""The per-run plot: server-side test accuracy and losses per round."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or in CI
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator


def plot_metrics(metrics_csv: Path, output: Path) -> None:
    """Two panels: accuracy (server test set, mean client validation) and losses per round."""
    frame = pd.read_csv(metrics_csv)
    server = frame[frame["stage"] == "server"].sort_values("round")
    clients_eval = frame[frame["stage"] == "evaluate"].groupby("round")
    clients_train = frame[frame["stage"] == "train"].groupby("round")
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    acc_ax.plot(server["round"], server["eval_accuracy"], marker="o", label="server test")
    if len(clients_eval):
        mean_eval = clients_eval["eval_accuracy"].mean()
        acc_ax.plot(mean_eval.index, mean_eval.values, marker="s", label="clients' validation (mean)")
    acc_ax.set(xlabel="round", ylabel="accuracy", title="Accuracy", ylim=(0, 1))
    loss_ax.plot(server["round"], server["eval_loss"], marker="o", label="server test")
    if len(clients_train):
        mean_train = clients_train["train_loss"].mean()
        loss_ax.plot(mean_train.index, mean_train.values, marker="^", label="clients' training (mean)")
    loss_ax.set(xlabel="round", ylabel="loss", title="Loss")
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
