"""Settings of one quantization run: a typed frozen dataclass, its validation and defaults.

Shared by the API, the CLI and the driver; knows no tensors, models or files (the
layout's bit-widths and group sizes come from `kernels.packing`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from owq.kernels.packing import SUPPORTED_BITS as WBITS
from owq.kernels.packing import SUPPORTED_GROUP_SIZES as GROUP_SIZES

METHODS = ("rtn", "gptq", "owq")
ALLOCATIONS = ("uniform", "global", "plan")  # plan: k and columns given (`kernels.plan`)
HEAD_BITS = (16, *WBITS)  # 16: the vocabulary table stays fp16
BUDGETS = ("linear", "whole")
PROTECT_BY = ("error", "frequency", "none")  # none: no protected rows, global ranking too
SAMPLERS = ("torch", "python")  # calibration window offsets: ours, or the reference scripts'
DEFAULT_OWQ_EXTRA_BITS = 0.05  # like the paper's small-model rows (Table 1, marked *)


@dataclass(frozen=True)
class QuantizeSettings:
    """Everything that decides the bytes of a quantized checkpoint (plus batch_size for speed)."""

    method: str = "owq"
    wbits: int = 3
    target_bits: float | None = None  # OWQ: average bits incl. fp16 weak columns (paper's t)
    weak_columns: int | None = None  # OWQ: fixed k per layer (instead of target_bits)
    allocation: str = "uniform"  # uniform (Appendix D.2) | global (sensitivity-ranked) | plan
    budget: str = "linear"  # target_bits of the linears (paper) | of the whole file (true bits)
    groupsize: int = -1
    act_order: bool = False
    true_sequential: bool | None = None  # None = on for owq (one pass per block), off otherwise
    sym: bool = False
    search: bool | None = None  # truncation grid search; None = on for owq, off otherwise
    percdamp: float = 0.01
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    sampler: str = "torch"  # torch | python (the GPTQ/OWQ reference scripts' window draw)
    calib: str = "austen"
    batch_size: int = 8  # calibration windows per forward (speed only, not results)
    head_bits: int = 16  # the LM head / vocabulary table: 16 keeps it fp16
    head_groupsize: int = -1
    head_protect: float = 0.0  # fraction of vocabulary rows kept whole in fp16
    head_protect_by: str = "error"  # rank rows by λ-weighted quantization error, or frequency
    head_weak_columns: int = 0  # fp16 weak columns of the head (over the hidden size)

    def resolved(self) -> QuantizeSettings:
        """Fill method-dependent defaults; raise ValueError (one line) on an invalid combination."""
        self.validate()
        search = self.search if self.search is not None else self.method == "owq"
        sequential = self.true_sequential
        if sequential is None:
            sequential = self.method == "owq"
        target, k = self.target_bits, self.weak_columns
        if self.budget == "whole" and target is None:
            raise ValueError(
                "--budget whole needs --target-bits (true bits per weight, whole file)"
            )
        if self.method == "owq" and target is None and k is None and self.allocation != "plan":
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
        if self.budget not in BUDGETS:
            raise ValueError(f"--budget must be one of {BUDGETS}, got {self.budget!r}")
        if self.budget == "whole" and (self.method != "owq" or self.weak_columns is not None):
            raise ValueError("--budget whole needs --method owq with --target-bits")
        if self.allocation == "plan":
            self._validate_plan(wants_weak)
        if self.budget == "whole" and self.target_bits is not None:
            if not 0 < self.target_bits < 16:
                raise ValueError(f"--target-bits {self.target_bits} must lie in (0, 16)")
        elif self.target_bits is not None and not self.wbits <= self.target_bits < 16:
            raise ValueError(
                f"--target-bits {self.target_bits} must lie in [--wbits {self.wbits}, 16)"
            )
        if self.weak_columns is not None and self.weak_columns < 0:
            raise ValueError(f"--weak-columns must be >= 0, got {self.weak_columns}")
        if self.method == "rtn" and (self.act_order or self.true_sequential):
            raise ValueError("--act-order/--true-sequential apply to gptq and owq, not rtn")
        if not 0 <= self.percdamp < 1:
            raise ValueError(f"--percdamp must lie in [0, 1), got {self.percdamp}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.nsamples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise ValueError("--nsamples, --batch-size must be >= 1 and --seqlen >= 2")
        self._validate_head()

    def _validate_head(self) -> None:
        if self.head_bits not in HEAD_BITS:
            raise ValueError(f"--head-bits must be one of {HEAD_BITS}, got {self.head_bits}")
        if self.head_groupsize not in GROUP_SIZES:
            raise ValueError(
                f"--head-groupsize must be one of {GROUP_SIZES}, got {self.head_groupsize}"
            )
        if not 0 <= self.head_protect < 1:
            raise ValueError(f"--head-protect must lie in [0, 1), got {self.head_protect}")
        if self.head_protect_by not in PROTECT_BY:
            raise ValueError(f"--head-protect-by must be one of {PROTECT_BY}")
        if self.head_protect_by == "none" and self.head_protect:
            raise ValueError("--head-protect-by none protects no rows: drop --head-protect")
        if self.head_weak_columns < 0:
            raise ValueError(f"--head-weak-columns must be >= 0, got {self.head_weak_columns}")
        extras = self.head_protect or self.head_weak_columns or self.head_groupsize != -1
        if self.head_bits == 16 and extras:
            raise ValueError("--head-protect/--head-weak-columns/--head-groupsize need --head-bits")

    def for_head(self) -> QuantizeSettings:
        """The settings the head is quantized with: its own bits and group size, GPTQ order."""
        return replace(self, wbits=self.head_bits, groupsize=self.head_groupsize, act_order=False)

    def _validate_plan(self, wants_weak: bool) -> None:
        if self.method != "owq":
            raise ValueError("--weak-columns-from needs --method owq")
        if wants_weak or self.budget == "whole":
            raise ValueError(
                "--weak-columns-from gives k per layer: drop --target-bits/--weak-columns/--budget"
            )

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn"

    def to_dict(self) -> dict:
        return asdict(self)
