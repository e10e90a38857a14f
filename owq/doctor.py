"""`owq doctor`: what a bug report needs, and whether what the README promises works here.

Checks versions, CPU features, CuPy and a GPU, the built-in model, corpus and weak-column plan,
the cache dir and its checkpoints (checksum, fingerprint), which shipped adapters fit them, and a
16-token greedy smoke generation with its tokens/s. Each finding is one line, `ok`, `info`,
`warn` or `FAIL`; the exit status is 1 when a finding is FAIL (something the README promises will
not work). Loads a checkpoint only through `owq.kernels.checkpoint.load_checkpoint` and generates
with transformers' `generate`: it knows neither the server's engine nor the quantizer.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from owq.kernels.plan import WeakColumnPlan

EXAMPLES = """examples:
  owq doctor                      # everything, with a smoke generation on the cached default
  owq doctor ckpt/owq-3           # the smoke generation on this checkpoint instead
  owq doctor --no-smoke --json    # no model run; JSON for a bug report
"""

PACKAGES = ("owq", "torch", "transformers", "safetensors", "tokenizers", "numpy", "gguf",
            "accelerate", "fastapi", "uvicorn", "pydantic", "tqdm")  # fmt: skip
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "asimd")
SMOKE_PROMPT = "It is a truth universally acknowledged"
SMOKE_TOKENS = 16


@dataclass(frozen=True)
class Finding:
    topic: str
    status: str  # ok | info | warn | FAIL
    detail: str


def add_parser(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="check this install: versions, CPU/GPU, model, corpus, cache, adapters, a smoke run",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint", metavar="CKPT", nargs="?", default=None,
        help="checkpoint for the smoke generation (default: the cached default)",
    )  # fmt: skip
    p.add_argument("--no-smoke", action="store_true", help="skip the smoke generation")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(run=run)


# versions and hardware ------------------------------------------------------------------------
def versions() -> list[Finding]:
    found, missing = [f"python {platform.python_version()}"], []
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            missing.append(name)
    findings = [Finding("versions", "ok", ", ".join(found))]
    if missing:
        findings.append(Finding("versions", "FAIL", f"not installed: {', '.join(missing)}"))
    return findings


def cpu_features() -> list[Finding]:
    import torch

    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    have = [f for f in CPU_FLAGS if f in flags] or ["unknown (no /proc/cpuinfo)"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    detail = (
        f"{platform.machine()}, {cores} cores usable, torch threads {torch.get_num_threads()}, "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, flags {' '.join(have)}"
    )
    return [Finding("cpu", "ok", detail)]


def accelerator() -> list[Finding]:
    """CUDA through torch and CuPy: optional (the CPU path serves everything), so never FAIL."""
    import torch

    if not torch.cuda.is_available():
        detail = f"no CUDA GPU usable by torch {torch.__version__}: CPU only"
        return [Finding("gpu", "info", detail)]
    gpu = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        return [Finding("gpu", "ok", f"{gpu}; CuPy {cupy.__version__} sees {count} device(s)")]
    except Exception as e:  # ImportError, or a CuPy built for another CUDA
        why = " ".join(str(e).split())[:120] or type(e).__name__
        hint = "pip install -e '.[cuda]' for the CUDA kernels"
        return [Finding("gpu", "warn", f"{gpu}; CuPy not usable ({why}): {hint}")]


# built-in assets --------------------------------------------------------------------------------
def builtin_assets() -> list[Finding]:
    from owq.builtin import corpus
    from owq.builtin.model import default_gguf_path

    findings = []
    try:
        findings.append(Finding("default model", "ok", str(default_gguf_path())))
    except FileNotFoundError as e:
        findings.append(Finding("default model", "FAIL", str(e)))
    try:
        novels = corpus.read_novels()
        findings.append(Finding("corpus", "ok", f"{corpus.rdata_path()} ({len(novels)} novels)"))
    except (FileNotFoundError, ValueError) as e:
        findings.append(Finding("corpus", "FAIL", str(e)))
    return findings


def builtin_plan() -> tuple[list[Finding], WeakColumnPlan | None]:
    from owq.default_checkpoint import default_plan

    try:
        plan = default_plan()
    except (OSError, ValueError) as e:
        return [Finding("built-in plan", "FAIL", str(e))], None
    weak = sum(1 for layer in plan.layers if layer.k)
    detail = (
        f"{len(plan.layers)} layers, {weak} with weak columns, {plan.protected_rows} protected "
        f"vocabulary rows, fingerprint {plan.fingerprint}"
    )
    return [Finding("built-in plan", "ok", detail)], plan


# cache and adapters -----------------------------------------------------------------------------
def cache(default_plan: WeakColumnPlan | None) -> tuple[list[Finding], dict[str, str]]:
    """Findings on the cache dir, and {checkpoint name: fingerprint} of its usable checkpoints."""
    from owq.default_checkpoint import CHECKPOINT_NAME, cache_dir, checkpoint_problem
    from owq.kernels.checkpoint import WEIGHTS_NAME
    from owq.kernels.plan import plan_of_checkpoint

    root = cache_dir()
    findings, fingerprints = [], {}
    for path in sorted(p for p in root.glob("*") if (p / "config.json").is_file()):
        expected = default_plan if path.name == CHECKPOINT_NAME else None
        problem = checkpoint_problem(path, expected)
        if problem is None:
            fingerprints[path.name] = plan_of_checkpoint(path).fingerprint
            mib = (path / WEIGHTS_NAME).stat().st_size / 2**20
            detail = f"{path.name}: {mib:.0f} MiB, fingerprint {fingerprints[path.name]}"
            findings.append(Finding("cache", "ok", detail))
        else:
            remade = " (owq serve makes it again)" if expected is not None else ""
            findings.append(Finding("cache", "warn", f"{path.name}: {problem}{remade}"))
    has_default = CHECKPOINT_NAME in fingerprints
    status = "ok" if _writable(root) else ("warn" if has_default else "FAIL")
    return [Finding("cache", status, _cache_line(root, has_default)), *findings], fingerprints


def _writable(root: Path) -> bool:
    probe = root if root.exists() else next((p for p in root.parents if p.exists()), root)
    return os.access(probe, os.W_OK)


def _cache_line(root: Path, has_default: bool) -> str:
    from owq.default_checkpoint import FIRST_RUN_MINUTES_2_CORES

    writable = _writable(root)
    if has_default:
        state = "holds the default"
    elif writable:
        state = (
            f"no usable default: the next owq serve makes it (about {FIRST_RUN_MINUTES_2_CORES} "
            "min on 2 cores)"
        )
    else:
        state = "no usable default and not writable: owq serve cannot make it"
    return f"{root} ({'writable' if writable else 'NOT writable'}; {state})"


def shipped_adapters(default_fingerprint: str | None, fingerprints: dict[str, str]) -> list:
    """Every adapter of examples/adapters: FAIL unless it fits the built-in default's plan."""
    from owq.default_checkpoint import default_adapters_dir
    from owq.kernels.adapters import AdapterError, load_adapter

    directory = default_adapters_dir()
    if directory is None:
        return [Finding("adapters", "info", "no examples/adapters here (source checkout only)")]
    findings = []
    for path in sorted(p for p in directory.iterdir() if p.is_dir()):
        try:
            adapter = load_adapter(path)
        except AdapterError as e:
            findings.append(Finding("adapters", "FAIL", str(e)))
            continue
        fits = [name for name, fp in fingerprints.items() if fp == adapter.base_fingerprint]
        ok = adapter.base_fingerprint == default_fingerprint
        detail = (
            f"{adapter.name}: base {adapter.base_fingerprint}, "
            f"{'fits' if ok else 'does NOT fit'} the built-in default"
            f"; fits in the cache: {', '.join(fits) or 'none'}"
        )
        findings.append(Finding("adapters", "ok" if ok else "FAIL", detail))
    return findings


