"""The base model's id in the API: the name recorded in the checkpoint, or `--served-model-name`.

A checkpoint mounted under another dir name (as `/models/base` in the container) keeps the id
it was quantized under; `owq serve --served-model-name NAME` overrides it, as in vLLM, and a
completion that names it answers from the base.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from test_server_harness import LiveServer, tiny_assets

from owq.cli import build_parser
from owq.server.app import create_app
from owq.server.cli import build_engine, build_settings
from owq.server.metrics import ServerMetrics


def mounted(tmp_path):
    """The tiny checkpoint (recorded name `ckpt`) moved to a dir called `base`."""
    ckpt, adapters = tiny_assets(tmp_path, num_adapters=1)
    return ckpt.rename(ckpt.with_name("base")), adapters


def engine_for(argv):
    args = build_parser().parse_args(["serve", *argv, "--max-batch", "2"])
    metrics = ServerMetrics()
    engine = build_engine(Path(args.ckpt), None, args, metrics)
    settings = build_settings(args).model_copy(
        update={"start_engine": True}
    )  # `owq serve` runs it itself
    return engine, settings, metrics


def test_default_id_is_the_recorded_name_not_the_mount(tmp_path):
    base, _ = mounted(tmp_path)
    engine, _, _ = engine_for([str(base)])
    assert engine.model_name == "ckpt"


def test_served_model_name_is_listed_and_answers(tmp_path):
    base, _ = mounted(tmp_path)
    engine, settings, metrics = engine_for([str(base), "--served-model-name", "my-base"])
    with LiveServer(create_app(engine, settings, metrics)) as server:
        server.wait_ready()
        ids = [m["id"] for m in httpx.get(f"{server.base_url}/models").json()["data"]]
        assert ids == ["my-base"]
        body = {"model": "my-base", "prompt": "It is", "max_tokens": 2}
        ok = httpx.post(f"{server.base_url}/completions", json=body, timeout=60)
        assert ok.status_code == 200 and ok.json()["model"] == "my-base"
        body["model"] = "base"
        assert httpx.post(f"{server.base_url}/completions", json=body).status_code == 404
