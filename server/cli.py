"""`owq serve`: the OpenAI-compatible server on uvicorn (one worker, graceful shutdown).

With no CKPT it serves the built-in default checkpoint with `examples/adapters/` when present;
the command line root hands both in (`args.default_checkpoint`, `args.default_adapters_dir`:
callables), so the server never imports the quantizer that makes the default. Parses
arguments, builds the engine and the app, runs uvicorn; knows nothing about routes or tensors.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from .protocol import DEFAULT_MAX_LOADED, DEFAULT_MAX_TOKENS

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  owq serve                                   # built-in default (quantized once, cached)
  owq serve ckpt/owq-3 --adapters adapters/ --port 8000
  owq serve ckpt/owq-3 --api-keys keys.json --max-batch 32 --max-queue 512
  owq serve ckpt/owq-3 --device cuda --host 0.0.0.0
  owq serve /models/base --served-model-name default-owq3-global-h4   # the id clients send
  owq serve --ray --ray-replicas 2 --ray-max-adapters-per-replica 8   # 2 replicas on Ray Serve
  owq serve ckpt/owq-3 --adapters adapters/ --ray --ray-min-replicas 1 --ray-max-replicas 8 \\
       --ray-address auto                      # join a running Ray cluster, autoscale 1-8

  curl localhost:8000/v1/completions -H 'content-type: application/json' \\
       -d '{"prompt": "Once upon a time", "max_tokens": 32}'
  curl localhost:8000/v1/chat/completions -H 'X-OWQ-Adapter: my-task' \\
       -d '{"messages": [{"role": "user", "content": "Hi"}]}' -H 'content-type: application/json'

api-keys file (JSON): {"keys": {"sk-a": {"adapters": ["a", "b"]}, "sk-ops": {"admin": true},
                                 "sk-scrape": {"metrics": true, "base": false}}}
  adapters: names the key may use ("*" = all); base: may use the base (default true);
  admin: every model, the /v1/adapters routes and /metrics; metrics: /metrics only (give
  Prometheus this key: `authorization: {credentials_file: ...}`). Without the file the
  server is open, /metrics included.

adapters: a request naming an adapter of --adapters DIR that is not loaded loads it then;
  at most --max-loaded-adapters stay loaded (the least recently used idle one goes).
  GET /v1/adapters (admin) says why an adapter is refused.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible server with per-request adapters",
        description="Serve an owq checkpoint over an OpenAI-compatible HTTP API.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "ckpt",
        nargs="?",
        default=None,
        metavar="CKPT",
        help="owq checkpoint dir (default: the built-in default, made on first use)",
    )
    p.add_argument(
        "--adapters",
        type=Path,
        default=None,
        metavar="DIR",
        help="adapters dir (default with no CKPT: examples/adapters/ if present)",
    )
    p.add_argument(
        "--served-model-name",
        type=_model_name,
        default=None,
        metavar="NAME",
        help="the base model's id in the API (default: the name recorded in the checkpoint, "
        "else its dir name)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="rows in the running batch")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument(
        "--api-keys",
        type=Path,
        default=None,
        metavar="FILE",
        help="JSON key table (see below); without it the server is open",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--cpu-decode",
        choices=("int4", "fp32"),
        default="int4",
        help="CPU kernel for prompts and decode steps: the codes repacked for the 4-bit kernel "
        "with bf16 activations (every layer of at most 4 bits), or the fp32 dense GEMM as "
        "offline (`owq eval`, a resident fp32 copy). Steps that score their prompt's tokens "
        "(echo with logprobs) always run fp32. Seeded sampling gives the same tokens in any "
        "batch on fp32; on int4 alone (in a batch usually, not always: see the README)",
    )
    p.add_argument(
        "--resident-dense",
        action="store_true",
        help="CPU: keep a dequantized fp32 copy of every layer for the fp32 steps (prompt "
        "scoring, --cpu-decode fp32; ~4x the memory of the 4-bit codes); by default such a step "
        "dequantizes each layer per call",
    )
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger bodies get 413")
    p.add_argument(
        "--default-max-tokens",
        type=_positive,
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help="max_tokens of a chat or completion request that sets none (default %(default)s)",
    )
    p.add_argument(
        "--max-loaded-adapters",
        type=_positive,
        default=DEFAULT_MAX_LOADED,
        metavar="N",
        help="adapters held in host memory at once; more are loaded on demand, the least "
        "recently used idle one evicted (default %(default)s)",
    )
    p.add_argument(
        "--no-preload",
        action="store_true",
        help="do not load every adapter of the adapters dir at start-up",
    )
    add_ray_flags(p)
    p.set_defaults(run=run)


def add_ray_flags(p) -> None:
    """The --ray flags: replicas on Ray Serve (`server/ray_serve.py`, needs owq[ray])."""
    g = p.add_argument_group(
        "scale-out on Ray Serve (pip install 'owq[ray]')",
        "Each replica runs one engine with the flags above (--max-batch, --max-queue, ...) "
        "and the same app; a request goes to a replica that holds its adapter.",
    )
    g.add_argument("--ray", action="store_true", help="serve replicas on Ray Serve")
    g.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="join this Ray cluster ('auto': the local node's), which must run with the "
        "settings of server/ray_env.py in its environment; default: start a local one",
    )
    g.add_argument("--ray-replicas", type=_positive, default=2, metavar="N", help="replicas")
    g.add_argument(
        "--ray-min-replicas", type=_positive, default=None, metavar="N",
        help="autoscaling lower bound (with --ray-max-replicas)",
    )  # fmt: skip
    g.add_argument(
        "--ray-max-replicas", type=_positive, default=None, metavar="N",
        help="autoscaling upper bound; scales at --max-batch ongoing requests per replica",
    )  # fmt: skip
    g.add_argument(
        "--ray-cpus-per-replica", type=float, default=1.0, metavar="C",
        help="CPUs Ray reserves per replica (also its torch threads)",
    )  # fmt: skip
    g.add_argument(
        "--ray-max-adapters-per-replica", type=_positive, default=8, metavar="N",
        help="adapters a replica holds (Ray's multiplexing LRU and the registry's bound)",
    )  # fmt: skip
    g.add_argument(
        "--ray-routing",
        choices=("multiplexed", "round-robin"),
        default="multiplexed",
        help="multiplexed: to a replica holding the adapter; round-robin: each replica in "
        "turn, blind to adapters (the baseline)",
    )


def _model_name(text: str) -> str:
    if not text.strip() or text != text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not a model name (empty or padded)")
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def resolve_paths(args) -> tuple[Path, Path | None]:
    """(checkpoint dir, adapters dir or None)."""
    from owq.kernels.checkpoint import CheckpointError, read_quant_config

    if args.ckpt is None:
        return args.default_checkpoint(), args.adapters or args.default_adapters_dir()
    ckpt = Path(args.ckpt)
    read_quant_config(ckpt)  # CheckpointError with one line if it is not a checkpoint
    if args.adapters is not None and not args.adapters.is_dir():
        raise CheckpointError(f"--adapters {args.adapters} is not a directory")
    return ckpt, args.adapters


def build_settings(args):
    from .auth import KeyTable
    from .settings import ServerSettings

    keys = KeyTable.from_file(args.api_keys) if args.api_keys else None
    return ServerSettings(
        max_body_bytes=args.max_body_bytes,
        keys=keys,
        preload_adapters=not args.no_preload,
        default_max_tokens=args.default_max_tokens,
        start_engine=False,  # run() drives the model loop on the main thread
    )


def engine_config(args):
    from .engine import EngineConfig

    return EngineConfig(
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        device=args.device,
        packed_decode=args.cpu_decode == "int4",
        resident_dense=args.resident_dense,
        max_loaded_adapters=args.max_loaded_adapters,
    )


def build_engine(ckpt: Path, adapters: Path | None, args, observer):
    from .engine import Engine

    config = engine_config(args)
    return Engine.from_checkpoint(
        ckpt, config, adapters_dir=adapters, observer=observer, model_name=args.served_model_name
    )


def run(args) -> int:
    if args.ray:
        from . import ray_env

        ray_env.configure(local=not args.ray_address)  # before Ray is imported
        from .ray_serve import run as run_on_ray

        return run_on_ray(args)
    import uvicorn

    from .app import create_app
    from .metrics import ServerMetrics

    settings = build_settings(args)
    ckpt, adapters = resolve_paths(args)
    log.info(
        "serving %s%s on http://%s:%d",
        ckpt,
        f" with adapters {adapters}" if adapters else "",
        args.host,
        args.port,
    )
    log.info(
        "requests without max_tokens get %d (--default-max-tokens); at most %d adapters "
        "loaded (--max-loaded-adapters)",
        settings.default_max_tokens,
        args.max_loaded_adapters,
    )
    metrics = ServerMetrics()
    engine = build_engine(ckpt, adapters, args, metrics)
    config = uvicorn.Config(
        create_app(engine, settings, metrics),
        host=args.host,
        port=args.port,
        workers=1,
        log_level=logging.getLevelName(logging.getLogger().level).lower(),
        timeout_graceful_shutdown=30,
    )
    return serve(uvicorn.Server(config), engine)


def serve(server, engine) -> int:
    """uvicorn on a helper thread, the model loop on the main thread, until SIGINT/SIGTERM.

    The main thread owns the model because MKL runs GEMMs single-threaded on threads other than
    the first ones that used it (batch-1 decode ran at half speed on a model thread). A signal
    asks uvicorn to shut down gracefully; open requests drain while the model loop keeps
    running, then the loop stops. A second signal interrupts whatever runs (also the warm-up).
    Exit status 0 after a clean shutdown, 1 if uvicorn could not start (e.g. the port is taken).
    """

    def http() -> None:
        try:
            server.run()
        finally:
            engine.request_stop()

    def on_signal(*_) -> None:
        if server.should_exit:
            server.force_exit = True
            raise KeyboardInterrupt
        server.should_exit = True

    if not server.config.loaded:  # uvicorn's imports (its protocol classes) here, not on the
        server.config.load()  # HTTP thread while the model loop imports its own beside it
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="owq-http", daemon=True)
    try:
        thread.start()
        engine.run_forever()
    except KeyboardInterrupt:
        log.warning("interrupted")
    finally:
        server.should_exit = True  # also when the model loop failed: close HTTP cleanly
        thread.join(timeout=60)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        log.error("the HTTP server did not start")
        return 1
    log.info("stopped")
    return 0
