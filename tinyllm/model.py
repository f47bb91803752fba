"""The transformer forward pass, written once against the backend op interface
(tinyllm/backends/__init__.py). It does not know which backend it runs on, nor how the KV
cache is laid out: `rope_kv_write` and `attention` own that.

One forward processes a ragged batch: every sequence brings a run of new tokens (a prompt
chunk or one decode token) and attends over the cache blocks its block table names.
"""

from __future__ import annotations

import numpy as np

from .backends import Batch
from .config import ModelConfig, rope_inv_freq
from .weights import LAYER_HF_NAMES, Weights


class Transformer:
    def __init__(self, cfg: ModelConfig, weights: Weights, backend):
        self.cfg, self.w, self.ops = cfg, weights, backend
        self.inv_freq = np.asarray(rope_inv_freq(cfg), np.float32)  # (head_dim/2,)
        self.scale = 1.0 / float(np.sqrt(cfg.head_dim))
        nq, nkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.splits = (nq, nq + nkv)  # q | k | v columns of a fused qkv
        if backend.fused_projections:
            self._fuse_projections()

    def _fuse_projections(self):
        """One weight for q, k, v (and one bias) and one for gate, up: a decode step then
        reads each with a single GEMV launch. The separate names become row views. A group
        whose weights are held in different formats (a Q4_K_M file keeps some v_proj in
        q6_k next to q4_k q/k) is not fused: its matrices stay separate."""

        def one_format(i, attrs) -> bool:
            fmts = {self.w.formats.get(f"model.layers.{i}.{LAYER_HF_NAMES[a]}") for a in attrs}
            return len(fmts) == 1  # all float (None) or all one quant format

        for i, L in enumerate(self.w.layers):
            if L.wqkv is not None or L.w13 is not None:  # (weights shared with another model)
                continue
            if one_format(i, ("wq", "wk", "wv")):
                L.wqkv, (L.wq, L.wk, L.wv) = self.ops.concat_rows([L.wq, L.wk, L.wv])
                if L.bq is not None:
                    L.bqkv, (L.bq, L.bk, L.bv) = self.ops.concat_rows([L.bq, L.bk, L.bv])
            if one_format(i, ("w1", "w3")):
                L.w13, (L.w1, L.w3) = self.ops.concat_rows([L.w1, L.w3])

    def forward(self, tokens: np.ndarray, batch: Batch, cache, all_logits: bool = False):
        """tokens (T,) int32 for batch (see Batch) -> logits (B, vocab) of each sequence's
        last token, or (T, vocab) with all_logits. Writes the new K/V into `cache`."""
        ops, cfg, w = self.ops, self.cfg, self.w
        T, eps = len(tokens), cfg.norm_eps
        b = ops.prepare(batch)

        x = ops.embed(w.embed, tokens)  # (T, dim)
        h = ops.rms_norm(x, w.layers[0].attn_norm, eps)  # h = RMSNorm(x) · g
        for i, L in enumerate(w.layers):
            # Attention: q, k, v projections (Qwen2 adds biases).
            if L.wqkv is not None:  # fused: column views
                qkv = ops.linear(h, L.wqkv, L.bqkv)
                q, k, v = (
                    qkv[:, : self.splits[0]],
                    qkv[:, self.splits[0] : self.splits[1]],
                    qkv[:, self.splits[1] :],
                )
            else:
                q, k, v = (
                    ops.linear(h, L.wq, L.bq),
                    ops.linear(h, L.wk, L.bk),
                    ops.linear(h, L.wv, L.bv),
                )
            q = q.reshape(T, cfg.n_heads, cfg.head_dim)
            k = k.reshape(T, cfg.n_kv_heads, cfg.head_dim)
            v = v.reshape(T, cfg.n_kv_heads, cfg.head_dim)
            # RoPE on q and k; k and v go into the cache (keys stored after rotation).
            q = ops.rope_kv_write(q, k, v, cache, i, b, self.inv_freq)
            # a = softmax(q kᵀ / sqrt(d) + causal/window mask) v, GQA over the cache.
            a = ops.attention(q, cache, i, b, self.scale)  # (T, n_heads*head_dim)
            # x = x + wo·a ; h = RMSNorm(x) · g_ffn
            x, h = ops.add_rms_norm(x, ops.linear(a, L.wo), L.ffn_norm, eps)
            # SwiGLU MLP: w2(silu(w1 h) * w3 h)
            if L.w13 is not None:  # fused gate | up
                gu = ops.linear(h, L.w13)
                gate, up = gu[:, : cfg.hidden_dim], gu[:, cfg.hidden_dim :]
            else:
                gate, up = ops.linear(h, L.w1), ops.linear(h, L.w3)
            m = ops.linear(ops.silu_mul(gate, up), L.w2)
            # x = x + m ; h = RMSNorm(x) with the next layer's gain (the final norm after the last)
            g = w.layers[i + 1].attn_norm if i + 1 < len(w.layers) else w.norm
            x, h = ops.add_rms_norm(x, m, g, eps)
        if not all_logits and T != len(batch.lens):  # (one token each: h is (B, dim))
            h = ops.take_rows(h, batch.last_rows)  # (B, dim)
        return ops.linear(h, w.lm_head)  # logits = h · Eᵀ
