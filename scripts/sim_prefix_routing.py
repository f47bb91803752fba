"""How much prefix caching survives when `tinyllm serve` runs as N replicas behind a load
balancer: a replay of a chat workload through N of our own block pools (paging.BlockPool,
the exact prefix cache `serve` uses: chained 16-token block hashes, LRU eviction of free
blocks), one per replica, under several routing policies. No model runs: what is counted is
how many prompt tokens each policy serves from a replica's cache (SCALING.md).

    python scripts/sim_prefix_routing.py [--replicas 4] [--blocks 2048] [--sessions 200]

Workload (synthetic, seeded): 8 system prompts of 512 tokens; each session picks one and
runs 6 turns (48 user tokens, then a 96-token reply that the next turn's prompt contains);
the sessions' turns arrive interleaved at random. Requests run one at a time per replica
(admit the prompt, write prompt + reply, free): concurrency would only lower every policy's
hits a little (blocks held by running sequences are not evictable, nor reusable sooner).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinyllm.kv_cache import KVCacheSpec  # noqa: E402
from tinyllm.paging import BlockPool  # noqa: E402

BS = 16


def workload(n_sessions: int, seed: int = 0):
    """[(session, prompt ids, reply ids)] in arrival order."""
    rng = np.random.default_rng(seed)
    systems = [list(rng.integers(1000, 30000, 512)) for _ in range(8)]
    sessions = []
    for _ in range(n_sessions):
        history, turns = list(systems[rng.integers(8)]), []
        for _ in range(6):
            prompt = history + list(rng.integers(1000, 30000, 48))
            reply = list(rng.integers(1000, 30000, 96))
            turns.append((prompt, reply))
            history = prompt + reply
        sessions.append(turns)
    order = np.repeat(np.arange(n_sessions), 6)
    rng.shuffle(order)
    nxt = [0] * n_sessions
    out = []
    for s in order:
        out.append((int(s), *sessions[s][nxt[s]]))
        nxt[s] += 1
    return out


def new_pool(n_blocks: int, max_len: int) -> BlockPool:
    spec = KVCacheSpec(1, n_blocks, BS, -(-max_len // BS), 1, 1, "fp32", None, max_len)
    return BlockPool(spec)


def serve(pool: BlockPool, prompt: list, reply: list) -> int:
    """Run one request on a replica's pool; returns its prompt tokens found in the cache."""
    seq = pool.admit(prompt)
    full = prompt + reply
    assert pool.grow(seq, len(full)), "the pool is smaller than one request"
    pool.commit(seq, full, len(full) - 1)  # the last sampled token is never written
    cached = seq.cached_tokens
    pool.free_seq(seq)
    return cached


def h(x) -> int:
    return int.from_bytes(hashlib.blake2b(repr(x).encode(), digest_size=8).digest(), "little")


def run(policy: str, reqs, n: int, blocks: int, max_len: int) -> tuple[float, float]:
    """(fraction of prompt tokens served from a cache, busiest replica's requests / mean)."""
    pools = [new_pool(blocks, max_len) for _ in range(n)]
    load = [0] * n
    cached = total = 0
    for i, (session, prompt, reply) in enumerate(reqs):
        if policy == "round-robin":
            r = i % n
        elif policy == "session-affinity":  # sticky sessions: hash(user/session) -> replica
            r = h(session) % n
        elif policy == "first-block-hash":  # hash of the first 16 tokens (the system prompt)
            r = h(tuple(prompt[:BS])) % n
        elif policy == "longest-prefix":  # ask every replica's cache, with a load bound
            hits = [p.match(prompt)[0] for p in pools]
            mean = (sum(load) + 1) / n
            ok = [j for j in range(n) if load[j] + 1 <= 1.1 * mean + 1] or list(range(n))
            r = max(ok, key=lambda j: (hits[j], -load[j]))
        else:
            raise ValueError(policy)
        load[r] += 1
        cached += serve(pools[r], prompt, reply)
        total += len(prompt)
    return cached / total, max(load) / (sum(load) / n)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=2048, help="KV blocks per replica")
    ap.add_argument("--sessions", type=int, default=200)
    a = ap.parse_args()
    reqs = workload(a.sessions)
    max_len = max(len(p) + len(r) for _, p, r in reqs)
    print(
        f"{len(reqs)} requests, {sum(len(p) for _, p, _ in reqs):,} prompt tokens; "
        f"{a.replicas} replicas x {a.blocks} blocks of {BS} tokens"
    )
    one, _ = run("round-robin", reqs, 1, a.blocks * a.replicas, max_len)
    print(f"{'one server, the same blocks in one pool':<44} cached {one:6.1%}")
    solo, _ = run("round-robin", reqs, 1, a.blocks, max_len)
    print(f"{'one server, one replica of blocks':<44} cached {solo:6.1%}")
    for policy in ("round-robin", "session-affinity", "first-block-hash", "longest-prefix"):
        frac, imbalance = run(policy, reqs, a.replicas, a.blocks, max_len)
        print(
            f"{policy:<44} cached {frac:6.1%} ({frac / one:4.0%} of one pool); "
            f"busiest replica {imbalance:.2f}x the mean load"
        )


if __name__ == "__main__":
    main()
