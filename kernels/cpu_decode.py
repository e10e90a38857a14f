"""Fused CPU step of a stack of pre-norm RoPE blocks (`cpu_decode.cpp`).

One call runs every block of a fast step, one token per row: RMSNorm, each projection on
torch's 4-bit kernel plus its weak columns from each row's own slot, per-head q/k RMSNorm where
the model has it (Qwen3), RoPE, the KV-cache write, grouped-query attention over each row's
positions, the gated SiLU MLP, the residuals. A decode step's rows are one token of each
sequence; a prompt's tokens are rows of one cache row.
The eager block does ~60 small torch ops per block; at batch 1 their dispatch, not the bytes
of the 4-bit codes, was most of a step. Twin: the runtime's eager block
(`server/runtime/llama.py`), matched to fp32 rounding by the tests for rows on the base and
for fp32 slot tables; on fp16 tables the eager bag rounds a row's weak sum to fp16 and this step
keeps it in fp32 (about 1% of the logits on the tests' random adapters).

Where the CPU has AVX-512 VNNI, 3-bit layers (codes stored centred, outputs in 16s) take the
16-bit GEMM of `cpu_gemm16.cpp` (`OWQ_CPU_GEMM=bf16` turns it off): each row's activations
rounded to int16 with one scale, exact integer sums (twin: `cpu_ops.int16_twin`); other layers,
and other CPUs, keep torch's kernel.

`load()` builds the C++ sources once per machine with torch's extension builder (a C++ compiler
and ninja; about 30 s, for the CPU's instruction level: `flags`), kept in torch's extension
cache (`TORCH_EXTENSIONS_DIR`, rebuilt when the source changes), and returns the module; None,
with one warning, where it cannot be built or `OWQ_CPU_DECODE=0` turns it off. A module built
ahead from this source is imported as it is from `OWQ_CPU_DECODE_LIB` (the CPU image has no
compiler). `DecodeStack`
holds a runtime's layers' operands, read once from their CPU plans, and checks on every step
that those plans are still the layers' own. Knows the 4-bit plan and the block's maths;
nothing about model families' names, requests or adapters by name.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .cpu_ops import gemm16_takes, int4_codes
from .owq_linear import OWQLinear
from .packing import unpack_zeros

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "cpu_decode.cpp"
SOURCES = [SOURCE, SOURCE.with_name("cpu_gemm16.cpp")]  # one module
SWITCH = "OWQ_CPU_DECODE"  # "0": the eager blocks only
PREBUILT = "OWQ_CPU_DECODE_LIB"  # a module built ahead from this source (the CPU image's)
GEMM = "OWQ_CPU_GEMM"  # "bf16": torch's 4-bit kernel everywhere; else the 16-bit GEMM on VNNI


def enabled() -> bool:
    return os.environ.get(SWITCH, "1") != "0"


def wide() -> bool:
    """An x86 CPU where torch runs AVX2 or wider: the level `flags` builds for."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def flags() -> list[str]:
    """x86-64-v3 (AVX2, FMA, F16C) where `wide`, never `-march=native`: a build kept in a shared
    cache or an image may run on another CPU of that level; elsewhere portable C++ (the fp16
    loads take the scalar path). OpenMP where torch has it, so that `at::parallel_for` runs on
    torch's threads (the loader finds torch's own libgomp.so.1 already loaded)."""
    omp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    return ["-O3", "-fopenmp-simd", *omp] + (["-march=x86-64-v3"] if wide() else [])


