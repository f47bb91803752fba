"""Decode steps as CUDA graphs: one graph per batch-size bucket, captured lazily, replayed.

A decode step (every sequence brings one token) is a few hundred small kernel launches, each
costing the host microseconds through CuPy. Captured once per bucket into a CUDA graph
(CuPy stream capture, CUPY.md §4) and replayed, the step costs the host one copy of its
inputs, one graph launch and one copy of the sampled token ids back. Prefill and mixed
prefill + decode steps stay eager (runner.py's ModelRunner.graph_step decides; this module
only runs decode steps).

Buckets: 1, 2, 4, 8, then multiples of 8 (as nano-vllm and vLLM); a batch of B runs in the
smallest bucket >= B, so the engine's max batch (it never steps more sequences) bounds the
buckets met; `estimate_bytes` sizes the memory check by that max batch.

Invariants that make a replay equal to an eager step:
  * No per-step value is a launch argument. Token ids, block tables (B, R), positions
    (= starts), the batch metadata and the sampling parameters (temperature, top-k, top-p,
    seed, RNG step) live in one static device buffer per bucket (`_Graph.inputs`), rewritten
    by one host-to-device copy before each replay; kernels read them through pointers. The
    table width R (the cache's ring) and block size are the cache's, fixed while the graphs
    live (a new cache drops them).
  * Launch geometry is the bucket's, not the step's: padding rows repeat the last real row
    (same block table, position and token: they write identical K/V bytes to the same cache
    entry, and their sampled tokens are dropped); the split-K decode grid covers the longest range a
    query can see (min(max_seq_len, capacity, window)), splits past a sequence's position
    find no keys; the RoPE tables cover every position below max_seq_len.
  * Every buffer a graph touches is allocated before its capture and stays referenced while
    the graph lives (CUDA graphs hold raw pointers). The first step of a bucket runs eagerly
    ("plan") with the backend's allocations recorded by an _Arena; the capture then takes
    the same shapes, in the same order, from one slab shared by all buckets (graphs replay
    one at a time on one stream and keep no state across steps in it). A slab that must
    grow is replaced, and the graphs cut from the old one are dropped and re-captured.
  * Only our RawKernels are captured: linears use the GEMV kernel (in row chunks of
    GEMV_MAX_M above 8 rows), since CuPy cannot capture cuBLAS (cupy/cupy#6290).
"""

from __future__ import annotations

import ctypes

import numpy as np

from ..kv_cache import DEFAULT_BLOCK_SIZE
from ..memory import CUBLAS_WORKSPACE

