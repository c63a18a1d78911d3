"""The minilm family in a federation, end to end."""

from __future__ import annotations

import pytest

from tests.support.optional import require_fortunes, require_minilm
from tests.support.runs import final_server_accuracy, run_fedsim


@pytest.mark.slow
def test_minilm_learns_the_topics_in_a_federation(tmp_path) -> None:
    """Two clients, two short rounds of fine-tuning the top two layers: the server's topic
    accuracy clears chance (1/6) by far (the fidelity benchmark measures the full comparison)."""
    require_fortunes()
    require_minilm()
    result = run_fedsim(
        [
            "run", "--model", "minilm", "--dataset", "fortunes-minilm", "--clients", "2", "--rounds", "2",
            "--local-epochs", "1", "--max-local-steps", "8", "--batch-size", "32", "--learning-rate", "0.02",
            "--fraction-evaluate", "0", "--server-eval-samples", "192", "--runs-dir", str(tmp_path),
            "--name", "minilm",
        ],
        tmp_path,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert final_server_accuracy(tmp_path / "minilm") > 0.45
