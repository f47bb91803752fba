"""The block pool of the paged KV cache: who holds which block, and automatic prefix caching.

kv_cache.py says where a position's K/V lives (block table -> block, offset); this module
decides which blocks a sequence gets. No K/V data passes through here.

Reference counts. A block is held by every sequence whose table names it. Blocks with count
0 are *free*, kept in LRU order (least recently released first); allocation takes the
oldest. A free block keeps its contents and its hash until it is handed out again, so a
later request can still find it.

Prefix caching (vLLM's scheme). Once all block_size positions of a block row are written, the
row gets a hash chained over its parent's hash and its token ids:
    h_0 = H(ROOT, ids[0:bs]),   h_j = H(h_{j-1}, ids[j*bs:(j+1)*bs])
so equal hashes mean equal tokens from position 0: equal K/V. A request's `cache_salt`
(tenants apart, as vLLM) replaces ROOT by H(ROOT, salt) (salted_root): sequences with
different salts never produce equal hashes, so they never share a block, and a client cannot
learn through cached_tokens whether another's prompt began the same way. A new sequence takes every
leading full row whose hash is in the pool (count + 1, no copy) and computes only the rest.
Only full rows are shared, and a sequence only ever writes into rows past its hits (its
last, partial row is always its own), so no copy-on-write is needed; a shared or cached
block is never written. At least one prompt token is always computed (its logits are needed).

Sliding-window rings. A window model's table is a ring of R entries (kv_cache.py): when
row j is written, entry j % R's old block (row j - R, below every window by then) is
released, not overwritten, and a fresh block takes its place. Prefix caching works the
same way, except that a hit needs only the rows a ring holds: a match of k rows takes rows
k - R + 1 .. k - 1 (R - 1 rows, more than the window reaches back), and rows before them
may already be evicted.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .kv_cache import KVCacheSpec

ROOT = b"tinyllm-prefix-v1"


def salted_root(salt: str | None) -> bytes:
    """The parent hash of a sequence's first block row: ROOT, or ROOT mixed with its salt."""
    if salt is None:
        return ROOT
    return hashlib.blake2b(ROOT + b"\0salt\0" + salt.encode("utf-8"), digest_size=16).digest()


def chain_hash(parent: bytes, tokens) -> bytes:
    """H(parent, tokens): blake2b-128 over the parent digest and the ids as int64."""
    return hashlib.blake2b(parent + np.asarray(tokens, np.int64).tobytes(), digest_size=16).digest()


@dataclass
class SeqBlocks:
    """One sequence's block table and what the pool knows about its rows."""

    table: np.ndarray  # (R,) int32 block ids, -1 unused
    rows: int = 0  # block rows allocated so far (0 .. rows-1)
    hashes: list[bytes] = field(default_factory=list)  # chain hash of every full row, in order
    cached_tokens: int = 0  # leading tokens taken from the prefix cache
    root: bytes = ROOT  # the parent hash of row 0 (salted_root)