ALIGN = 256  # bytes: every arena buffer starts on this boundary
# The largest batch that runs as a graph (None: every bucket up to the engine's max batch).
# Above GEMV_MAX_M rows a graph's linears are GEMV row chunks (no tensor cores, weights read
# once per chunk), which a GPU may find slower than eager cuBLAS: lower this to 8 if
# scripts/bench_gpu.py's "decode graph, batch 64" row loses to its eager row.
MAX_ROWS: int | None = None


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to the first size that holds max_batch."""
    out = [1]
    while out[-1] < max_batch:
        out.append(out[-1] * 2 if out[-1] < 8 else out[-1] + 8)
    return out


def bucket_for(n: int, max_batch: int) -> int:
    return next(b for b in buckets(max_batch) if b >= n)


def _round(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class _Arena:
    """The backend's activations and workspaces during one graph step (CudaBackend._empty).
    Planning (slab None): ordinary allocations, their (shape, dtype) recorded. Capturing:
    the planned shapes again, in order, carved from the slab."""

    def __init__(self, empty=None, slab=None, plan: list | None = None):
        self.empty, self.slab, self.plan = empty, slab, plan if plan is not None else []
        self.i, self.offset = 0, 0
        self.workspaces: dict = {}
        self.keep: list = []  # other arrays the step reads (RoPE tables): kept alive

    def take(self, shape, dtype):
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if self.slab is None:
            self.plan.append((shape, dtype))
            return self.empty(shape, dtype)
        assert self.i < len(self.plan) and self.plan[self.i] == (shape, dtype), (
            "a captured decode step must allocate exactly as its planning run did"
        )
        self.i += 1
        a = self.slab[self.offset : self.offset + nbytes].view(dtype).reshape(shape)
        self.offset += _round(nbytes)
        return a

    def nbytes(self) -> int:
        return sum(_round(int(np.prod(s)) * d.itemsize) for s, d in self.plan)


class _Graph:
    """One bucket: its static inputs, its output, its graph (None until captured)."""

    # (name, dtype, count per row); int32 "meta" is CudaBatch's layout for B = T = rows.
    FIELDS = (
        ("seeds", np.uint64),
        ("tokens", np.int32),
        ("steps", np.int32),
        ("top_k", np.int32),
        ("temperature", np.float32),
        ("top_p", np.float32),
    )

    def __init__(self, backend, rows: int, max_seq_len: int, ring: int):
        from . import Batch
        from .cuda_backend import CudaBatch

        cp = backend.cp
        self.rows = rows
        # Host metadata of the worst case (every query at the last position): the launch
        # geometry computed from it (decode splits, RoPE table size) fits every step.
        worst = Batch(
            np.zeros((rows, ring), np.int32),
            np.full(rows, max_seq_len - 1, np.int32),
            np.ones(rows, np.int32),
        )
        sizes = [("meta", np.int32, CudaBatch.meta_size(rows, rows, ring))] + [
            (n, d, rows) for n, d in self.FIELDS
        ]
        offsets, o = {}, 0
        for name, dt, n in sizes:
            offsets[name] = (o, np.dtype(dt), n)
            o += -(-n * np.dtype(dt).itemsize // 16) * 16
        self.nbytes = o
        self.inputs = cp.zeros(o, np.uint8)
        self.host = np.frombuffer(cp.cuda.alloc_pinned_memory(o), np.uint8, o)
        self.d, self.h = {}, {}
        for name, (off, dt, n) in offsets.items():
            self.d[name] = self.inputs[off : off + n * dt.itemsize].view(dt)
            self.h[name] = self.host[off : off + n * dt.itemsize].view(dt)
        self.batch = CudaBatch(worst, cp)
        self.batch.bind(self.d["meta"])
        self.out = cp.zeros(rows, np.int32)
        self.graph = None
        self.slab_gen = -1

    def write(self, tokens, batch, temperature, top_k, top_p, seeds, steps) -> None:
        """Fill the pinned staging buffer with this step's inputs, padding rows repeating the
        last real row."""
        B, R = len(batch.lens), self.rows
        pad = np.minimum(np.arange(R), B - 1)
        tables, starts = batch.tables[pad], batch.starts[pad]
        ar = np.arange(R, dtype=np.int32)
        self.h["meta"][:] = np.concatenate(
            [
                tables.reshape(-1),
                starts,
                np.ones(R, np.int32),
                np.arange(R + 1, dtype=np.int32),
                starts,
                ar,
                batch.opens[pad],
            ]
        )
        self.h["tokens"][:] = np.asarray(tokens, np.int32)[pad]
        for name, v in (
            ("temperature", temperature),
            ("top_k", top_k),
            ("top_p", top_p),
            ("seeds", seeds),
            ("steps", steps),
        ):
            self.h[name][:] = np.broadcast_to(np.asarray(v, self.h[name].dtype), (B,))[pad]


class DecodeGraphs:
    """CudaBackend.graphs: decode steps through per-bucket CUDA graphs (see the module doc)."""

    def __init__(self, backend):
        self.be = backend
        self.enabled = True
        self.max_rows = MAX_ROWS
        self._graphs: dict[int, _Graph] = {}
        self._cache = None  # the KV cache the graphs were captured against
        self._slab = None
        self._slab_gen = 0
        self._stream = None
        self.stats = {"captures": 0, "replays": 0, "eager_plans": 0}
        self.off_reason = ""

    def nbytes(self) -> int:
        """Device memory the graphs hold: the shared slab and every bucket's inputs/outputs."""
        return (self._slab.nbytes if self._slab is not None else 0) + sum(
            g.nbytes + g.out.nbytes for g in self._graphs.values()
        )

    def estimate_bytes(self, cfg, max_batch: int, ring: int | None = None) -> int:
        """Upper estimate of nbytes() at max_batch, for the memory check before loading: the
        largest bucket's activations (the planning run allocates each op's output afresh,
        layer after layer), decode workspaces, logits, and the per-bucket inputs, whose block
        tables take 4 * ring bytes a row (ring: the cache's table width, KVCacheSpec.ring;
        None assumes max_position_embeddings in blocks of DEFAULT_BLOCK_SIZE)."""
        if ring is None:
            ring = -(-cfg.max_position_embeddings // DEFAULT_BLOCK_SIZE)
        rows = bucket_for(max_batch, max_batch)
        nq, nkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        per_layer = (
            2
            * rows
            * (2 * cfg.dim + nq + 2 * nkv + nq + cfg.dim + 3 * cfg.hidden_dim + 3 * cfg.dim)
        )
        # n_splits <= want + 2 with want = 4 n_sms / (rows n_kv chunks) (decode_splits), so
        # n_splits * rows * n_heads <= 4 n_sms n_rep + 2 rows n_heads
        splits = 4 * self.be.n_sms * (cfg.n_heads // cfg.n_kv_heads) + 2 * rows * cfg.n_heads
        work = splits * (cfg.head_dim + 2) * 4 + rows * nkv * 4  # + int8/fp8 rotated keys (float32)
        logits = rows * cfg.vocab_size * 4
        inputs = sum((64 + 4 * ring) * b + 4096 for b in buckets(max_batch))
        return (
            cfg.n_layers * (per_layer + 16 * ALIGN)
            + work
            + logits
            + 3 * rows * cfg.dim * 2
            + inputs
        )

    def reset(self) -> None:
        self._graphs, self._slab, self._cache = {}, None, None

    def step(
        self, model, tokens: np.ndarray, batch, cache, temperature, top_k, top_p, seeds, steps
    ):
        """Forward one token per sequence and sample each row's next token on the device
        (per row: temperature, top_k, top_p, seed, RNG step, as CudaBackend.sample). Returns
        numpy int32 token ids, or None when graphs are off (the caller runs eagerly)."""
        got = self.launch(model, tokens, batch, cache, temperature, top_k, top_p, seeds, steps)
        return None if got is None else self.result(got)

    def result(self, launched) -> np.ndarray:
        """The token ids of a launch(): copied back once the replay has run."""
        out, n = launched
        if isinstance(out, np.ndarray) and not isinstance(out, self.be.cp.ndarray):
            return out[:n]  # the planning run's ids, already on the host
        with self._stream:  # the copy back waits for the replay
            return out.get()[:n]

    def launch(self, model, tokens, batch, cache, temperature, top_k, top_p, seeds, steps):
        """step() up to the graph launch: (device or host int32 token ids, rows used), or
        None when graphs are off. A bucket's first step runs eagerly and captures (host ids)."""
        if (
            not self.enabled
            or model.cfg.dim % 8
            or model.cfg.hidden_dim % 8
            or (self.max_rows and len(batch.lens) > self.max_rows)
        ):
            return None  # (GEMV needs K % 8 == 0; cuBLAS is not capturable)
        cp = self.be.cp
        if cache is not self._cache:
            self.reset()
            self._cache = cache
        n = len(batch.lens)
        rows = bucket_for(n, n)  # (the bucket sizes do not depend on the max batch)
        g = self._graphs.get(rows)
        if g is None:
            g = self._graphs[rows] = _Graph(self.be, rows, cache.spec.max_seq_len, cache.spec.ring)
        if self._stream is None:
            self._stream = cp.cuda.Stream(non_blocking=False)  # ordered with the default stream
        g.write(tokens, batch, temperature, top_k, top_p, seeds, steps)
        with self._stream as s:
            g.inputs.data.copy_from_host_async(ctypes.c_void_p(g.host.ctypes.data), g.nbytes, s)
            if g.graph is not None and g.slab_gen == self._slab_gen:
                g.graph.launch(stream=s)
                self.stats["replays"] += 1
                return g.out, len(batch.lens)
            return self._plan_and_capture(g, model, cache, s), len(batch.lens)

    def _forward(self, g: _Graph, model, cache) -> None:
        """The captured work: forward over the bucket's rows, then sampling into g.out."""
        d = g.d
        logits = model.forward(d["tokens"], g.batch, cache)
        self.be.sample_into(
            logits, d["temperature"], d["top_k"], d["top_p"], d["seeds"], d["steps"], g.out
        )

    def _plan_and_capture(self, g: _Graph, model, cache, stream) -> np.ndarray:
        be = self.be
        be._arena = arena = _Arena(empty=be.cp.empty)
        try:  # the eager planning run: this step's tokens
            self._forward(g, model, cache)
        finally:
            be._arena = None
        out = g.out.get()
        self.stats["eager_plans"] += 1
        need = arena.nbytes()
        if self._slab is None or self._slab.nbytes < need:
            if be.free_memory() - need < CUBLAS_WORKSPACE:  # (memory.py counted estimate_bytes)
                self.enabled = False  # decode goes on eagerly
                self.off_reason = (
                    f"no GPU memory left for {need / 2**20:.0f} MiB of decode-graph buffers"
                )
                return out
            self._slab = None  # graphs cut from the old slab recapture lazily
            self._slab = be.cp.empty(_round(need), np.uint8)
            self._slab_gen += 1
        be._arena = _Arena(slab=self._slab, plan=arena.plan)
        try:
            stream.begin_capture()
            try:
                self._forward(g, model, cache)
            finally:
                graph = stream.end_capture()
            g.keep = be._arena.keep
        finally:
            be._arena = None
        g.graph, g.slab_gen = graph, self._slab_gen
        self.stats["captures"] += 1
        return out
