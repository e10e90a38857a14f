"""GPU serving benchmark: `owq serve --device cuda` under 1, 16 and 64 concurrent streaming
clients, all on one adapter and spread over 16 distinct adapters (one client cannot spread, so
that pair is one scenario): tokens/s, time to first token and inter-token latency.

The server is the real command in its own process, the clients and the table are
`benchmarks/serving.py`'s (httpx streaming `/v1/completions`, one timestamp per token). The
adapters are random weak-column adapters of the checkpoint's base. Prints a table, writes JSON.
Needs an NVIDIA GPU with CuPy (`pip install owq[cuda]`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from serving_clients import (
    START_TIMEOUT_S,
    Scenario,
    body,
    full_length,
    make_adapters,
    print_table,
    run_clients,
    start_server,
    stop,
)

EXAMPLES = """examples:
  python benchmarks/gpu_serving.py                          # the default checkpoint
  python benchmarks/gpu_serving.py --ckpt ckpt/owq-3 --max-tokens 128 --per-client 4
  python benchmarks/gpu_serving.py --clients 1 16 --max-tokens 16   # a short run
"""
ADAPTERS = 16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", type=Path, default=None, help="owq checkpoint (default: built-in)")
    p.add_argument("--clients", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    p.add_argument("--per-client", type=int, default=2, help="requests per client")
    p.add_argument("--json", type=Path, default=None, help="default results/gpu_serving.json")
    args = p.parse_args(argv)
    results = Path(__file__).resolve().parent / "results"
    args.json = args.json or results / "gpu_serving.json"
    return args


def cuda_server(ckpt: Path, adapters: Path, max_batch: int, log):
    cmd = ["owq", "serve", str(ckpt), "--adapters", str(adapters), "--device", "cuda"]
    cmd += ["--max-batch", str(max_batch), "--max-queue", "1024"]
    return start_server(cmd, "/ready", START_TIMEOUT_S, log)


def scenarios(args, ckpt: Path, log) -> list[Scenario]:
    """Every (clients, adapters) pair on one server, one after another."""
    out = []
    with tempfile.TemporaryDirectory(prefix="owq-gpu-bench-adapters-") as tmp:
        names = make_adapters(ckpt, Path(tmp), ADAPTERS)
        proc, url = cuda_server(ckpt, Path(tmp), max(args.clients), log)
        try:
            asyncio.run(run_clients(url, Scenario("warm-up", "owq-cuda", 1, 1), [body(0, 4)], 1))
            full = full_length("owq", args.max_tokens)
            for clients in args.clients:
                for adapters in sorted({1, min(ADAPTERS, clients)}):
                    models = [names[i % adapters] for i in range(clients)]
                    bodies = [body(i, args.max_tokens, m, extra=full) for i, m in enumerate(models)]
                    name = f"cuda, {clients} clients, {adapters} adapter(s)"
                    sc = Scenario(name, "owq-cuda", clients, adapters)
                    out.append(asyncio.run(run_clients(url, sc, bodies, args.per_client)))
        finally:
            stop(proc)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from owq.kernels import cuda_ops

    if not torch.cuda.is_available() or not cuda_ops.available():
        print("error: needs an NVIDIA GPU and CuPy (pip install owq[cuda])", file=sys.stderr)
        return 2
    if args.ckpt is None:
        from owq.default_checkpoint import default_checkpoint

        args.ckpt = default_checkpoint()
    log_path = Path(tempfile.gettempdir()) / "owq-gpu-serving-server.log"
    with open(log_path, "w") as log:
        results = scenarios(args, args.ckpt, log)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print_table(results, [f"server log: {log_path}"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "ckpt": str(args.ckpt),
        "device": torch.cuda.get_device_name(),
        "max_tokens": args.max_tokens,
        "per_client": args.per_client,
        "scenarios": [asdict(s) for s in results],
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
