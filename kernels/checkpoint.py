"""Save and load OWQ checkpoint directories (format_version 1); knows no quantization algorithm.

A checkpoint is a directory: `config.json` (the model config plus `quantization_config`),
`model.safetensors` (packed `OWQLinear` tensors, everything else fp16), tokenizer files and
`owq_report.json`; `quantization_config.name` records the name it is served under (the output
dir's name at quantize time). Writing goes through `atomic.replace_dir`; loading builds the
transformers model with empty weights from the config, swaps every quantized linear for an
`OWQLinear` and assigns the stored tensors, so no fp16 base is ever needed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import replace_dir
from .families import family_of, linear_shape, quantized_linear_paths, set_module
from .owq_linear import OWQLinear
from .owq_vocab import OWQEmbedding, OWQVocab, TiedEmbedding

FORMAT_VERSION = 1  # written when the vocabulary table stays fp16 (byte-identical to before)
VOCAB_FORMAT_VERSION = 2  # the vocabulary table quantized (kernels.owq_vocab)
READ_VERSIONS = (FORMAT_VERSION, VOCAB_FORMAT_VERSION)
WEIGHTS_NAME = "model.safetensors"
STORAGE_DTYPE = torch.float16
PACKED_PARTS = ("qweight", "scales", "qzeros")


class CheckpointError(Exception):
    """A checkpoint that cannot be read; the message is one line naming the problem."""


@dataclass(frozen=True)
class QuantConfig:
    """The `quantization_config` block of config.json."""

    bits: int
    group_size: int
    sym: bool = False
    method: str = "owq"
    extra: dict | None = None

    def to_dict(self, model_sha256: str, vocab_quantized: bool = False) -> dict:
        return {
            "quant_method": "owq",
            "format_version": VOCAB_FORMAT_VERSION if vocab_quantized else FORMAT_VERSION,
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "model_sha256": model_sha256,
            **(self.extra or {}),
        }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unquantized_modules(model: nn.Module):
    owq_params = {
        id(p) for m in model.modules() if isinstance(m, OWQLinear) for p in m.parameters()
    }
    for name, p in model.named_parameters():
        if id(p) not in owq_params and p.is_floating_point():
            yield name, p


def round_unquantized(model: nn.Module) -> None:
    """Round every non-quantized float parameter to the storage dtype, in place.

    Done before saving, so the model in memory is exactly the model that loads back.
    """
    with torch.no_grad():
        for _, p in _unquantized_modules(model):
            p.copy_(p.to(STORAGE_DTYPE).to(p.dtype))


def _is_tied(model: nn.Module) -> bool:
    """A float table shared by embedding and head (a quantized tied table is stored once
    already: the embedding refers to the head's tensors and has none of its own)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or isinstance(head, OWQLinear):
        return False
    return head.weight is getattr(embed, "weight", None)


def _state_for_file(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if _is_tied(model):
        state.pop(_head_key(model), None)
    out = {}
    for name, tensor in state.items():
        t = tensor.detach().cpu()
        if t.is_floating_point() and t.dtype != STORAGE_DTYPE:
            t = t.to(STORAGE_DTYPE)
        out[name] = t.contiguous()
    return out


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def save_checkpoint(
    model: nn.Module,
    out_dir: str | Path,
    quant: QuantConfig,
    tokenizer=None,
    report: dict | Callable[[Path], dict] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` (its quantized linears already `OWQLinear`) to `out_dir` atomically.

    `report` (owq_report.json) is a dict, or a function of the written dir (before it is renamed
    into place) that returns one, e.g. to count the bytes of the file just written."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output path {out} exists (pass overwrite to replace it)")
    round_unquantized(model)
    with replace_dir(out, overwrite=overwrite) as tmp:
        save_file(_state_for_file(model), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        config = model.config.to_dict()
        vocab = isinstance(model.get_output_embeddings(), OWQLinear)
        config["quantization_config"] = {
            "name": out.name,
            **quant.to_dict(file_sha256(tmp / WEIGHTS_NAME), vocab),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            content = report(tmp) if callable(report) else report
            (tmp / "owq_report.json").write_text(json.dumps(content, indent=2) + "\n")
    return out


def checkpoint_name(path: str | Path) -> str:
    """The name recorded at quantize time (`quantization_config.name`), else the dir's name."""
    path = Path(path)
    try:
        quant = json.loads((path / "config.json").read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError, AttributeError):
        quant = None
    name = quant.get("name") if isinstance(quant, dict) else None
    return name if isinstance(name, str) and name else path.resolve().name


def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not an owq checkpoint: no config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None


def _check_quant(path: Path, config: dict) -> dict:
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "owq":
        raise CheckpointError(
            f"{path} is not an owq checkpoint: config.json has no owq quantization_config"
        )
    if quant.get("format_version") not in READ_VERSIONS:
        raise CheckpointError(
            f"{path}: unknown format_version {quant.get('format_version')!r} "
            f"(this owq reads format_version {', '.join(map(str, READ_VERSIONS))})"
        )
    return quant


def read_owq_config(path: str | Path) -> dict:
    """The `config.json` of a checkpoint dir whose `quantization_config` is valid, or
    CheckpointError."""
    config = _read_config(Path(path))
    _check_quant(Path(path), config)
    return config


def read_quant_config(path: str | Path) -> dict:
    """The validated `quantization_config` of a checkpoint dir, or CheckpointError."""
    return read_owq_config(path)["quantization_config"]


@dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint dir read once: the transformers config (without its quantization block),
    the validated `quantization_config` and every stored tensor."""

    path: Path
    config: object  # transformers PretrainedConfig
    quant: dict
    tensors: dict[str, torch.Tensor]


def read_checkpoint(path: str | Path) -> StoredCheckpoint:
    """config.json read and checked once, tensors loaded and checksummed; CheckpointError."""
    from transformers import CONFIG_MAPPING

    path = Path(path)
    raw = _read_config(path)
    quant = _check_quant(path, raw)
    tensors = _read_tensors(path, quant.get("model_sha256"))
    fields = {k: v for k, v in raw.items() if k != "quantization_config"}
    if fields.get("model_type") not in CONFIG_MAPPING:
        raise CheckpointError(f"{path}: unknown model_type {fields.get('model_type')!r}")
    config = CONFIG_MAPPING[fields["model_type"]].from_dict(fields)
    return StoredCheckpoint(path, config, quant, tensors)


def is_checkpoint(path: str | Path) -> bool:
    """True when `path` holds an owq config (of any format_version: loading validates it)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    quant = config.get("quantization_config")
    return isinstance(quant, dict) and quant.get("quant_method") == "owq"


def _read_tensors(path: Path, expected_sha: str | None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS_NAME}")
    if expected_sha and file_sha256(weights) != expected_sha:
        raise CheckpointError(
            f"{weights} does not match the checksum in config.json (truncated or modified file)"
        )
    try:
        return load_file(weights)
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{weights} cannot be read: {e}") from None


def _build_empty(config) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def load_checkpoint(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """Build the transformers model of a checkpoint dir with an `OWQLinear` for every quantized
    linear (for evaluation and tuning; the server builds its own runtime from the same tensors);
    CheckpointError with one line on failure."""
    stored = read_checkpoint(path)
    path, config, tensors = stored.path, stored.config, stored.tensors
    model = _build_empty(config)
    family = family_of(config)
    for name in quantized_linear_paths(model, family):
        if f"{name}.qweight" not in tensors:
            raise CheckpointError(f"{path}: tensor {name}.qweight is missing")
        layer = OWQLinear.from_tensors(tensors, f"{name}.")
        if (layer.in_features, layer.out_features) != linear_shape(model.get_submodule(name)):
            raise CheckpointError(f"{path}: {name} does not fit the config's shape")
        set_module(model, name, layer)
    quantized_vocab = _swap_vocab(model, family, tensors, dtype)
    _assign(model, tensors, path)
    if not quantized_vocab:
        model.tie_weights()
    _cast_unquantized(model, dtype, tie=not quantized_vocab)
    model.config.quantization_config = stored.quant
    return model.to(device).eval()


def _swap_vocab(model: nn.Module, family, tensors: dict, dtype: torch.dtype) -> bool:
    """Quantized head / embedding tables in place of the float ones; True if there were any."""
    head_q, embed_q = f"{family.head}.qweight" in tensors, f"{family.embed}.qweight" in tensors
    if head_q:
        head = OWQVocab.from_tensors(tensors, f"{family.head}.")
        set_module(model, family.head, head)
        if not embed_q and getattr(model.config, "tie_word_embeddings", False):
            set_module(model, family.embed, TiedEmbedding(head, dtype))
    if embed_q:
        embedding = OWQEmbedding.from_tensors(tensors, f"{family.embed}.")
        embedding.dtype = dtype
        set_module(model, family.embed, embedding)
    return head_q or embed_q


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        result = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"{path}: tensors do not fit the model: {first[-1].strip()}"
        ) from None
    head = model.get_output_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [
        k for k in result.missing_keys if not (tied and head is not None and k == _head_key(model))
    ]
    if missing or result.unexpected_keys:
        what = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise CheckpointError(f"{path}: tensors do not match the config: {what}")
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta and not tied:
        raise CheckpointError(f"{path}: no weights for {meta[:3]}")


def _head_key(model: nn.Module) -> str:
    return _module_name(model, model.get_output_embeddings()) + ".weight"


def _cast_unquantized(model: nn.Module, dtype: torch.dtype, tie: bool = True) -> None:
    for module in model.modules():
        if isinstance(module, OWQLinear):
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                setattr(module, name, nn.Parameter(p.data.to(dtype), requires_grad=p.requires_grad))
    if tie:
        model.tie_weights()


def base_fingerprint(model: nn.Module) -> str:
    """The fingerprint of the model's weak-column plan (`plan.WeakColumnPlan.fingerprint`: name,
    shape and `outlier_idx` of every quantized linear with k > 0, not the vocabulary tables, which
    adapters never touch): what an adapter must match. The same value comes from the checkpoint's
    tensors (`stored_fingerprint`) or its plan file (`plan.read_plan`)."""
    from .plan import plan_of_model  # plan.py reads checkpoints: it imports this module

    return plan_of_model(model).fingerprint


def stored_fingerprint(tensors: dict[str, torch.Tensor], family) -> str:
    """`base_fingerprint` of a checkpoint from its tensors alone (no model built)."""
    from .plan import plan_of_tensors

    return plan_of_tensors(tensors, family).fingerprint
