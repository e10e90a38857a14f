"""The clients of the soak test (`soak.py`): what they send, how they judge each answer.

Each client loops until the end time: completions or chat, streamed or not, on the base or an
adapter, sometimes a greedy probe whose text must be one adapter version's; some streams are
closed midway. The admin client replaces (files switched, then reloaded), unloads and loads
adapters. Knows HTTP and the probe texts, nothing about the server's process.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROBE = "It is a truth universally acknowledged, that a single man in possession of"
PROMPTS = [
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who",
    "Emma Woodhouse, handsome, clever, and rich,",
    "No one who had ever seen Catherine Morland in her infancy",
    "Tell me about the weather in Bath.",
]
PROBE_TOKENS = 12
VERSIONS = ("A", "B")
RETRY = (429, 503)


@dataclass
class Tally:
    """What the clients saw."""

    requests: int = 0
    complete: int = 0
    cancelled: int = 0  # streams the client closed on purpose
    retry_later: int = 0  # 429/503 with Retry-After
    no_retry_after: int = 0  # 429/503 without it
    server_errors: int = 0  # 5xx
    client_errors: int = 0  # other 4xx
    lost: int = 0  # transport errors, streams that ended without a result
    hung: int = 0  # past the deadline
    probes: int = 0
    version_mix: int = 0  # a probe whose text is neither version's
    statuses: Counter = field(default_factory=Counter)
    ttft_s: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text[:300])


def switch(root: Path, name: str, version: str) -> None:
    """Point root/<name> at `version`, atomically (a new link renamed over the old)."""
    tmp = root / f".{name}.link"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path(".versions") / version / name)
    os.replace(tmp, root / name)


# ---- one request ---------------------------------------------------------------------------


def request_body(rng: random.Random, names: list[str]) -> tuple[str, dict, bool]:
    """(path, body, is_probe): a greedy probe on an adapter, or a sampled request."""
    adapter = rng.choice([None, *names])
    stream = rng.random() < 0.6
    if adapter is not None and rng.random() < 0.5:
        body = {"prompt": PROBE, "max_tokens": PROBE_TOKENS, "temperature": 0}
        return "/v1/completions", {**body, "model": adapter, "stream": stream}, True
    common = {"max_tokens": rng.randint(4, 40), "temperature": 0.8, "seed": rng.randrange(1 << 30)}
    common.update({"stream": stream, **({"model": adapter} if adapter else {})})
    prompt = rng.choice(PROMPTS)
    if rng.random() < 0.5:
        return "/v1/completions", {"prompt": prompt, **common}, False
    messages = [{"role": "user", "content": prompt}]
    return "/v1/chat/completions", {"messages": messages, **common}, False


def piece(event: dict) -> str:
    choice = (event.get("choices") or [{}])[0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def streamed(client, url, body, cancel_after: int | None, tally: Tally, start: float):
    """(text, complete, cancelled) of one streamed request."""
    text, chunks, finished = "", 0, False
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r, "", False, False
        tally.statuses[200] += 1
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                return r, text, finished, False
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                tally.problem(f"error event: {event['error']}")
                return r, text, False, False
            if chunks == 0 and piece(event):
                tally.ttft_s.append(time.perf_counter() - start)
            chunks += 1
            text += piece(event)
            finished = finished or any(c.get("finish_reason") for c in event.get("choices", []))
            if cancel_after is not None and chunks >= cancel_after:
                return r, text, False, True
    return r, text, False, False


async def one(client, base: str, path: str, body: dict, rng, tally: Tally):
    """(status, text, complete, cancelled) of one request, recording its status."""
    start = time.perf_counter()
    if body.get("stream"):
        cancel_after = rng.randint(1, 6) if rng.random() < 0.15 else None
        r, text, complete, cancelled = await streamed(
            client, base + path, body, cancel_after, tally, start
        )
        if r.status_code != 200:
            tally.statuses[r.status_code] += 1
        return r, text, complete, cancelled
    r = await client.post(base + path, json=body)
    tally.statuses[r.status_code] += 1
    if r.status_code != 200:
        return r, "", False, False
    choice = r.json()["choices"][0]
    text = choice.get("text") or (choice.get("message") or {}).get("content") or ""
    return r, text, choice.get("finish_reason") is not None, False


def same_version(text: str, cancelled: bool, versions: dict[str, str], whole: bool) -> bool:
    """Whether `text` is one version's text (a prefix of it when cancelled); with `whole`
    False, only up to the first character where the versions differ."""
    a, b = versions.values()
    if not whole:
        cut = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), 0) + 1
        text, a, b = text[:cut], a[:cut], b[:cut]
        cancelled = cancelled or len(text) < cut
    return any(v.startswith(text) if cancelled else v == text for v in (a, b))


def judge(tally: Tally, r, text, complete: bool, cancelled: bool, probe, refs, whole) -> None:
    if r.status_code in RETRY:
        ok = "retry-after" in r.headers
        tally.retry_later += ok
        tally.no_retry_after += not ok
    elif r.status_code >= 500:
        tally.server_errors += 1
        tally.problem(f"{r.status_code}: {r.text[:200]}")
    elif r.status_code >= 400:
        tally.client_errors += 1
        tally.problem(f"{r.status_code}: {r.text[:200]}")
    elif cancelled:
        tally.cancelled += 1
    elif complete:
        tally.complete += 1
    else:
        tally.lost += 1
        tally.problem("a stream ended without a finish reason or [DONE]")
    if probe is not None and r.status_code == 200:
        tally.probes += 1
        versions = refs[probe]
        if not same_version(text, cancelled, versions, whole):
            tally.version_mix += 1
            tally.problem(f"probe on {probe} gave {text!r}, versions {versions}")


async def client_loop(i: int, base: str, names, refs, end: float, args, tally: Tally):
    rng = random.Random(args.seed * 1000 + i)
    async with httpx.AsyncClient(timeout=args.deadline_s) as client:
        while time.monotonic() < end:
            path, body, is_probe = request_body(rng, names)
            tally.requests += 1
            try:
                got = await asyncio.wait_for(
                    one(client, base, path, body, rng, tally), args.deadline_s
                )
            except TimeoutError:
                tally.hung += 1
                tally.problem(f"no result within {args.deadline_s} s: {path} {body}")
                continue
            except (httpx.HTTPError, json.JSONDecodeError) as e:
                tally.lost += 1
                tally.problem(f"{type(e).__name__}: {e}")
                continue
            whole = args.cpu_decode == "fp32"
            judge(tally, *got, body["model"] if is_probe else None, refs, whole)


async def admin_loop(base: str, root: Path, names, end: float, args, log: Counter):
    rng = random.Random(args.seed)
    current = dict.fromkeys(names, "A")
    async with httpx.AsyncClient(timeout=args.deadline_s) as client:
        while time.monotonic() < end:
            await asyncio.sleep(args.admin_every_s)
            name, action = rng.choice(names), rng.choice(["replace", "replace", "unload", "load"])
            if action == "replace":
                current[name] = "B" if current[name] == "A" else "A"
                switch(root, name, current[name])
            if action == "unload":
                r = await client.delete(f"{base}/v1/adapters/{name}")
                ok = r.status_code in (200, 404)  # 404: it was not loaded (evicted, unloaded)
            else:
                r = await client.post(f"{base}/v1/adapters", json={"name": name})
                ok = r.status_code == 200
            log[f"{action} {'ok' if ok else r.status_code}"] += 1
