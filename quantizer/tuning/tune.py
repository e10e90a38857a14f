"""Weak column tuning (WCT, the paper's "PEFT with Weak Column Tuning"): train only `oweight`.

The low-precision base (packed codes, scales, zeros, embeddings, norms, other layers' weak
columns) is frozen with `requires_grad=False`; each chosen `OWQLinear` trains its fp16 weak
columns [k, out] in its WCT mode (`train_weak_columns`): a float32 master for the duration of
training (AdamW states are float32 too), written back as fp16 at the end, so the tuned model is
again a plain OWQ model whose `oweight` is what the adapter stores. The
training loop (`train`) is generic over the parameters it gets, so the LoRA baseline of the
benchmark runs through exactly the same batches, steps and loss. Knows models, not files or CLIs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from owq.kernels.adapters import Adapter, adapter_from_model
from owq.kernels.families import family_of, quantized_linear_paths
from owq.kernels.owq_linear import OWQLinear

from .data import IGNORE, Batch, Example, collate, epoch_batches
from .memory import dense_cache_bytes, peak_rss_bytes

log = logging.getLogger(__name__)

SCOPES = ("all", "attn", "mlp")


@dataclass(frozen=True)
class TuneConfig:
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs (cycling the data)
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    max_len: int = 512
    seed: int = 0
    layers: str = "all"  # all | attn | mlp
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.layers not in SCOPES:
            raise ValueError(f"layers must be one of {', '.join(SCOPES)}, got {self.layers!r}")
        for name in ("epochs", "batch_size", "grad_accum", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean next-token NLL over labelled tokens
    token_accuracy: float  # argmax == label over labelled tokens
    exact_match: float  # examples whose labelled tokens are all argmax-correct (= greedy output)
    tokens: int


@dataclass(frozen=True)
class TrainResult:
    steps: int
    epochs: float  # passes over the data (fractional when max_steps cut one short)
    input_tokens: int  # tokens run through the model (padding excluded)
    target_tokens: int  # tokens with loss
    seconds: float
    losses: list[float]  # per optimizer step
    evals: list[dict] = field(default_factory=list)
    peak_rss_bytes: int = 0
    dense_cache_bytes: int = 0

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def final_loss(self) -> float:
        """Mean of the last tenth of the step losses (at least one step)."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail)

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("losses")
        return out | {"first_loss": self.first_loss, "final_loss": self.final_loss}


# layers ------------------------------------------------------------------------------------
def select_layers(model: nn.Module, scope: str = "all") -> list[str]:
    """Paths of the OWQLinears with weak columns in `scope`, found from the Family table."""
    if scope not in SCOPES:
        raise ValueError(f"layers must be one of {', '.join(SCOPES)}, got {scope!r}")
    family = family_of(model.config)
    wanted = set({"all": family.linears, "attn": family.attention, "mlp": family.mlp}[scope])
    paths = [
        path
        for path in quantized_linear_paths(model, family)
        if _linear_name(path, family.blocks) in wanted and _has_weak(model.get_submodule(path))
    ]
    if not paths:
        raise ValueError(f"no quantized layer with weak columns in scope {scope!r}")
    return paths


def _has_weak(module: nn.Module) -> bool:
    return isinstance(module, OWQLinear) and module.num_weak > 0


def _linear_name(path: str, blocks: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `self_attn.q_proj`."""
    return path.removeprefix(blocks + ".").split(".", 1)[1]


def prepare_weak_columns(model: nn.Module, layers: list[str]) -> dict[str, nn.Parameter]:
    """Freeze every parameter; put each chosen layer in WCT mode (a float32 master of its own
    weak columns, `OWQLinear.train_weak_columns`)."""
    for p in model.parameters():
        p.requires_grad_(False)
    masters = {}
    for path in layers:
        layer = model.get_submodule(path)
        layer.train_weak_columns()
        masters[path] = layer.trainable
    return masters


def finish_weak_columns(model: nn.Module, masters: dict[str, nn.Parameter]) -> None:
    """End WCT mode: the masters go back into the layers' slot 0 as fp16 (the stored dtype)."""
    for path in masters:
        model.get_submodule(path).train_weak_columns(False)


def count_parameters(params) -> int:
    return sum(p.numel() for p in params)


# loss --------------------------------------------------------------------------------------
def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body (hidden states after the final norm) and the LM head."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hf.base_model, hf.get_output_embeddings()


def labelled_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits float32 [N, V], targets [N]) at the N positions that predict a labelled token.

    The head runs only there, so a prompt/completion batch costs little beyond the body.
    """
    body, head = _body_and_head(model)
    hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]  # [B,T,H]
    targets = batch.labels[:, 1:]
    select = targets != IGNORE  # [B, T-1]
    return head(hidden[:, :-1][select]).float(), targets[select]


def batch_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed next-token NLL over the labelled tokens of a batch."""
    logits, targets = labelled_logits(model, batch)
    return F.cross_entropy(logits, targets, reduction="sum")


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int) -> EvalResult:
    nll, correct, tokens, exact = 0.0, 0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        logits, targets = labelled_logits(model, batch)
        hit = logits.argmax(-1) == targets
        nll += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += int(hit.sum())
        tokens += targets.numel()
        rows = (batch.labels[:, 1:] != IGNORE).nonzero()[:, 0]
        misses = torch.bincount(rows[~hit], minlength=batch.input_ids.shape[0])
        exact += int((misses == 0).sum())
    return EvalResult(nll / tokens, correct / tokens, exact / len(examples), tokens)


