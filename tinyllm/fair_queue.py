"""The server's admission queue: choices wait here, not in the engine, and enter it
round-robin across HTTP requests.

Why round-robin and not a cap on each request's queued tokens. The engine admits first come
first served (scheduler.py), so a request that fans out to 2000 prompts x n=16 would put
32,000 choices ahead of everyone who comes after it. The server therefore hands the engine
only as many choices as it has free batch slots (EngineWorker._feed) and picks them here,
one per request in turn:
- a newcomer's first choice does not wait behind the flood ahead of it (a token cap still
  lets a request queue cap-many tokens ahead of it, and many requests from one client add
  up). Nor does it wait for a slot to free up: a flood's choices enter together and end
  together (same prompt, same max_tokens), so slots free in bursts up to max_tokens steps
  apart (measured: 15 of 16 steps, half of a short request's latency). When the batch is
  full, a request with nothing in the engine takes the slot of the newest choice of the
  request holding the most slots (EngineWorker._make_room: that choice is preempted, keeps
  its tokens and resumes first, mostly from the prefix cache), so it runs from the next step;
- nothing needs tuning and nothing is refused: a large fan-out still runs at full batch width
  when it is alone, and a token cap would either refuse legitimate batch-style requests or
  be set so high that it does not help;
- requests are the unit because the server has no trustworthy client identity (one API key
  is shared by every client); a client that opens many requests gets a share per request,
  which --max-prompts-per-request and n bound per request.

Ordering within a request is kept (its choices enter in index order). Thread: the engine
thread only (EngineWorker)."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator


class FairQueue:
    def __init__(self):
        self._groups: OrderedDict[int, deque] = OrderedDict()  # request -> its waiting items
        self._group_of: dict[int, int] = {}  # item key -> request
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def put(self, group: int, key: int, item):
        self._groups.setdefault(group, deque()).append((key, item))
        self._group_of[key] = group
        self._n += 1

    def groups(self) -> Iterator[int]:
        """The requests with items waiting, in turn order (the next pop's first); do not put or
        pop while iterating."""
        return iter(self._groups)

    def pop(self, group: int | None = None):
        """The next item, taking requests in turn, or the next of request `group` (None when
        there is none)."""
        if group is None:
            group = next(iter(self._groups), None)
        items = self._groups.get(group)
        if not items:
            return None
        key, item = items.popleft()
        if items:
            self._groups.move_to_end(group)  # its next item waits for the others' turn
        else:
            del self._groups[group]
        del self._group_of[key]
        self._n -= 1
        return item

    def remove(self, key: int):
        """Drop an item still waiting (its request was cancelled); True if it was here."""
        group = self._group_of.pop(key, None)
        if group is None:
            return False
        items = self._groups[group]
        for i, (k, _) in enumerate(items):
            if k == key:
                del items[i]
                break
        if not items:
            del self._groups[group]
        self._n -= 1
        return True

    def drain(self) -> list:
        """Every waiting item (the queue is left empty)."""
        out = [item for items in self._groups.values() for _, item in items]
        self._groups.clear()
        self._group_of.clear()
        self._n = 0
        return out
