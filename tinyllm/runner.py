"""The model runner: one forward of a scheduled batch on the backend, and the next tokens.

Given the scheduler's runs [(sequence, n new tokens)], it builds the ragged Batch (block
tables, start positions, lengths, open rows; backends/__init__.py), runs the forward, and
samples for every sequence whose ids are all cached after it (a prompt's last chunk, or a
decode token):

    decode-only step, backend with graphs, no host sampling  ->  the captured decode graph
                                                                 (forward + sampling on device)
    otherwise                                                ->  eager forward (B, vocab) logits
        NaN/inf rows  ->  those sequences fail ("model_error"), naming a bad weight if any
        sampling      ->  on the device (cuda: seeded by (device_seed, step), ids copied back)
                          or on the host (numpy backend, repetition penalty, a constraint:
                          the request's RNG)
        constraints   ->  each constrained sequence's token mask (constraints.py), computed
                          on a helper thread while the forward runs (`overlap_masks`), is
                          applied to its row before host sampling (disallowed -> -inf)
        logprobs      ->  host copies of the rows of requests that ask for them

What a backend can do it declares (`graphs`, `device_sampling`); nothing here probes it.
A step with a constrained sequence runs eagerly (no decode graph) and samples that sequence's
row on the host; the unconstrained rows of the same step still sample on the device, drawing
exactly what they draw without it.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .backends import Batch
from .sampling import sample, sample_rows, token_logprobs, unfiltered
from .sequence import Sequence


class ModelRunner:
    overlap_masks = True  # compute token masks on a helper thread during the forward

    def __init__(self, model, backend, cache):
        self.model, self.ops, self.cache = model, backend, cache
        self._mask_thread: ThreadPoolExecutor | None = None
        self.mask_stats = {"masks": 0, "seconds": 0.0}  # token masks computed, time in them

    def execute(self, runs: list[tuple[Sequence, int]]) -> tuple[list, list[Sequence], str]:
        """One step: ([(sequence, token, logprob, top logprobs)] for every sequence whose ids are
        all cached after it, [sequences whose logits hold NaN/inf], why they failed)."""
        ready = [(row, s) for row, (s, n) in enumerate(runs) if s.n_cached + n == len(s.ids)]
        chosen = self.graph_step(runs)
        if chosen is not None:
            return [(s, t, None, None) for (_, s), t in zip(ready, chosen)], [], ""
        masks = self.start_masks([s for _, s in ready])
        logits = self.forward(runs)
        masks = masks()
        bad = self.nonfinite_rows(logits, [r for r, _ in ready])
        failed = [s for r, s in ready if r in bad]
        why = self.nonfinite_reason() if failed else ""
        ready = [(r, s) for r, s in ready if r not in bad]
        chosen = self.sample(logits, ready, masks) if ready else []
        lps = self.logprobs(logits, ready, chosen)
        return (
            [(s, t, *lps.get(s.id, (None, None))) for (_, s), t in zip(ready, chosen)],
            failed,
            why,
        )

    def forward(self, runs: list[tuple[Sequence, int]]):
        """Eager forward of the runs: (B, vocab) logits of each run's last token, on the backend."""
        with np.errstate(
            over="ignore", invalid="ignore", divide="ignore"
        ):  # NaN/inf: checked later
            return self.model.forward(self._tokens(runs), self._batch(runs), self.cache)

    def full_logits(self, ids: list[int], pool, chunk: int) -> np.ndarray:
        """(len(ids), vocab) float32 logits at every position, prefilled `chunk` tokens at a time
        through blocks of the pool (released afterwards; full ones stay in the prefix cache) and
        the spec's logits row, which no running sequence holds."""
        from .errors import TinyLLMError
        from .sequence import pool_full_message

        spec, blocks, out = pool.spec, pool.new_seq(), []
        try:
            for s in range(0, len(ids), chunk):
                part = ids[s : s + chunk]
                if not pool.grow(blocks, s + len(part)):
                    raise TinyLLMError(pool_full_message(spec, len(ids)))
                batch = Batch(blocks.table[None], [s], [len(part)], [spec.logits_row])
                out.append(
                    self.ops.to_numpy(
                        self.model.forward(
                            np.asarray(part, np.int32), batch, self.cache, all_logits=True
                        )
                    )
                )
                pool.commit(blocks, ids, s + len(part))
        finally:
            pool.free_seq(blocks)
        return np.concatenate(out, axis=0)

    @staticmethod
    def _tokens(runs) -> np.ndarray:
        return np.concatenate(
            [np.asarray(s.ids[s.n_cached : s.n_cached + n], np.int32) for s, n in runs]
        )

    @staticmethod
    def _batch(runs) -> Batch:
        return Batch(
            np.stack([s.blocks.table for s, _ in runs]),
            [s.n_cached for s, _ in runs],
            [n for _, n in runs],
            [s.open_row for s, _ in runs],
        )

    # ---- constraints --------------------------------------------------------------------------
    def start_masks(self, seqs: list[Sequence]):
        """Start computing the token masks of the constrained sequences among `seqs` (their
        matchers hold every generated token already); returns a function giving
        {seq id: (vocab,) bool}."""
        todo = [s for s in seqs if s.constraint is not None]
        if not todo:
            return dict

        def compute() -> dict:
            t0 = time.perf_counter()
            out = {s.id: s.constraint.allowed() for s in todo}
            self.mask_stats["masks"] += len(todo)
            self.mask_stats["seconds"] += time.perf_counter() - t0
            return out

        if not self.overlap_masks:
            out = compute()
            return lambda: out
        if self._mask_thread is None:
            self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="tinyllm-masks")
        return self._mask_thread.submit(compute).result

    # ---- graphs -------------------------------------------------------------------------------
    def on_device(self, s: Sequence) -> bool:
        """s samples on the device (the host sampler does repetition penalty and constraints)."""
        return (
            self.ops.device_sampling
            and (s.req.params.repetition_penalty or 1.0) == 1.0
            and s.constraint is None
        )

    def graph_step(self, runs: list[tuple[Sequence, int]]) -> list[int] | None:
        """A step where every sequence brings one token, through the backend's captured decode
        graph: the sampled ids, or None where the backend has no graphs (or they are off), a
        sequence samples on the host, or one wants logprobs (a graph keeps its logits)."""
        seqs = [s for s, _ in runs]
        if (
            self.ops.graphs is None
            or any(n != 1 for _, n in runs)
            or not all(self.on_device(s) and s.req.params.logprobs is None for s in seqs)
        ):
            return None
        toks = self.ops.graphs.step(
            self.model, self._tokens(runs), self._batch(runs), self.cache, *device_params(seqs)
        )
        return None if toks is None else [int(t) for t in toks]

    # ---- after an eager forward ---------------------------------------------------------------
    def nonfinite_rows(self, logits, rows: list[int]) -> set[int]:
        """The rows among `rows` holding NaN or inf (one device reduction when all are finite)."""
        if not rows or bool(np.isfinite(logits).all()):  # NEP-18: on the device for cupy
            return set()
        host = np.asarray(self.ops.to_numpy(logits))
        return {r for r in rows if not np.isfinite(host[r]).all()}

    def nonfinite_reason(self) -> str:
        """The error for NaN/inf logits, naming the first weight tensor holding NaN or inf
        (one pass over the weights, only when this happens)."""
        for name, a in self.model.w.named():
            if not bool(np.isfinite(a).all()):
                return (
                    f"the model produced NaN/inf logits: weight tensor {name} holds NaN or inf "
                    f"values; the checkpoint is corrupt, re-download it"
                )
        return (
            "the model produced NaN/inf logits (its weights are finite: activations overflowed; "
            "try a wider compute dtype, e.g. --dtype bf16 instead of fp16, or --backend numpy)"
        )

    def sample(self, logits, ready: list[tuple[int, Sequence]], masks: dict) -> list[int]:
        """Next token of each ready (logits row, sequence); `masks` holds the allowed tokens of
        the constrained ones (start_masks)."""
        out: dict[int, int] = {}
        dev = [(r, s) for r, s in ready if self.on_device(s)]
        host = [(r, s) for r, s in ready if not self.on_device(s)]
        if dev:
            rows = self.ops.take_rows(logits, np.asarray([r for r, _ in dev], np.int32))
            toks = self.ops.sample(rows, *device_params([s for _, s in dev]))
            out.update({s.id: int(t) for (_, s), t in zip(dev, toks)})
        if host:
            rows = self.ops.to_numpy(
                self.ops.take_rows(logits, np.asarray([r for r, _ in host], np.int32))
            )
            plain: dict[float, list[int]] = {}  # temperature -> rows sample_rows takes together
            for i, ((_, s), row) in enumerate(zip(host, rows)):
                if s.id not in masks and unfiltered(s.req.params):
                    plain.setdefault(s.req.params.temperature or 0.0, []).append(i)
                    continue
                if s.id in masks:
                    row = np.where(masks[s.id], row, -np.inf).astype(np.float32)
                out[s.id] = sample(row, s.req.params, s.rng, np.asarray(s.ids, np.int64))
            for t, rs in plain.items():
                toks = sample_rows(rows[rs], t, [host[i][1].rng for i in rs])
                out.update({host[i][1].id: tok for i, tok in zip(rs, toks)})
        return [out[s.id] for _, s in ready]

    def logprobs(self, logits, ready: list[tuple[int, Sequence]], toks: list[int]) -> dict:
        """seq id -> (logprob of its chosen token, top alternatives), for the sequences whose
        request asks for logprobs (their rows are copied to the host)."""
        want = [(r, s, t) for (r, s), t in zip(ready, toks) if s.req.params.logprobs is not None]
        if not want:
            return {}
        rows = self.ops.to_numpy(
            self.ops.take_rows(logits, np.asarray([r for r, _, _ in want], np.int32))
        )
        return {
            s.id: token_logprobs(row, t, s.req.params.logprobs)
            for (_, s, t), row in zip(want, rows)
        }


def device_params(seqs: list[Sequence]) -> tuple[list, list, list, list, list]:
    """Per sequence: temperature, top_k, top_p, seed and RNG step of on-device sampling."""
    p = [s.req.params for s in seqs]
    return (
        [q.temperature or 0.0 for q in p],
        [q.top_k or 0 for q in p],
        [q.top_p if q.top_p is not None else 1.0 for q in p],
        [s.device_seed for s in seqs],
        [len(s.generated) for s in seqs],
    )
