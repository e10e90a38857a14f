"""Every benchmark script still imports and answers --help with its examples (the scripts run
for minutes to hours, so the suite checks only that they start)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if "__main__" in p.read_text())


def test_the_scripts_are_found():
    assert {"serving.py", "whole_model.py", "scale_out.py", "gptq_parity.py"} <= {
        p.name for p in SCRIPTS
    }


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_answers_help(script):
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout and "example" in done.stdout.lower()


def test_a_floor_against_a_failed_reference_fails_instead_of_dividing_by_nothing():
    from serving import ratio_floor
    from serving_clients import Scenario

    owq = Scenario("owq", "owq", 1, 0, requests=7, tokens=896, decode_tokens_per_s=47.1)
    llama = Scenario("llama", "llama.cpp", 1, 0, errors=["All connection attempts failed"])
    check = ratio_floor("batch-1", owq, llama, "decode_tokens_per_s", 1.0)
    assert not check["passed"] and "connection attempts failed" in check["note"]
    llama = Scenario("llama", "llama.cpp", 1, 0, requests=7, tokens=896, decode_tokens_per_s=94.2)
    check = ratio_floor("batch-1", owq, llama, "decode_tokens_per_s", 1.0)
    assert check["value"] == pytest.approx(0.5) and not check["passed"]


def test_ab_decode_base_tree_is_what_its_workers_import(tmp_path):
    """The A/B benchmark's base tree must shadow the installed checkout in its workers, or it
    would time this checkout against itself."""
    from ab_decode import export_tree

    tree = export_tree("HEAD", tmp_path)
    code = "import owq.kernels.cpu_ops as c, owq.server.runtime as r; print(c.__file__, r.__file__)"
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    files = done.stdout.split()
    assert files and all(Path(f).is_relative_to(tree) for f in files), files


def test_interleaved_sides_rotate_so_none_always_follows_the_same_one(monkeypatch):
    import serving

    monkeypatch.setattr(serving, "SETTLE_S", 0.0)
    order = []
    sides = {name: (lambda name=name: order.append(name) or name) for name in "abc"}
    out = serving.interleave(sides, 3)
    assert out == {name: [name] * 3 for name in "abc"}
    assert order == list("abcbcacab")


def sse_stream(*chunks):
    """An httpx transport that answers every request with these SSE chunks and [DONE]."""
    import json

    import httpx

    lines = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
    return httpx.MockTransport(lambda request: httpx.Response(200, text="".join(lines)))


@pytest.mark.parametrize(
    ("chunks", "tokens", "stamped"),
    [
        # owq: a token with no text yet (EOS past ignore_eos) still counts; usage has the count
        (
            [{"choices": [{"text": "a"}]}, {"choices": [{"text": ""}]},
             {"choices": [{"text": "b", "finish_reason": "length"}]},
             {"choices": [], "usage": {"completion_tokens": 3}}],
            3,
            3,
        ),
        # llama-cpp-python: no usage, and a closing chunk without text that is no token
        (
            [{"choices": [{"text": "a"}]}, {"choices": [{"text": "b"}]},
             {"choices": [{"text": "", "finish_reason": "length"}]}],
            2,
            2,
        ),
    ],
)  # fmt: skip
def test_a_stream_counts_its_tokens(chunks, tokens, stamped):
    import asyncio

    import httpx
    from serving_clients import one_stream

    async def main():
        async with httpx.AsyncClient(transport=sse_stream(*chunks)) as client:
            return await one_stream(client, "http://owq", {"prompt": "x"})

    stream = asyncio.run(main())
    assert stream.tokens == tokens and len(stream.gaps) == stamped - 1


def test_step_means_are_the_difference_of_two_scrapes():
    from serving import step_means_ms

    before = {"0": (1.0, 10.0), "2+": (0.5, 5.0)}
    after = {"0": (2.0, 30.0), "1": (0.3, 6.0), "2+": (0.5, 5.0)}
    means = step_means_ms(before, after)
    assert means == pytest.approx({"base": 50.0, "one adapter": 50.0})


def test_round_ratios_pair_the_sides_round_by_round_and_skip_failed_rounds():
    from serving import round_ratios
    from serving_clients import Scenario

    def load(*rates, failed=()):
        return [Scenario("r", "owq", 16, 0, tokens_per_s=t, errors=["boom"] if i in failed else [])
                for i, t in enumerate(rates)]  # fmt: skip

    base = load(300.0, 200.0, 250.0, 100.0, failed=(3,))
    adapters = load(285.0, 210.0, 0.0, 90.0)
    assert round_ratios(adapters, base) == pytest.approx([0.95, 1.05, 0.0])
    assert round_ratios(base, load(0.0, 100.0, 125.0, 50.0)) == pytest.approx([2.0, 2.0])


def test_histogram_totals_read_the_exposition_by_label(monkeypatch):
    import httpx
    import serving_clients
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    registry = CollectorRegistry()
    steps = Histogram("owq_step_seconds", "", ["phase", "adapters"], registry=registry)
    for phase, adapters, seconds in [("decode", "0", 0.04), ("decode", "0", 0.06),
                                     ("decode", "2+", 0.05), ("prefill", "0", 0.5)]:  # fmt: skip
        steps.labels(phase, adapters).observe(seconds)
    page = httpx.Response(200, content=generate_latest(registry))
    monkeypatch.setattr(serving_clients.httpx, "get", lambda *a, **k: page)
    decode = serving_clients.histogram_totals("http://owq", "owq_step_seconds", by="adapters",
                                              phase="decode")  # fmt: skip
    assert decode == {"0": pytest.approx((0.10, 2.0)), "2+": pytest.approx((0.05, 1.0))}
    every = serving_clients.histogram_totals("http://owq", "owq_step_seconds")
    assert every == {None: pytest.approx((0.65, 4.0))}
