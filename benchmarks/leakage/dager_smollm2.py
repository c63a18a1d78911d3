"""DAGER on SmolLM2-135M: sequence recovery from real fortunes, and what LoRA-only updates leak.

(a) The first two blocks train (everything else frozen, the embedding too): the FedSGD gradient
of the mean next-token loss of B fortunes (16-24 tokens each), B in 1, 2, 4, 8, attacked by
`attacks.text.dager_llama.DagerLlamaAttack`; token precision/recall, exact-sequence rate, ROUGE-1/2
and seconds per update (the attack alone; the client's gradient is timed apart).
(b) Only LoRA adapters train (peft, rank 8, alpha 16, on q_proj and v_proj of every block).
Step 1: B = 0 as peft initialises it, so the A gradients vanish; the span test runs on block 0's
B gradients, whose rows are A x (candidates mapped by x ↦ A x). Step 2: B has moved by one local
SGD step (lr 0.5) on another batch of fortunes; the span test runs on block 0's A gradients
(rows in the input space, rank ≤ 2r = 16). Token-set precision/recall at the attack's threshold,
and at the top-|T| tokens by residual (an oracle count: how far the span singles the batch out).

Usage: python -m benchmarks.leakage.dager_smollm2 [--updates N]; writes benchmarks/results/dager_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.base import AttackError
from attacks.text.dager_llama import DagerLlamaAttack, find_decoder, lm_batch, lm_gradients, span_test
from attacks.text.token_leakage import TOKEN_SET_KEY
from audits.similarity.text import score_text, token_precision_recall
from benchmarks.paths import ROOT
from fedsim.data.corpora import fortunes_task
from models.pretrained import load_smollm2

RESULT = ROOT / "benchmarks" / "results" / "dager_smollm2.json"
LORA_RANK = 8


def fortunes(tokenizer) -> list[str]:
    """Task fortunes of 16-24 SmolLM2 tokens (the first 2,000 texts, as the test draws them)."""
    return [t for t in fortunes_task().texts[:2000] if 16 <= len(tokenizer(t)["input_ids"]) <= 24]


def full_layers(updates: int, sizes: list[int]) -> dict[str, Any]:
    loaded = load_smollm2()
    lm, tokenizer = loaded.model, loaded.tokenizer
    for name, param in lm.named_parameters():
        param.requires_grad = name.startswith(("model.layers.0.", "model.layers.1."))
    pool = fortunes(tokenizer)
    out: dict[str, Any] = {}
    for size in sizes:
        rows = []
        for k in range(updates):
            chosen = np.random.default_rng(100 * size + k).choice(len(pool), size=size, replace=False)
            batch = lm_batch(tokenizer, [pool[i] for i in chosen])
            start = time.perf_counter()
            grads = lm_gradients(lm, batch)
            grad_seconds = time.perf_counter() - start
            rec = DagerLlamaAttack().attack(lm, grads, size)
            width = max(len(t) for t in batch.texts)
            true = np.array([t + [tokenizer.pad_token_id] * (width - len(t)) for t in batch.texts])
            recovered = rec.inputs.long().numpy()
            claimed = rec.diagnostics[TOKEN_SET_KEY]
            score = score_text(recovered, true, True, tokenizer.decode, tokenizer.pad_token_id, claimed)
            rows.append({**score.__dict__, "seconds": rec.seconds, "gradient_seconds": grad_seconds})
        out[str(size)] = {m: float(np.mean([r[m] for r in rows])) for m in rows[0]}
        out[str(size)]["updates"] = updates
        print(f"B={size}: {out[str(size)]}", flush=True)
    return out


def _token_scores(residual: torch.Tensor, true: set[int], tol: float) -> dict[str, float]:
    passed = set((residual < tol).nonzero().reshape(-1).tolist())
    precision, recall = token_precision_recall(passed, true)
    top = set(residual.argsort()[: len(true)].tolist())
    return {
        "precision": precision if passed else float("nan"),  # nothing claimed: no precision
        "recall": recall,
        "passed": len(passed),
        "precision_at_true_count": len(top & true) / len(true),
        "member_residual_median": float(residual[list(true)].median()),
        "nonmember_residual_min": float(np.delete(residual.numpy(), list(true)).min()),
    }


def _json_mean(values: list[float]) -> float | None:
    """The mean, or None (JSON null) where no update defined the metric."""
    mean = float(np.mean(values))
    return None if np.isnan(mean) else mean


def lora(updates: int, sizes: list[int]) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    loaded = load_smollm2()
    tokenizer = loaded.tokenizer
    config = LoraConfig(r=LORA_RANK, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(loaded.model, config)
    decoder = find_decoder(model)
    attack = DagerLlamaAttack()
    pool = fortunes(tokenizer)
    prefix = f"{decoder.prefix}.0.self_attn"
    adapters = {p: getattr(decoder.blocks[0].self_attn, p) for p in ("q_proj", "v_proj")}
    out: dict[str, Any] = {}
    for step in (1, 2):
        if step == 2:  # one local SGD step moves B off zero (on a batch the attack never sees)
            grads = lm_gradients(model, lm_batch(tokenizer, pool[-8:]))
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in grads:
                        param -= 0.5 * grads[name]
        for size in sizes:
            rows = []
            for k in range(updates):
                chosen = np.random.default_rng(100 * size + k).choice(len(pool) - 8, size=size, replace=False)
                batch = lm_batch(tokenizer, [pool[i] for i in chosen])
                grads = lm_gradients(model, batch)
                true = {t for text in batch.texts for t in text}
                start = time.perf_counter()
                a_grads = [grads[f"{prefix}.{p}.lora_A.default.weight"] for p in adapters]
                try:
                    declined = ""
                    if step == 1:
                        assert all(not bool(g.any()) for g in a_grads), "A gradient nonzero with B = 0"
                        residuals = []
                        for proj, module in adapters.items():
                            a = module.lora_A["default"].weight.detach().double()
                            g = grads[f"{prefix}.{proj}.lora_B.default.weight"]
                            residual, span = span_test(decoder, [g], lambda x, a=a: x @ a.T, attack.rank_tol)
                            residuals.append(residual)
                            if span.rank >= LORA_RANK:
                                declined = f"B-gradient rank {span.rank} = r: the span is all of A's image"
                        residual = torch.stack(residuals).max(dim=0).values  # pass both tests
                    else:
                        residual, span = span_test(decoder, a_grads, lambda x: x, attack.rank_tol)
                        if span.rank < len(true):
                            declined = f"A-gradient rank {span.rank} < {len(true)} batch tokens"
                except AttackError as err:
                    vocab = decoder.lm.get_input_embeddings().num_embeddings
                    residual, declined = torch.ones(vocab), str(err)
                seconds = time.perf_counter() - start
                rows.append({**_token_scores(residual, true, attack.distance_tol), "seconds": seconds})
            key = f"step{step}_B{size}"
            out[key] = {m: _json_mean([r[m] for r in rows]) for m in rows[0]}
            out[key]["why_undecided"] = declined
            out[key]["updates"] = updates
            print(f"LoRA {key}: {out[key]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=2, help="updates per batch size")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    full = full_layers(args.updates, [1, 2, 4, 8])
    adapters = lora(args.updates, [1, 4])
    exact = all(v["exact_sequence"] == 1.0 and min(v["rouge1"], v["rouge2"]) >= 0.99 for v in full.values())
    result = {
        "settings": {
            "model": "SmolLM2-135M-Instruct (float32 dequantised Q4_1), first two blocks trainable",
            "data": "fortunes task texts of 16-24 tokens, EOS-terminated, right-padded",
            "updates_per_batch_size": args.updates,
            "attack": "dager-llm rank_tol 1e-5, distance_tol 1e-3",
            "lora": f"peft r={LORA_RANK} alpha 16, q_proj+v_proj, all blocks; step 2 after 1 SGD step lr 0.5",
            "machine": f"{platform.machine()}, torch threads 1 (2 shared cores)",
        },
        "first_layers_trainable": full,
        "lora_only": adapters,
        "goal": "every sequence of a batch of 4 recovered exactly (ROUGE-1/2 >= 0.99)",
        "goal_met": exact,
        "seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
