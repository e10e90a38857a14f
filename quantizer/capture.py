"""Inputs of decoder block 0 for calibration windows, and running one block on them.

A forward pre-hook on block 0 records its hidden states, positional extras and keyword
arguments (attention mask, position ids / embeddings: whatever this transformers version
passes) and raises to stop the forward. Keyword arguments can depend on the batch size (OPT's
position ids), so they are kept per batch size. Knows the `Family` table, not any algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from owq.kernels.families import Family, blocks_of


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


@dataclass
class BlockCall:
    args: tuple  # positional arguments after the hidden states
    kwargs: dict


@dataclass
class BlockInputs:
    """hidden: float32 [N, S, D] inputs of the current block; calls: block extras by batch size."""

    hidden: torch.Tensor
    model: nn.Module
    family: Family
    calls: dict[int, BlockCall] = field(default_factory=dict)

    def call(self, batch: int) -> BlockCall:
        if batch not in self.calls:
            seqlen = self.hidden.shape[1]
            _, self.calls[batch] = _capture(
                self.model, self.family, torch.zeros(batch, seqlen, dtype=torch.long)
            )
        return self.calls[batch]


def _capture(model: nn.Module, family: Family, ids: torch.Tensor):
    seen = {}

    def hook(_module, args, kwargs):
        seen["hidden"] = args[0]
        kwargs = dict(kwargs)
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        kwargs.pop("layer_past", None)
        kwargs["use_cache"] = False
        seen["call"] = BlockCall(tuple(args[1:]), kwargs)
        raise _StopForward

    handle = blocks_of(model, family)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "hidden" not in seen:
        raise RuntimeError("the model never reached its first decoder block")
    return seen["hidden"], seen["call"]


def capture_block_inputs(
    model: nn.Module, family: Family, windows: torch.Tensor, batch_size: int
) -> BlockInputs:
    """windows: int64 [N, S] -> BlockInputs holding block 0's inputs for every window."""
    chunks, calls = [], {}
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]
        hidden, call = _capture(model, family, ids)
        chunks.append(hidden.to(torch.float32))
        calls.setdefault(ids.shape[0], call)
    return BlockInputs(torch.cat(chunks), model, family, calls)


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """One decoder block on hidden [B, S, D] -> [B, S, D]."""
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_block_batched(
    block: nn.Module, inputs: BlockInputs, batch_size: int
) -> torch.Tensor | None:
    """The block on every window, in mini-batches -> [N, S, D]; None if a hook stopped it."""
    outs, stopped = [], False
    for start in range(0, inputs.hidden.shape[0], batch_size):
        x = inputs.hidden[start : start + batch_size]
        try:
            outs.append(run_block(block, x, inputs.call(x.shape[0])))
        except _StopForward:
            stopped = True
    return None if stopped else torch.cat(outs)


StopForward = _StopForward