def _import(path: str):
    """A module built ahead, imported as it is (refused on a CPU below the level it needs)."""
    if platform.machine().lower() in ("x86_64", "amd64") and not wide():
        raise RuntimeError("built for x86-64-v3 (AVX2); this CPU runs torch below it")
    spec = importlib.util.spec_from_file_location("owq_cpu_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stale_lock(directory: Path, minutes: float = 10) -> None:
    """torch's builder waits forever on a lock a killed build left behind: one older than any
    build takes is removed, with a warning."""
    lock = directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > 60 * minutes:
        log.warning("removing %s, left by a build killed %.0f min ago", lock, age / 60)
        lock.unlink(missing_ok=True)


@functools.cache
def load():
    """The compiled module, built on first use; None where it cannot be (logged once)."""
    if not enabled():
        return None
    prebuilt = os.environ.get(PREBUILT)
    if prebuilt and Path(prebuilt).is_file():
        try:
            return _import(prebuilt)
        except Exception as e:  # another CPU level, another torch: the eager blocks serve
            log.warning("fused CPU decode step %s unusable (%s): decode runs the eager blocks",
                        prebuilt, e)  # fmt: skip
            return None
    from torch.utils import cpp_extension

    log.info("loading the fused CPU decode step (built once per machine, ~30 s)")
    try:
        _stale_lock(Path(cpp_extension._get_build_directory("owq_cpu_decode", False)))
        cflags = flags()
        ldflags = ["-fopenmp"] if "-fopenmp" in cflags else []
        return cpp_extension.load(
            "owq_cpu_decode",
            [str(p) for p in SOURCES],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
        )
    except Exception as e:  # no compiler, no ninja, a failed build: the eager blocks serve
        log.warning("fused CPU decode step unavailable (%s): decode runs the eager blocks", e)
        return None


def _none() -> torch.Tensor:
    return torch.empty(0)


def gemm16_wanted(module) -> bool:
    """The 16-bit GEMM, unless `OWQ_CPU_GEMM=bf16` turns it off, where this CPU and module
    have it."""
    wanted = os.environ.get(GEMM, "int16") != "bf16"
    return wanted and hasattr(module, "gemm16_supported") and module.gemm16_supported()


def gemm16_pack(codes: torch.Tensor) -> torch.Tensor:
    """int32 codes [N, K] in [0, 16) -> the 16-bit GEMM's layout, uint8 [N/16, K/4, 32]
    (`cpu_gemm16.cpp`): byte 2l + j of (block, step) = c[16·block + l, 4·step + j] |
    c[16·block + l, 4·step + 2 + j] << 4."""
    n, k = codes.shape
    c = codes.view(n // 16, 16, k // 4, 4).permute(0, 2, 1, 3)  # [blocks, steps, lane, 4]
    return (c[..., :2] | (c[..., 2:] << 4)).to(torch.uint8).contiguous().view(n // 16, k // 4, 32)


def gemm16_operands(layer: OWQLinear) -> list[torch.Tensor]:
    """[codes, fp32 scales [groups, out]] of a layer of at most 3 bits (codes stored centred:
    the GEMM's zero term is 8) whose outputs come in 16s; [] for any other layer."""
    packed = layer.packed
    if not gemm16_takes(packed):
        return []
    zeros = unpack_zeros(packed.qzeros, packed.bits, packed.out_features)
    codes = gemm16_pack(int4_codes(packed, zeros, centred=True))
    return [codes, packed.scales.float().contiguous()]


def operands(layer: OWQLinear) -> tuple[list[torch.Tensor], list[int]] | None:
    """One projection's operands for the C++ stack from its CPU plan, or None where the layer
    does not take the 4-bit kernel (or runs its reference path)."""
    plan = layer.cpu
    if layer.force_reference or plan is None or plan.int4 is None:
        return None
    if plan.dtype != torch.float32 or layer.trainable is not None:
        return None
    q = plan.int4
    idx = plan.idx if plan.idx is not None else layer.outlier_idx.long()
    bias = _none() if layer.bias is None else layer.bias.float().contiguous()
    correction = _none() if q.correction is None else q.correction
    tensors = [q.packed, q.scale_zero, correction, idx if layer.num_weak else _none(), bias]
    return tensors + [spans(layer)], [q.group, q.group_size, layer.out_features]


def spans(layer: OWQLinear) -> torch.Tensor:
    """long [R, 3]: (weak row, first output, outputs) for each table row of each part: a fused
    layer's table is zero outside its parts (`kernels.fused`), which the step need not read."""
    rows = [(int(j), part.offset, part.out_features) for part in layer.parts for j in part.rows]
    return torch.tensor(rows, dtype=torch.long).view(-1, 3)


class DecodeStack:
    """The compiled stack over blocks of four projections each (q/k/v fused, o, gate/up fused,
    down) and their two norms. `step` runs a decode step; it returns None (the caller then runs
    the eager blocks) where a layer's plan changed since the stack was built."""

    def __init__(self, module, layers: Sequence[OWQLinear], ops: Sequence[tuple],
                 norms: Sequence[torch.Tensor], qk_norms: Sequence[torch.Tensor],
                 cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                 eps: float):  # fmt: skip
        # ops: each layer's `operands`, none of them None (`build`); norms: two a block (before
        # attention, before the MLP); qk_norms: none, or two a block (per-head q, k; Qwen3)
        self.layers = list(layers)
        self.plans = [layer.cpu for layer in layers]
        self.stale = False  # warned once that a plan changed under the stack
        self.gemm16 = any(len(op[0]) == 8 for op in ops)  # a layer on the 16-bit GEMM
        self.stack = module.Stack(
            [op[0] for op in ops], [op[1] for op in ops], [n.float().contiguous() for n in norms],
            [n.float().contiguous() for n in qk_norms], cos.float().contiguous(),
            sin.float().contiguous(), heads, kv_heads, head_dim, eps,
        )  # fmt: skip

    @classmethod
    def build(cls, layers: Sequence[OWQLinear], *args) -> DecodeStack | None:
        """The stack, or None where the module cannot be built or a layer does not qualify."""
        ops = [operands(layer) for layer in layers]
        if any(op is None for op in ops):
            return None
        module = load()
        if module is None:
            return None
        if gemm16_wanted(module):
            for (tensors, _), layer in zip(ops, layers, strict=True):
                tensors += gemm16_operands(layer)
        try:
            return cls(module, layers, ops, *args)
        except (RuntimeError, TypeError) as e:  # a shape the step refuses, an older module
            log.warning("fused CPU decode step refused this model (%s): eager blocks", e)
            return None

    def step(self, x: torch.Tensor, positions: torch.Tensor, cache_rows: torch.Tensor, k, v,
             slots):  # fmt: skip
        """x [B, E] fp32 -> [B, E] after every block, or None (see the class): each row one
        token at positions[b] of cache row cache_rows[b] (long [B] both), with its adapter slot
        (long [B], or None: the base)."""
        tables = []
        for layer, plan in zip(self.layers, self.plans, strict=True):
            if layer.cpu is not plan or layer.trainable is not None or layer.force_reference:
                if not self.stale:
                    log.warning("a layer's CPU plan changed: decode runs the eager blocks "
                                "until the runtime is prepared again")  # fmt: skip
                self.stale = True
                return None
            tables.append(layer.weak_table)
        slots = _none() if slots is None else slots
        return self.stack.step(x, positions.reshape(-1), cache_rows, k, v, tables, slots)
