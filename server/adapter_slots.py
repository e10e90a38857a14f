"""The device slot table of adapter weak columns, owned by the model thread.

Slot 0 is the base's own columns; slots 1..S hold adapter versions, written in place with
`OWQLinear.set_slot` (no reallocation) between steps, one stored layer (a `Part` of a possibly
fused runtime layer) at a time. A slot is pinned while any admitted
request uses it and is only rewritten when unpinned: least recently used first, empty first of
all. `acquire` returns None when every slot is pinned (the request waits in the queue). Knows
`OWQLinear` slots and adapter handles; nothing about HTTP, files or scheduling order.
"""

from __future__ import annotations

import logging

from owq.kernels import OWQLinear

from .adapter_registry import AdapterHandle

log = logging.getLogger(__name__)


class SlotTable:
    def __init__(self, targets: dict[str, tuple[OWQLinear, int]], num_slots: int):
        # stored layer name -> (runtime layer, part) for every part with weak columns
        self.targets = {
            name: (layer, part)
            for name, (layer, part) in targets.items()
            if layer.parts[part].rows.numel()
        }
        self.num_slots = num_slots
        self.keys: list[tuple[str, int] | None] = [None] * (num_slots + 1)  # index = slot
        self.pins = [0] * (num_slots + 1)
        self.last_used = [0] * (num_slots + 1)
        self.tick = 0
        self.writes = 0

    def acquire(self, handle: AdapterHandle | None) -> int | None:
        """Pin a slot holding `handle` (None = the base, slot 0), writing it if needed."""
        if handle is None:
            return 0
        slot = self._find(handle.key)
        if slot is None:
            slot = self._victim()
            if slot is None:
                return None
            self._write(slot, handle)
        self.pins[slot] += 1
        self.tick += 1
        self.last_used[slot] = self.tick
        return slot

    def release(self, slot: int) -> None:
        if slot > 0:
            self.pins[slot] -= 1

    def pinned(self) -> int:
        return sum(1 for p in self.pins[1:] if p > 0)

    def _find(self, key: tuple[str, int]) -> int | None:
        for slot in range(1, self.num_slots + 1):
            if self.keys[slot] == key:
                return slot
        return None

    def _victim(self) -> int | None:
        free = [s for s in range(1, self.num_slots + 1) if self.pins[s] == 0]
        if not free:
            return None
        return min(free, key=lambda s: (self.keys[s] is not None, self.last_used[s]))

    def _write(self, slot: int, handle: AdapterHandle) -> None:
        """Layers the adapter does not cover get the base's own columns."""
        for name, (layer, part) in self.targets.items():
            layer.set_slot(slot, handle.columns.get(name), part)
        self.keys[slot] = handle.key
        self.writes += 1
        log.debug("slot %d <- adapter %s v%d", slot, *handle.key)
