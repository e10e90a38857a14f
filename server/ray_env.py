"""The Ray Serve settings `owq serve --ray` runs under: HAProxy in front, each replica its own
HTTP ingress, and our router asked once per request which replica serves it.

Ray Serve reads these from the environment when `ray.serve` is imported, in every Ray process:
the driver, the controller, HAProxy's manager, the replicas. `configure` sets them in this
process before Ray is imported; a local instance started from here inherits them. A cluster
sets the same in its pods (`EXPORTS`, `deploy/rayservice.yaml`). With them a streamed token
goes replica -> HAProxy -> client; without them, through two Python hops (`BENCHMARKS.md`).
Imports no Ray.
"""

from __future__ import annotations

import os
import socket
import sys

from .generation import ADAPTER_HEADER

REQUIRED = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",  # HAProxy is the HTTP front, in place of Ray's proxy
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",  # each replica serves HTTP itself
    "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",  # the router sees `model` in the body
    # HAProxy forwards one client header to the router, named by this: ours carries the adapter
    "RAY_SERVE_SESSION_ID_HEADER_KEY": ADAPTER_HEADER.lower(),
    # A replica that dies before answering: HAProxy sends the request to another replica,
    # once (a request that kills its replica must not take a second and a third with it).
    # Generation has no side effects, and loading an adapter twice is loading it once.
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    "RAY_SERVE_HAPROXY_RETRIES": "1",
    # HAProxy holds a request's body for the router (and a retry) in one buffer per
    # connection: 1 MiB (the app's default body limit) where Ray's default is 8 MiB. A larger
    # body is routed by its header alone and not retried.
    "RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_BUFSIZE": str(1 << 20),
}
# A local instance has no load balancer outside it to wait for: a stopping replica drains
# its requests and goes (Ray waits 30 s by default, for a cloud balancer to let go of it).
LOCAL = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
# Fixed ports by default: a second local instance on this machine would collide on them.
LOCAL_PORTS = (
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_HAPROXY_STATS_PORT",
)
EXPORTS = " ".join(f"{k}={v!r}" if " " in v else f"{k}={v}" for k, v in REQUIRED.items())


def configure(local: bool) -> None:
    """Set the settings in this process's environment (before Ray is imported). `local`: for a
    Ray instance started here, with free ports where Ray's are fixed (ports already set are
    kept). RuntimeError if Ray Serve was imported before with other settings."""
    os.environ.update(REQUIRED)
    if local:
        for name, value in LOCAL.items():
            os.environ.setdefault(name, value)
        for name in LOCAL_PORTS:
            os.environ.setdefault(name, str(free_port()))
    if "ray.serve" in sys.modules and (wrong := mismatched()):
        raise RuntimeError(f"Ray Serve was imported before owq set {wrong}: set them first")


def mismatched() -> list[str]:
    """The required settings this process's Ray Serve did not start with (imports it)."""
    from ray.serve._private import constants

    read = {  # the constant each setting becomes (Ray names one of them differently)
        name: getattr(constants, name, None) for name in REQUIRED
    } | {"RAY_SERVE_SESSION_ID_HEADER_KEY": constants.SERVE_SESSION_ID}
    return [name for name in REQUIRED if as_setting(read[name]) != REQUIRED[name]]


def require(wrong: list[str], where: str) -> None:
    """ValueError naming the `wrong` settings (`mismatched`) of `where`, if there are any."""
    if wrong:
        raise ValueError(
            f"{where} runs without the settings owq needs ({', '.join(wrong)}): start it with "
            f"{EXPORTS} in the environment of every Ray process (deploy/rayservice.yaml)"
        )


def as_setting(value) -> str:
    """A constant as the environment spells it (True: "1")."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return "" if value is None else str(value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
