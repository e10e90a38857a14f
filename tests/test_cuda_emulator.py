"""The CPU emulator (`../shared/cuemu`) as a `cuda_build.Backend`, for the emulated kernel tests
(no tests here).

`EmulatedBackend` gives the backend primitives with cuemu: each `.cu` is compiled for the CPU
with its headers inlined (cuemu takes one file) and the module's `-D` options written as
`#define`s; every CUDA thread is a fiber; launches check argument byte sizes, grid/block and
shared-memory limits, alignment, warp collectives and barriers; every buffer the launch code
allocates and every input passed through `guard()` ends at a guard page (an overrun names the
buffer). Everything else (argument checks, templates, split-K plan, grid chunking, tickets,
argument tuples) is owq's own code, reached only through `cuda_ops.use_backend`. cuemu knows two
PTX forms; the bf16 rounding `cvt.rn.bf16.f32` is replaced by the same rounding in C here.
`CUEMU_MISSING` is the reason to skip where `../shared/cuemu` or g++ is absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from test_cuda_cases import assert_close, exact, make_slots, make_x

from owq.kernels import cuda_build, cuda_ops
from owq.kernels.types import PackedWeight, WeakColumns

CUEMU_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "cuemu"
BUILD_DIR = Path(os.environ.get("OWQ_CUEMU_BUILD", Path(tempfile.gettempdir()) / "owq-cuemu"))
os.environ.setdefault("CUEMU_BUILD_DIR", str(BUILD_DIR / "lib"))

if not (CUEMU_DIR / "cuemu" / "emu.py").is_file():
    CUEMU_MISSING = f"the CUDA emulator is not at {CUEMU_DIR} (../shared/cuemu from the repo root)"
elif shutil.which("g++") is None:
    CUEMU_MISSING = "the CUDA emulator needs g++ (C++17)"
else:
    CUEMU_MISSING = ""
    sys.path.insert(0, str(CUEMU_DIR))
    from cuemu.emu import ADDRESS_LOCATORS, EmuModule, GuardedMemory, LaunchError, Schedule

    REGS = json.loads((CUEMU_DIR / "ptxas_regs.json").read_text())["sm_90"]
    SCHEDULES = (
        Schedule(),
        Schedule(blocks="reverse", threads="reverse"),
        Schedule(blocks="random", threads="random", seed=1),
        Schedule(blocks="random", threads="random", seed=2, workers=2),
        Schedule(blocks="random", threads="random", seed=3, poison=0x00),
    )

BF16_CVT = re.compile(r'asm\("cvt\.rn\.bf16\.f32 %0, %1;" : "=h"\((\w+)\) : "f"\((\w+)\)\);')
BF16_C = """static inline unsigned short owq_emulated_cvt_rn_bf16_f32(float f) {
  unsigned u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFFu;  // canonical NaN, like the GPU
  return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  // nearest even
}
"""
CUDA_GRID_YZ = 65535  # gridDim.y and gridDim.z limit of every CUDA GPU
LAUNCHED: set[tuple[str, str]] = set()  # (f16 | bf16, kernel) launched in this process
_MODULES: dict = {}


def expand(source: cuda_build.KernelSource, options: tuple[str, ...], header_dir: Path) -> str:
    """The source as one file: -D options as #defines, quoted includes inlined with #line."""
    defines = [f"#define {o[2:]} 1\n" for o in options if o.startswith("-D")]
    text = source.code
    for header in source.headers():
        body = (header_dir / header).read_text()
        line = text[: text.index(f'#include "{header}"')].count("\n") + 2
        text = text.replace(
            f'#include "{header}"', f'#line 1 "{header}"\n{body}#line {line} "{source.name}"'
        )
    text = BF16_CVT.sub(r"\1 = owq_emulated_cvt_rn_bf16_f32(\2);", text)
    return "".join(defines) + BF16_C + f'#line 1 "{source.name}"\n' + text


