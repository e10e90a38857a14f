"""`owq serve --ray`: replicas of the owq engine on Ray Serve, routed by adapter (needs owq[ray]).

Builds one Ray Serve application from the same flags as `owq serve`: the `EngineReplica`
deployment (one engine and its app per replica, `ray_replica.py`) is the ingress, each
replica serving HTTP itself behind HAProxy, with the `Router` (`ray_router.py`) as its ingress
request router: HAProxy asks it which replica serves each request, a replica holding its
adapter (Ray's model multiplexing) or, with `--ray-routing round-robin`, each replica in turn
(the baseline). Needs the settings of `ray_env.py` in every Ray process. `run` starts a local
Ray instance (or joins `--ray-address`) and serves until SIGINT or SIGTERM; `build_app` is
the same application for a `RayService` (`serveConfigV2` with `import_path:
owq.server.ray_serve:build_app` and `args: {argv: [owq serve flags]}`). Knows deployments and
flags, not requests.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import threading
from dataclasses import dataclass

from ray import serve

from . import ray_env
from .engine import EngineConfig
from .ray_replica import CLUSTER_SLOTS, EngineReplica, ReplicaSpec
from .ray_router import RoundRobin, Router

log = logging.getLogger(__name__)

APP_NAME = "owq"
ROUTER, REPLICAS = "Router", "EngineReplica"  # the deployments' names (a RayService sets them)
ROUTER_MAX_ONGOING = 4096  # the router only picks: the replicas' queues apply the limits
HEALTH_CHECK_PERIOD_S = 10
GRACEFUL_SHUTDOWN_S = 30


@dataclass(frozen=True)
class ScaleOut:
    """How many replicas, how big, and how requests find them (the --ray-* flags)."""

    replicas: int = 2
    min_replicas: int | None = None  # both bounds set: autoscaling between them
    max_replicas: int | None = None
    cpus_per_replica: float = 1.0
    max_adapters_per_replica: int = 8
    routing: str = "multiplexed"

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_replica))


def scale_out_of(args) -> ScaleOut:
    scale = ScaleOut(
        args.ray_replicas, args.ray_min_replicas, args.ray_max_replicas,
        args.ray_cpus_per_replica, args.ray_max_adapters_per_replica, args.ray_routing,
    )  # fmt: skip
    low, high = scale.min_replicas, scale.max_replicas
    if scale.autoscaling and (low is None or high is None or not 0 < low <= high):
        raise ValueError(
            "--ray-min-replicas and --ray-max-replicas go together, with 1 <= min <= max"
        )
    return scale


def replica_options(scale: ScaleOut, engine: EngineConfig) -> dict:
    """Ray deployment options of the engine replicas."""
    resources = {"num_cpus": scale.cpus_per_replica}
    if str(engine.device).startswith("cuda"):
        resources["num_gpus"] = 1  # one GPU per replica: its engine owns the device
    options = {
        "ray_actor_options": resources,
        # Past its batch and queue a replica answers 429 itself; Ray must not hold requests
        # back before that, or a busy replica would lose its adapters' traffic to another one.
        # On top: slots for the answers for all replicas (`ray_replica.CLUSTER_SLOTS`), each
        # holding a slot here while it asks every replica, this one included.
        "max_ongoing_requests": engine.max_batch + engine.max_queue + CLUSTER_SLOTS,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
    }
    if scale.routing == "round-robin":
        options["request_router_config"] = {"request_router_class": RoundRobin}
    if scale.autoscaling:
        initial = min(max(scale.replicas, scale.min_replicas), scale.max_replicas)
        options["autoscaling_config"] = {
            "min_replicas": scale.min_replicas,
            "max_replicas": scale.max_replicas,
            "initial_replicas": initial,
            "target_ongoing_requests": engine.max_batch,  # a full batch per replica
        }
    else:
        options["num_replicas"] = scale.replicas
    return options


def build_application(spec: ReplicaSpec, scale: ScaleOut, base_name: str):
    """The Ray Serve application: the engine replicas as the ingress, the router asked by
    HAProxy which of them serves each request."""
    replicas = (
        serve.deployment(serve.ingress()(EngineReplica), name=REPLICAS)
        .options(**replica_options(scale, spec.engine))
        .bind(spec)
    )
    router = serve.deployment(serve.ingress()(Router), name=ROUTER).options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=ROUTER_MAX_ONGOING
    )
    multiplexed = scale.routing == "multiplexed"
    return replicas._with_ingress_request_router(router.bind(replicas, base_name, multiplexed))


def replica_spec(args, scale: ScaleOut) -> tuple[ReplicaSpec, str]:
    """(what every replica builds, the base model's public name) from `owq serve` flags."""
    from owq.kernels.checkpoint import checkpoint_name

    from .cli import build_settings, engine_config, resolve_paths

    ckpt, adapters = resolve_paths(args)
    settings = build_settings(args).model_copy(update={"preload_adapters": False})
    # the registry's own LRU bound is Ray's: Ray's evictions unload, this one is the backstop
    engine = dataclasses.replace(
        engine_config(args), max_loaded_adapters=scale.max_adapters_per_replica
    )
    spec = ReplicaSpec(ckpt, adapters, args.served_model_name, engine, settings, scale.threads)
    return spec, args.served_model_name or checkpoint_name(ckpt)


def parse_serve_flags(argv: list[str]) -> argparse.Namespace:
    """`owq serve` flags as the command line parses them; ValueError naming them if invalid."""
    from . import cli

    parser = argparse.ArgumentParser(prog="owq", exit_on_error=False)
    cli.add_parser(parser.add_subparsers(dest="command"))
    try:
        return parser.parse_args(["serve", *map(str, argv)])
    except (argparse.ArgumentError, SystemExit) as e:
        raise ValueError(f"invalid owq serve flags {argv}: {e}") from None


def build_app(args: dict):
    """Application builder for `serve run` / a RayService: `args = {"argv": [flags]}`, the
    flags of `owq serve --ray` (a checkpoint dir is required: there is no default there)."""
    unknown = set(args) - {"argv"}
    if unknown:
        raise ValueError(f"unknown builder args {sorted(unknown)}: give {{argv: [flags]}}")
    flags = parse_serve_flags(list(args.get("argv", [])))
    if flags.ckpt is None:
        raise ValueError("give the checkpoint dir as the first of argv (no built-in default)")
    scale = scale_out_of(flags)
    spec, base_name = replica_spec(flags, scale)
    ray_env.require(ray_env.mismatched(), "this Ray cluster")  # the builder runs on it
    return build_application(spec, scale, base_name)


def run(args) -> int:
    """`owq serve --ray`: serve on a local Ray instance (or `--ray-address`) until SIGINT or
    SIGTERM (also one that comes while the replicas start), then shut Serve and Ray down."""
    import ray

    scale = scale_out_of(args)
    spec, base_name = replica_spec(args, scale)
    if spec.settings.keys is None:
        log.warning("no --api-keys file: every replica is OPEN to every client and admin route")
    address = args.ray_address or "local"  # "local": a new instance, never a running one
    ray.init(address=address, include_dashboard=False, configure_logging=False)
    # Ray's settings are each process's own: ask a process of the cluster, not this driver
    wrong = ray.get(ray.remote(num_cpus=0)(ray_env.mismatched).remote())
    if wrong:
        ray.shutdown()
        ray_env.require(wrong, f"the Ray cluster at {address}")
    stop = threading.Event()
    previous = on_signals(lambda *_: stop.set())  # after ray.init, which sets its own
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_application(spec, scale, base_name), name=APP_NAME, route_prefix="/")
        log.info(
            "serving %s on http://%s:%d: %s, %s routing, %d adapters per replica",
            spec.ckpt, args.host, args.port, describe(scale), scale.routing,
            scale.max_adapters_per_replica,
        )  # fmt: skip
        while not stop.wait(1.0):
            pass
        log.info("shutting down")
        serve.shutdown()
    finally:
        restore_signals(previous)
        ray.shutdown()
    return 0


def describe(scale: ScaleOut) -> str:
    if scale.autoscaling:
        count = f"{scale.min_replicas}-{scale.max_replicas} replicas (autoscaling)"
    else:
        count = f"{scale.replicas} replicas"
    return f"{count} of {scale.cpus_per_replica:g} CPU"


def on_signals(handler) -> dict:
    """Set `handler` for SIGINT and SIGTERM; the handlers it replaced (None: one set outside
    Python, which cannot be restored)."""
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
