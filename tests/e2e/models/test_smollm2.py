"""The smollm2 family in a federation, end to end."""

from __future__ import annotations

import pytest

from tests.support.optional import require_fortunes, require_smollm2
from tests.support.runs import final_server_accuracy, read_metrics, run_fedsim


@pytest.mark.slow
def test_smollm2_lora_federation_completes_and_perplexity_falls(tmp_path) -> None:
    require_fortunes()
    require_smollm2()
    result = run_fedsim(
        [
            "run", "--model", "smollm2", "--dataset", "fortunes-smollm2", "--clients", "2", "--rounds", "1",
            "--local-epochs", "1", "--max-local-steps", "4", "--batch-size", "8", "--learning-rate", "3e-3",
            "--fraction-evaluate", "0", "--server-eval-samples", "96", "--runs-dir", str(tmp_path),
            "--name", "lora",
        ],
        tmp_path,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    server = [r for r in read_metrics(tmp_path / "lora") if r["stage"] == "server"]
    assert [int(r["round"]) for r in server] == [0, 1]
    assert float(server[1]["eval_loss"]) < float(server[0]["eval_loss"])
    assert float(server[1]["eval_perplexity"]) < float(server[0]["eval_perplexity"])
    assert final_server_accuracy(tmp_path / "lora") > 0.2  # next-token accuracy of a real LM