class EmulatedBackend(cuda_build.Backend):
    """cuemu kernels on CPU tensors. `limits` stands for the device (SM count, grid limits);
    `schedule` orders blocks and threads; `sources` maps a file name to another directory's copy
    (planted bugs)."""

    device_type = "cpu"

    def __init__(self, schedule=None, limits=None, sources=None, guard=True, execute=True):
        super().__init__()
        self.execute = execute  # False: record and check each launch's shape, run nothing
        self.schedule = schedule or Schedule()
        self.device_limits = limits or cuda_build.DeviceLimits(132, 65536, 228 * 1024)
        self.sources = sources
        self.memory = GuardedMemory(poison=self.schedule.poison) if guard else None
        self.launches: list[tuple[str, tuple, int]] = []  # (kernel, grid, smem)

    def available(self) -> bool:
        return True

    def compile(self, source, options, device):
        if self.sources is not None and (self.sources / source.name).is_file():
            text = (self.sources / source.name).read_text()
            source = cuda_build.KernelSource(source.name, text, "planted")
        header_dir = self.sources or cuda_build.KERNEL_DIR
        text = expand(source, options, header_dir)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        if digest not in _MODULES:
            act = "bf16" if "-DOWQ_ACT_BF16" in options else "f16"
            path = BUILD_DIR / "src" / f"{Path(source.name).stem}-{act}-{digest}.cu"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            _MODULES[digest] = EmuModule(path)
        return _MODULES[digest]

    def arch(self, device) -> tuple[int, int]:
        return (9, 0)

    def limits(self, device) -> cuda_build.DeviceLimits:
        return self.device_limits

    def launch(self, kernel, grid, block, args, smem, device) -> None:
        kernel.num_regs = REGS.get(kernel.name, 128)
        self.launches.append((kernel.name, grid, smem))
        if not self.execute:
            if max(grid[1:]) > CUDA_GRID_YZ or len(args) != len(kernel.param_sizes):
                raise LaunchError(f"{kernel.name}: grid {grid} or {len(args)} arguments")
            return
        kernel(grid, block, args, shared_mem=smem, schedule=self.schedule)
        LAUNCHED.add((kernel.module.source.stem.split("-")[-2], kernel.name))
        bad = self.memory.check() if self.memory else []
        if bad:
            raise LaunchError(f"{kernel.name}: " + "; ".join(bad))

    def stream_key(self, device) -> int:
        return 0

    def empty(self, shape, dtype, device) -> torch.Tensor:
        if self.memory is None:
            return torch.empty(shape, dtype=dtype)
        return self.memory.empty(shape, dtype, "cuda_ops buffer")

    def guard(self, t: torch.Tensor | None, label: str) -> torch.Tensor | None:
        """A copy of `t` that ends at a guard page (t itself without guarding)."""
        return t if t is None or self.memory is None else self.memory.copy(t, label)

    def tickets_left(self) -> list[int]:
        return [int(t.count_nonzero()) for t in self.ticket_counters()]

    def __enter__(self) -> EmulatedBackend:
        if self.memory:
            ADDRESS_LOCATORS.append(self.memory.locate)
        return self

    def __exit__(self, *exc) -> None:
        if self.memory:
            ADDRESS_LOCATORS.remove(self.memory.locate)


def kernel_names(act: torch.dtype = torch.float16) -> set[str]:
    """Every kernel the sources define (as the emulator finds them)."""
    backend = EmulatedBackend(guard=False)
    names = set()
    for source in cuda_build.KERNEL_SOURCES:
        module = backend.compile(
            cuda_build.kernel_source(source), cuda_build.compile_options(act), None
        )
        names |= set(module.names)
    return names


def emulator_session():
    """Module fixture body: one intra-op thread (the cases are small), modules built in parallel."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(kernel_names, (torch.float16, torch.bfloat16)))
    yield
    torch.set_num_threads(threads)


def guarded(b: EmulatedBackend, layer, slots=None, bias=True):
    """(packed, weak, bias, slots) of `layer` as guarded copies."""
    g = b.guard
    q, s, z = g(layer.qweight, "qweight"), g(layer.scales, "scales"), g(layer.qzeros, "qzeros")
    weak = WeakColumns(g(layer.outlier_idx, "outlier_idx"), g(layer.weak_table, "table"))
    bias_ = g(layer.bias, "bias") if bias else None
    return PackedWeight(q, s, z, layer.bits, layer.group_size), weak, bias_, g(slots, "slots")


def run(op, layer, x, slots=None, bias=True, **backend_kw) -> torch.Tensor:
    """`cuda_ops.<op>` on the emulator; the split-K tickets must be back at zero."""
    with EmulatedBackend(**backend_kw) as b, cuda_ops.use_backend(b):
        packed, weak, bias_, slots_ = guarded(b, layer, slots, bias)
        y = getattr(cuda_ops, op)(b.guard(x, "x"), packed, weak, bias_, slots_)
        assert b.tickets_left() == [0] * len(b.ticket_counters())
        return y.clone()


def check(op, layer, m, mix="none", bias=True, dtype=torch.float16, seed=0, **backend_kw):
    x = make_x(m, layer.in_features, seed, dtype)
    slots = make_slots(mix, m, layer.num_slots, seed)
    y = run(op, layer, x, slots, bias, **backend_kw)
    assert y.shape == (m, layer.out_features) and y.dtype == dtype
    assert_close(y, exact(x, layer, slots, bias), layer.in_features, dtype)
    return y
