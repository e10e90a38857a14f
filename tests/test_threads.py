"""A server's helper threads open no OpenMP team of their own (`owq.threads`): a second team
makes libgomp's workers sleep between the parallel regions of every later decode step."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from owq.kernels.adapters import Adapter, save_adapter
from owq.server.adapter_registry import AdapterRegistry, check_columns
from owq.server.engine import Engine
from owq.threads import single_thread

SHAPE = (64, 4096)  # big enough that torch splits a check of it across threads


def thread_ids() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def on_new_thread(work) -> int:
    """Threads started (and alive after) while `work` ran on a helper thread that stays alive
    (as an executor's does): new thread ids, not the count, which a thread an earlier test left
    behind may lower by ending meanwhile."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: None).result()
        before = thread_ids()
        pool.submit(work).result()
        return len(thread_ids() - before)


async def load_counting(registry: AdapterRegistry, name: str):
    """The adapter loaded as a server loads it (on its event loop's executor thread), and the
    threads started meanwhile, counted while that thread is still alive."""
    with ThreadPoolExecutor(1) as pool:
        asyncio.get_running_loop().set_default_executor(pool)
        await asyncio.to_thread(lambda: None)
        before = thread_ids()
        handle = await registry.resolve(name)
        return handle, len(thread_ids() - before)


def test_a_helper_thread_loading_an_adapter_opens_no_openmp_team(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a team has a worker to start even on a one-core machine
    try:
        columns = {"layer": torch.randn(SHAPE).half()}
        save_adapter(Adapter("big", "base", columns), tmp_path / "big")
        # the premise: the adapter's checks alone, on a helper thread, start a team's worker
        assert on_new_thread(lambda: check_columns("big", columns, {"layer": SHAPE})) >= 1

        registry = AdapterRegistry(tmp_path, "base", {"layer": SHAPE}, "base-model")

        handle, gained = asyncio.run(load_counting(registry, "big"))
        assert gained == 0
        assert torch.equal(handle.columns["layer"], columns["layer"])
    finally:
        torch.set_num_threads(threads)


def test_single_thread_leaves_the_other_threads_their_count():
    threads = torch.get_num_threads()
    seen = []
    with ThreadPoolExecutor(1) as pool:

        def inside() -> None:
            with single_thread():
                seen.append(torch.get_num_threads())
            seen.append(torch.get_num_threads())

        pool.submit(inside).result()
    assert seen == [1, threads]
    assert torch.get_num_threads() == threads


def test_the_model_thread_takes_the_full_count_while_a_helper_holds_one():
    """A thread started while a helper is inside `single_thread` would take torch's count of 1
    for good; the engine's model thread sets the count of the thread that started it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    held, release = threading.Event(), threading.Event()

    def helper() -> None:
        with single_thread():
            held.set()
            release.wait(30)

    holder = threading.Thread(target=helper)
    holder.start()
    try:
        assert held.wait(30)
        plain = []
        other = threading.Thread(target=lambda: plain.append(torch.get_num_threads()))
        other.start()
        other.join()
        assert plain == [1]  # the premise: a thread started now takes 1
        engine = Engine.__new__(Engine)  # only what start() touches
        engine._thread = None
        engine._running, engine._stopping, engine._stopped = (threading.Event() for _ in "abc")
        seen = []
        engine.run_forever = lambda: seen.append(torch.get_num_threads())
        engine.start()
        engine._thread.join(30)
        assert seen == [2]
    finally:
        release.set()
        holder.join()
        torch.set_num_threads(threads)
