"""Settings of one quantization run: a typed frozen dataclass, its validation and defaults.

Shared by the API, the CLI and the driver; knows no tensors, models or files (the
layout's bit-widths and group sizes come from `kernels.packing`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from owq.kernels.packing import SUPPORTED_BITS as WBITS
from owq.kernels.packing import SUPPORTED_GROUP_SIZES as GROUP_SIZES

METHODS = ("rtn", "gptq", "owq")
ALLOCATIONS = ("uniform", "global")
DEFAULT_OWQ_EXTRA_BITS = 0.05  # like the paper's small-model rows (Table 1, marked *)


@dataclass(frozen=True)
class QuantizeSettings:
    """Everything that decides the bytes of a quantized checkpoint (plus batch_size for speed)."""

    method: str = "owq"
    wbits: int = 3
    target_bits: float | None = None  # OWQ: average bits incl. fp16 weak columns (paper's t)
    weak_columns: int | None = None  # OWQ: fixed k per layer (instead of target_bits)
    allocation: str = "uniform"  # uniform (Appendix D.2) | global (sensitivity-ranked)
    groupsize: int = -1
    act_order: bool = False
    true_sequential: bool | None = None  # None = on for owq (one pass per block), off otherwise
    sym: bool = False
    search: bool | None = None  # truncation grid search; None = on for owq, off otherwise
    percdamp: float = 0.01
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    calib: str = "austen"
    batch_size: int = 8  # calibration windows per forward (speed only, not results)

    def resolved(self) -> QuantizeSettings:
        """Fill method-dependent defaults; raise ValueError (one line) on an invalid combination."""
        self.validate()
        search = self.search if self.search is not None else self.method == "owq"
        sequential = self.true_sequential
        if sequential is None:
            sequential = self.method == "owq"
        target, k = self.target_bits, self.weak_columns
        if self.method == "owq" and target is None and k is None:
            target = self.wbits + DEFAULT_OWQ_EXTRA_BITS
        return replace(
            self, search=search, true_sequential=sequential, target_bits=target, weak_columns=k
        )

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.wbits not in WBITS:
            raise ValueError(f"--wbits must be one of {WBITS}, got {self.wbits}")
        if self.groupsize not in GROUP_SIZES:
            raise ValueError(f"--groupsize must be one of {GROUP_SIZES}, got {self.groupsize}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"--allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.target_bits is not None and self.weak_columns is not None:
            raise ValueError("give either --target-bits or --weak-columns, not both")
        wants_weak = self.target_bits is not None or self.weak_columns is not None
        if wants_weak and self.method != "owq":
            raise ValueError("--target-bits/--weak-columns need --method owq")
        if self.target_bits is not None and not self.wbits <= self.target_bits < 16:
            raise ValueError(
                f"--target-bits {self.target_bits} must lie in [--wbits {self.wbits}, 16)"
            )
        if self.weak_columns is not None and self.weak_columns < 0:
            raise ValueError(f"--weak-columns must be >= 0, got {self.weak_columns}")
        if self.method == "rtn" and (self.act_order or self.true_sequential):
            raise ValueError("--act-order/--true-sequential apply to gptq and owq, not rtn")
        if not 0 <= self.percdamp < 1:
            raise ValueError(f"--percdamp must lie in [0, 1), got {self.percdamp}")
        if self.nsamples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise ValueError("--nsamples, --batch-size must be >= 1 and --seqlen >= 2")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn"

    def to_dict(self) -> dict:
        return asdict(self)