class BlockPool:
    def __init__(self, spec: KVCacheSpec, prefix_caching: bool = True):
        self.spec, self.prefix_caching = spec, prefix_caching
        self.ref = np.zeros(spec.n_blocks, np.int32)
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(spec.n_blocks))
        self.hash_of: dict[int, bytes] = {}  # block -> hash of its (full) contents
        self.block_of: dict[bytes, int] = {}  # hash -> block

    # ---- counts ------------------------------------------------------------------------------
    @property
    def n_free(self) -> int:
        return len(self.free)

    @property
    def n_used(self) -> int:
        return self.spec.n_blocks - len(self.free)

    # ---- blocks ------------------------------------------------------------------------------
    def _allocate(self) -> int | None:
        if not self.free:
            return None
        b, _ = self.free.popitem(last=False)  # least recently released
        h = self.hash_of.pop(b, None)
        if h is not None:
            del self.block_of[h]  # its old contents are about to go
        self.ref[b] = 1
        return b

    def _share(self, b: int):
        if self.ref[b] == 0:
            del self.free[b]
        self.ref[b] += 1

    def _release(self, b: int):
        self.ref[b] -= 1
        assert self.ref[b] >= 0, f"block {b} released more often than taken"
        if self.ref[b] == 0:
            self.free[b] = None
            if b not in self.hash_of:  # nothing to keep: hand it out first
                self.free.move_to_end(b, last=False)

    # ---- sequences ---------------------------------------------------------------------------
    def new_seq(self) -> SeqBlocks:
        return SeqBlocks(np.full(self.spec.ring, -1, np.int32))

    def row_hashes(self, ids: list[int], parent: bytes = ROOT, start_row: int = 0) -> list[bytes]:
        bs, out = self.spec.block_size, []
        for j in range(start_row, len(ids) // bs):
            parent = chain_hash(parent, ids[j * bs : (j + 1) * bs])
            out.append(parent)
        return out

    def _first_held(self, k: int) -> int:
        """The first of k leading rows a sequence's table holds: 0, or for a ring k - R + 1."""
        return max(0, k - self.spec.ring + 1) if self.spec.rolling else 0

    def match(
        self, ids: list[int], hashes: list[bytes] | None = None, root: bytes = ROOT
    ) -> tuple[int, list[bytes]]:
        """(k, hashes): the longest prefix of k full rows of ids[:-1] this pool can serve
        (for a ring, rows k-R+1 .. k-1 must be present), and the hashes of those rows.

        `hashes` is the sequence's own cache of its row hashes (Sequence.block_hashes): it is
        extended in place to every full row of ids[:-1], so a sequence hashes each row once
        however often it is matched. One pass over the rows: a flat table stops at the first
        miss; a ring keeps the length of the run of present rows ending at row k-1."""
        if not self.prefix_caching:
            return 0, []
        hashes = [] if hashes is None else hashes
        full = (len(ids) - 1) // self.spec.block_size
        if len(hashes) < full:
            hashes += self.row_hashes(
                ids[: full * self.spec.block_size], hashes[-1] if hashes else root, len(hashes)
            )
        best, run = 0, 0
        for k in range(1, full + 1):
            run = run + 1 if hashes[k - 1] in self.block_of else 0
            if run == 0 and not self.spec.rolling:
                break
            if run >= k - self._first_held(k):
                best = k
        return best, hashes[:best]

    def admit_cost(self, matched: tuple[int, list[bytes]], n_tokens: int) -> tuple[int, int]:
        """(hits, fresh): the free blocks a sequence of n_tokens takes when admitted with
        `matched` (match()): its hits that sit free in the pool (taking them removes them from
        the free list at once), and the fresh blocks it allocates later for the rest. Only the
        fresh ones are still owed after admission: the hits are off the free list by then."""
        k, hashes = matched
        kept = hashes[self._first_held(k) :]
        hits = sum(1 for h in kept if self.ref[self.block_of[h]] == 0)
        total = self.spec.blocks_for(n_tokens)
        return hits, total - min(len(kept), total)

    def admit(
        self, ids: list[int], matched: tuple[int, list[bytes]] | None = None, root: bytes = ROOT
    ) -> SeqBlocks:
        """A table for a sequence starting from these ids, holding its prefix-cache hits
        (`matched`: match(ids, root=root), when the caller has it)."""
        seq = self.new_seq()
        seq.root = root
        k, hashes = matched if matched is not None else self.match(ids, root=root)
        R = self.spec.ring
        for j in range(self._first_held(k), k):
            b = self.block_of[hashes[j]]
            self._share(b)
            seq.table[j % R] = b
        seq.rows, seq.hashes, seq.cached_tokens = k, hashes, k * self.spec.block_size
        return seq

    def grow(self, seq: SeqBlocks, end: int) -> bool:
        """Give seq blocks for every position below `end`. A ring's entry that comes round
        again releases its old block first. False (with the rows allocated so far kept) if
        the pool ran out."""
        R = self.spec.ring
        need = -(-end // self.spec.block_size)
        while seq.rows < need:
            e = seq.rows % R
            if seq.table[e] >= 0:
                self._release(int(seq.table[e]))
                seq.table[e] = -1
            b = self._allocate()
            if b is None:
                return False
            seq.table[e] = b
            seq.rows += 1
        return True

    def commit(self, seq: SeqBlocks, ids: list[int], n_written: int):
        """After a forward wrote K/V for ids[:n_written]: hash the rows that became full and
        offer them to later requests (an equal row already cached keeps its block)."""
        if not self.prefix_caching:
            return
        full = n_written // self.spec.block_size
        if full <= len(seq.hashes):
            return
        parent = seq.hashes[-1] if seq.hashes else seq.root
        new = self.row_hashes(ids[: full * self.spec.block_size], parent, len(seq.hashes))
        R = self.spec.ring
        for j, h in enumerate(new, start=len(seq.hashes)):
            b = int(seq.table[j % R])
            if h not in self.block_of and b not in self.hash_of:
                self.block_of[h], self.hash_of[b] = b, h
        seq.hashes += new

    def free_seq(self, seq: SeqBlocks):
        """Release every block of seq, tail first (hashed ones stay findable until reused).
        The LRU then evicts a cached chain from its end: its head, which every descendant
        needs to match, goes last (vLLM, nano-vllm)."""
        R = self.spec.ring
        for j in range(seq.rows - 1, max(seq.rows - R, 0) - 1, -1):
            e = j % R
            if seq.table[e] >= 0:
                self._release(int(seq.table[e]))
                seq.table[e] = -1
        seq.rows = 0