# training loop -----------------------------------------------------------------------------
def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _steps(examples: list[Example], cfg: TuneConfig, pad_id: int):
    """Yield (epoch, micro-batches of one optimizer step) until max_steps or epochs run out."""
    epoch = 0
    while True:
        batches = list(epoch_batches(examples, cfg.batch_size, cfg.seed, epoch, pad_id))
        for start in range(0, len(batches), cfg.grad_accum):
            yield (
                epoch,
                start + cfg.grad_accum >= len(batches),
                batches[start : start + cfg.grad_accum],
            )
        epoch += 1
        if cfg.max_steps is None and epoch >= cfg.epochs:
            return


def total_steps(num_examples: int, cfg: TuneConfig) -> int:
    per_epoch = math.ceil(math.ceil(num_examples / cfg.batch_size) / cfg.grad_accum)
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * per_epoch


def train(
    model: nn.Module,
    params: list[nn.Parameter],
    examples: list[Example],
    cfg: TuneConfig,
    eval_examples: list[Example] | None = None,
    pad_id: int = 0,
    progress: bool = True,
) -> TrainResult:
    """AdamW on `params` (the only ones with requires_grad), token-mean loss per optimizer step."""
    if not examples:
        raise ValueError("no training examples")
    total = total_steps(len(examples), cfg)
    per_epoch = math.ceil(math.ceil(len(examples) / cfg.batch_size) / cfg.grad_accum)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, round(cfg.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total, warmup))
    losses, evals, input_tokens, target_tokens = [], [], 0, 0
    start = time.perf_counter()
    bar = tqdm(total=total, desc="tune", unit="step", disable=not progress)
    for step, (epoch, epoch_end, micro) in enumerate(_steps(examples, cfg, pad_id)):
        if step >= total:
            break
        denom = sum(int((b.labels[:, 1:] != IGNORE).sum()) for b in micro)
        loss_sum = 0.0
        for batch in micro:
            loss = batch_loss(model, batch)
            (loss / denom).backward()
            loss_sum += loss.item()
            input_tokens += batch.tokens
        target_tokens += denom
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum / denom)
        rate = input_tokens / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{rate:.0f}")
        bar.update()
        last = step + 1 == total
        if eval_examples and (epoch_end or last):
            evals.append(_eval_record(model, eval_examples, cfg, pad_id, epoch, step + 1))
    bar.close()
    return TrainResult(
        steps=len(losses),
        epochs=len(losses) / per_epoch,
        input_tokens=input_tokens,
        target_tokens=target_tokens,
        seconds=time.perf_counter() - start,
        losses=losses,
        evals=evals,
        peak_rss_bytes=peak_rss_bytes(),
        dense_cache_bytes=dense_cache_bytes(model),
    )


def _eval_record(model, examples, cfg: TuneConfig, pad_id: int, epoch: int, step: int) -> dict:
    result = evaluate(model, examples, cfg.batch_size, pad_id)
    log.info(
        "epoch %d step %d: eval loss %.4f, token accuracy %.3f, exact match %.3f",
        epoch + 1,
        step,
        result.loss,
        result.token_accuracy,
        result.exact_match,
    )
    return {"epoch": epoch + 1, "step": step, **asdict(result)}


# WCT ---------------------------------------------------------------------------------------
def tune_weak_columns(
    model: nn.Module,
    examples: list[Example],
    cfg: TuneConfig,
    eval_examples: list[Example] | None = None,
    pad_id: int = 0,
    progress: bool = True,
) -> tuple[list[str], TrainResult]:
    """Train the weak columns of the layers in `cfg.layers`; the model ends tuned, fp16, frozen."""
    torch.manual_seed(cfg.seed)
    layers = select_layers(model, cfg.layers)
    masters = prepare_weak_columns(model, layers)
    log.info(
        "tuning the weak columns of %d layers: %d trainable parameters",
        len(layers),
        count_parameters(masters.values()),
    )
    try:
        params = list(masters.values())
        result = train(model, params, examples, cfg, eval_examples, pad_id, progress)
    finally:
        finish_weak_columns(model, masters)
    return layers, result


def make_adapter(
    model: nn.Module, layers: list[str], name: str, cfg: TuneConfig, result: TrainResult, **extra
) -> Adapter:
    """The tuned weak columns of `layers` with the task name and training settings."""
    params = sum(model.get_submodule(p).oweight.numel() for p in layers)
    return adapter_from_model(
        model,
        name,
        layers,
        task=name,
        training=asdict(cfg),
        trainable_params=params,
        result=result.summary(),
        **extra,
    )