# smoke generation -------------------------------------------------------------------------------
def smoke(checkpoint: Path) -> Finding:
    """Greedy SMOKE_TOKENS tokens from the checkpoint, with tokens/s (prefill included)."""
    import torch
    from transformers import AutoTokenizer

    from owq.kernels.checkpoint import load_checkpoint

    try:
        model = load_checkpoint(checkpoint)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        inputs = tokenizer(SMOKE_PROMPT, return_tensors="pt")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=SMOKE_TOKENS, min_new_tokens=SMOKE_TOKENS,
                do_sample=False, pad_token_id=pad,
            )  # fmt: skip
        seconds = time.perf_counter() - start
    except Exception as e:  # any failure here is the finding
        return Finding("smoke", "FAIL", f"{checkpoint.name}: {type(e).__name__}: {e}"[:300])
    new = out[0, inputs.input_ids.shape[1] :]
    text = tokenizer.decode(new, skip_special_tokens=True)
    detail = (
        f"{checkpoint.name}: {new.numel()} tokens in {seconds:.2f} s "
        f"({new.numel() / seconds:.1f} tokens/s, transformers generate): {text!r}"
    )
    return Finding("smoke", "ok" if new.numel() == SMOKE_TOKENS else "FAIL", detail)


def smoke_findings(args, fingerprints: dict[str, str]) -> list[Finding]:
    from owq.default_checkpoint import CHECKPOINT_NAME, default_checkpoint_path

    if args.no_smoke:
        return [Finding("smoke", "info", "skipped (--no-smoke)")]
    if args.checkpoint is not None:
        return [smoke(Path(args.checkpoint))]
    if CHECKPOINT_NAME in fingerprints:
        return [smoke(default_checkpoint_path())]
    return [Finding("smoke", "info", "skipped: no usable default checkpoint in the cache yet")]


# the command ------------------------------------------------------------------------------------
def diagnose(args) -> list[Finding]:
    findings = versions() + cpu_features() + accelerator() + builtin_assets()
    plan_findings, default_plan = builtin_plan()
    cache_findings, fingerprints = cache(default_plan)
    default_fingerprint = default_plan.fingerprint if default_plan is not None else None
    findings += plan_findings + cache_findings
    findings += shipped_adapters(default_fingerprint, fingerprints)
    return findings + smoke_findings(args, fingerprints)


def run(args) -> int:
    findings = diagnose(args)
    failed = [f for f in findings if f.status == "FAIL"]
    if args.json:
        print(json.dumps({"findings": [asdict(f) for f in findings], "ok": not failed}, indent=2))
    else:
        for f in findings:
            print(f"[{f.status:>4}] {f.topic:<14} {f.detail}")
        verdict = f"{len(failed)} problem(s): fix the FAIL lines" if failed else "all good"
        print(f"owq doctor: {verdict}", file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0
