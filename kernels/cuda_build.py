"""Kernel sources, compile options, and the backend that compiles and launches them.

The `.cu` files next to this module include `owq_cuda.cuh` through `-I<kernels dir>`
(`COMPILE_OPTIONS`, what CuPy's RawModule hands NVRTC and what the compile checks use). A source
is compiled once per (sha256 of the source and its headers, activation dtype, device arch) and
its kernels are looked up by name. `Backend` is the ONE seam between owq's launch code and what
runs kernels: by default `CupyBackend` (CuPy RawModule, launched on torch's current stream,
tensors by data pointer); a CuPy-compatible stand-in (the CPU emulator of the tests) is put in
place for a block of code with `use_backend(...)`. A backend also owns the split-K ticket
counters per (device, stream). CuPy is optional (`pip install owq[cuda]`), imported lazily.
Knows file names, CuPy and torch devices; nothing of the packed layout, launch shapes or models.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent
KERNEL_SOURCES = ("dequant_gemv.cu", "weak_sgmv.cu")
KERNEL_HEADERS = ("owq_cuda.cuh",)
COMPILE_OPTIONS = ("-std=c++17", f"-I{KERNEL_DIR}")
ACT_DEFINES = {torch.float16: (), torch.bfloat16: ("-DOWQ_ACT_BF16",)}
MIN_TICKETS = 4096
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


@dataclass(frozen=True)
class KernelSource:
    """One `.cu` file: `code` is its text plus a closing comment with `digest`, the sha256 of the
    file and every header it includes (CuPy's on-disk cache keys on the code, not the headers)."""

    name: str
    code: str
    digest: str

    def headers(self) -> tuple[str, ...]:
        return tuple(_INCLUDE.findall(self.code))


@functools.cache
def kernel_source(name: str) -> KernelSource:
    text = (KERNEL_DIR / name).read_text()
    digest = hashlib.sha256(text.encode())
    for header in _INCLUDE.findall(text):
        digest.update((KERNEL_DIR / header).read_bytes())
    hexdigest = digest.hexdigest()
    return KernelSource(name, f"{text}\n// owq sources sha256 {hexdigest}\n", hexdigest)


def compile_options(act: torch.dtype) -> tuple[str, ...]:
    """What NVRTC gets for a module whose activations are `act` (float16 or bfloat16)."""
    if act not in ACT_DEFINES:
        raise ValueError(f"no kernels for {act} activations (have {sorted(map(str, ACT_DEFINES))})")
    return COMPILE_OPTIONS + ACT_DEFINES[act]


@dataclass(frozen=True)
class DeviceLimits:
    """What the launch planning needs to know about a device."""

    sms: int
    regs_per_sm: int = 65536
    smem_per_sm: int = 100 * 1024
    max_grid_y: int = 65535
    max_grid_z: int = 65535


class Backend:
    """Compiles and launches kernels; subclasses give the six primitives below, this class keeps
    the compiled functions and the ticket counters."""

    device_type = "cuda"  # torch device type of the tensors the kernels read

    def __init__(self) -> None:
        self._functions: dict = {}
        self._tickets: dict = {}

    # primitives --------------------------------------------------------------------------
    def available(self) -> bool:
        raise NotImplementedError

    def compile(self, source: KernelSource, options: tuple[str, ...], device: torch.device):
        """A module (CuPy RawModule-like: `get_function(name)`) of `source`."""
        raise NotImplementedError

    def arch(self, device: torch.device) -> tuple[int, int]:
        raise NotImplementedError

    def limits(self, device: torch.device) -> DeviceLimits:
        raise NotImplementedError

    def launch(self, kernel, grid: tuple, block: tuple, args: tuple, smem: int, device) -> None:
        """Queue `kernel` on the device's current stream (CuPy call semantics for `args`)."""
        raise NotImplementedError

    def stream_key(self, device: torch.device) -> int:
        raise NotImplementedError

    def empty(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    # kept state --------------------------------------------------------------------------
    def function(self, source_name: str, name: str, act: torch.dtype, device: torch.device):
        """Kernel `name` of `source_name` compiled for `act` activations on `device`."""
        source = kernel_source(source_name)
        key = (source.digest, act, self.arch(device), device.index, name)
        kernel = self._functions.get(key)
        if kernel is None:
            module_key = key[:4]
            module = self._functions.get(module_key)
            if module is None:
                log.info("compiling %s (%s, sha256 %s)", source_name, act, source.digest[:12])
                module = self.compile(source, compile_options(act), device)
                self._functions[module_key] = module
            kernel = self._functions[key] = module.get_function(name)
        return kernel

    def tickets(self, device: torch.device, count: int) -> torch.Tensor:
        """int32 split-K counters per (device, stream), at least `count`, left at zero by every
        GEMV launch."""
        key = (device.index, self.stream_key(device))
        tickets = self._tickets.get(key)
        if tickets is None or tickets.numel() < count:
            tickets = self.empty((max(count, MIN_TICKETS),), torch.int32, device).zero_()
            self._tickets[key] = tickets
        return tickets

    def ticket_counters(self) -> list[torch.Tensor]:
        return list(self._tickets.values())


class CupyBackend(Backend):
    """CuPy RawModule (NVRTC) kernels on torch's current CUDA stream."""

    def available(self) -> bool:
        return _cupy() is not None and torch.cuda.is_available()

    def compile(self, source: KernelSource, options: tuple[str, ...], device: torch.device):
        with _cupy().cuda.Device(device.index):
            return _cupy().RawModule(code=source.code, options=options)

    def arch(self, device: torch.device) -> tuple[int, int]:
        return torch.cuda.get_device_capability(device)

    def limits(self, device: torch.device) -> DeviceLimits:
        props = torch.cuda.get_device_properties(device)
        return DeviceLimits(
            props.multi_processor_count,
            getattr(props, "regs_per_multiprocessor", 65536),
            getattr(props, "shared_memory_per_multiprocessor", 100 * 1024),
        )

    def launch(self, kernel, grid: tuple, block: tuple, args: tuple, smem: int, device) -> None:
        cupy = _cupy()
        stream = torch.cuda.current_stream(device).cuda_stream
        with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream):
            kernel(grid, block, args, shared_mem=smem)

    def stream_key(self, device: torch.device) -> int:
        return torch.cuda.current_stream(device).cuda_stream


@functools.cache
def _cupy():
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library CuPy cannot load
        log.info("CuPy GPU path unavailable: %s", exc)
        return None
    return cupy


@functools.cache
def _default_backend() -> Backend:
    return CupyBackend()


_backend: contextvars.ContextVar[Backend | None] = contextvars.ContextVar(
    "owq_cuda_backend", default=None
)


def current_backend() -> Backend:
    """The backend set by the innermost `use_backend`, else the process's `CupyBackend`."""
    return _backend.get() or _default_backend()


@contextlib.contextmanager
def use_backend(backend: Backend):
    """Run the `cuda_ops` calls of the block on `backend` (this thread / task only)."""
    token = _backend.set(backend)
    try:
        yield backend
    finally:
        _backend.reset(token)
