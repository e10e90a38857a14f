"""First run: `owq serve` on a fresh cache (`OWQ_CACHE` = a new temp dir) until /ready, timed.

This is what a new user waits for after `./scripts/setup.sh`: the built-in default is quantized
once (from the committed weak-column plan) and the server starts. Records the wall time to ready,
the quantization time from the checkpoint's report, the cores, the load average around the run
(the figure depends on how busy the machine is), the sha256 of `model.safetensors` and the base
fingerprint, and whether every example adapter fits. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import httpx
from serving_clients import start_server, stop

EXAMPLES = """examples:
  nice -n 10 python benchmarks/first_run.py                  # a fresh cache, deleted afterwards
  python benchmarks/first_run.py --keep-cache /tmp/first-run  # keep the made checkpoint there
"""


def serve_until_ready(cache: Path, timeout_s: float, log_path: Path) -> dict:
    env = {**os.environ, "OWQ_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    load_before = os.getloadavg()
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc, url = start_server(["owq", "serve"], "/ready", timeout_s, log, env=env)
        try:
            seconds = time.perf_counter() - start
            models = httpx.get(f"{url}/v1/models", timeout=30).json()
        finally:
            stop(proc)
    return {
        "seconds_to_ready": seconds,
        "served_models": [m["id"] for m in models["data"]],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def log_lines(text: str, keep: int = 40) -> list[str]:
    """The server's log without the /ready polling, each progress bar at its last state."""
    lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    return [line for line in lines if line.strip() and '"GET /ready' not in line][-keep:]


def checkpoint_facts(ckpt: Path) -> dict:
    from owq.default_checkpoint import default_adapters_dir, default_plan
    from owq.kernels.adapters import load_adapter
    from owq.kernels.checkpoint import file_sha256
    from owq.kernels.plan import plan_of_checkpoint

    report = json.loads((ckpt / "owq_report.json").read_text())
    fingerprint = plan_of_checkpoint(ckpt).fingerprint
    adapters = default_adapters_dir()
    fits = {
        p.name: load_adapter(p).base_fingerprint == fingerprint
        for p in sorted(adapters.iterdir() if adapters else [])
        if p.is_dir()
    }
    return {
        "quantize_seconds": report.get("seconds", {}),
        "model_sha256": file_sha256(ckpt / "model.safetensors"),
        "fingerprint": fingerprint,
        "builtin_plan_fingerprint": default_plan().fingerprint,
        "adapters_fit": fits,
    }


def format_table(result: dict) -> str:
    seconds = result["quantize_seconds"]
    rows = [
        ("first owq serve until /ready", f"{result['seconds_to_ready']:.0f} s"),
        ("  of which quantizing the default", f"{seconds.get('total', 0):.0f} s"),
        ("cores", str(result["cores"])),
        (
            "load average before / after",
            " / ".join(
                f"{a[0]:.1f}" for a in (result["load_average_before"], result["load_average_after"])
            ),
        ),  # fmt: skip
        (
            "fingerprint (built-in plan)",
            f"{result['fingerprint']} ({result['builtin_plan_fingerprint']})",
        ),  # fmt: skip
        ("model.safetensors sha256", result["model_sha256"][:16] + "..."),
        ("example adapters fit", ", ".join(f"{k}: {v}" for k, v in result["adapters_fit"].items())),
        ("served models", ", ".join(result["served_models"])),
    ]
    return "\n".join(f"{name:<34} {value}" for name, value in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--keep-cache", type=Path, default=None, help="cache dir to use and keep")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for /ready")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/first_run.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="owq-first-run-") as tmp:
        cache = args.keep_cache or Path(tmp) / "cache"
        if cache.exists() and any(cache.iterdir()):
            p.error(f"{cache} is not empty: the first run needs a fresh cache")
        result = serve_until_ready(cache, args.timeout, Path(tmp) / "serve.log")
        with open(Path(tmp) / "serve.log", newline="") as log:  # keep tqdm's "\r"
            result["log"] = log_lines(log.read())
        from owq.default_checkpoint import CHECKPOINT_NAME

        result |= checkpoint_facts(cache / CHECKPOINT_NAME)
    result |= {"cores": os.cpu_count(), "machine": platform.platform()}
    print(format_table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
