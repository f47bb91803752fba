"""KV-cache quantization quality: the benchmark run, and the ablations behind BENCHMARKS.md.

python scripts/eval_kv.py [--model DIR] [--tokens 4096] [--window 1024]
    = tinyllm eval --backend numpy --kv-dtypes fp32,fp16,bf16,int8,fp8 (tinyllm/evaluate.py)
python scripts/eval_kv.py --ablate [--tokens 1024] [--window 512]
    fake-quantized caches on the numpy backend (stored values = dequantize(quantize(x)),
    bit-identical to what the int8/fp8 caches hold): K only, V only, finer scale groups,
    the outlier channel kept exact. Diagnostic only; the runtime stores one scale per
    (token, kv-head) vector as kv_cache.py defines.
python scripts/eval_kv.py --scores [--window 1024]
    per layer, on one segment: how much quantizing K moves the attention scores
    q·k/sqrt(d) and the attention output, and how large the scores are.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinyllm import cli  # noqa: E402


def fake_quant(x: np.ndarray, kv: str, group: int | None = None) -> np.ndarray:
    from tinyllm.kv_cache import dequantize, quantize

    if group is None:
        return dequantize(*quantize(x, kv))
    y = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)  # one scale per group
    return dequantize(*quantize(y, kv)).reshape(x.shape)


def fake_quant_outlier_exact(x: np.ndarray, kv: str) -> np.ndarray:
    """The largest-|x| channel of each vector kept in float32, the rest on their own scale."""
    top = np.abs(x).argmax(-1)[..., None]
    rest = x.copy()
    np.put_along_axis(rest, top, 0, -1)
    y = fake_quant(rest, kv)
    np.put_along_axis(y, top, np.take_along_axis(x, top, -1), -1)
    return y


# name -> the kv formats it applies to, and a (k, v) -> (k', v') transform for that format
ABLATIONS = {
    "K and V": (("int8", "fp8"), lambda kv: lambda k, v: (fake_quant(k, kv), fake_quant(v, kv))),
    "K only": (("int8", "fp8"), lambda kv: lambda k, v: (fake_quant(k, kv), v)),
    "V only": (("int8", "fp8"), lambda kv: lambda k, v: (k, fake_quant(v, kv))),
    "K and V, scale per 32 channels": (
        ("int8", "fp8"),
        lambda kv: lambda k, v: (fake_quant(k, kv, 32), fake_quant(v, kv, 32)),
    ),
    "K and V, scale per 16 channels": (
        ("int8", "fp8"),
        lambda kv: lambda k, v: (fake_quant(k, kv, 16), fake_quant(v, kv, 16)),
    ),
    "K outlier channel exact, V": (
        ("int8", "fp8"),
        lambda kv: lambda k, v: (fake_quant_outlier_exact(k, kv), fake_quant(v, kv)),
    ),
    "K as int8, V": (("fp8",), lambda kv: lambda k, v: (fake_quant(k, "int8"), fake_quant(v, kv))),
}


def ablate(model_dir, text: str, n_tokens: int, window: int, only: str = ""):
    from tinyllm.api import LLM
    from tinyllm.backends.numpy_backend import NumpyKVCache
    from tinyllm.evaluate import _Acc
    from tinyllm.memory import engine_for_model

    llm = LLM(str(model_dir), backend="numpy", kv_dtype="fp32", max_seq_len=window, max_batch=1)
    ids = llm.tokenizer.encode(text)
    segs = [ids[i * window : (i + 1) * window] for i in range(min(n_tokens, len(ids)) // window)]
    ref_engine = engine_for_model(
        llm.model, llm.tokenizer, llm.backend, set(), window, "fp32", max_batch=1
    )
    refs = [ref_engine.logits(s)[:-1] for s in segs]
    ref_acc = _Acc()
    for s, r in zip(segs, refs):
        ref_acc.add(r, np.asarray(s[1:]), None)
    ref_nll = ref_acc.nll / ref_acc.n

    class FakeQuantCache(NumpyKVCache):  # float32 storage holding the rounded values
        transform = None

        def write(self, layer, slot, idx, k, v):
            k, v = FakeQuantCache.transform(k, v)
            super().write(layer, slot, idx, k, v)

    print(f"{len(segs)} segments of {window} tokens; reference perplexity {np.exp(ref_nll):.4f}\n")
    print("| kv dtype | quantized | Δ ppl vs fp32 | mean KL (nats) | top-1 agree |")
    print("|---|---|---:|---:|---:|")
    real_alloc = llm.backend.alloc_kv
    for kv in ("int8", "fp8"):
        for name, (kvs, make) in ABLATIONS.items():
            if kv not in kvs or only.lower() not in name.lower():
                continue
            FakeQuantCache.transform = staticmethod(make(kv))
            llm.backend.alloc_kv = FakeQuantCache
            eng = engine_for_model(
                llm.model, llm.tokenizer, llm.backend, set(), window, "fp32", max_batch=1
            )
            acc = _Acc()
            for s, r in zip(segs, refs):
                acc.add(eng.logits(s)[:-1], np.asarray(s[1:]), r)
            llm.backend.alloc_kv = real_alloc
            dppl = 100 * (np.exp(acc.nll / acc.n - ref_nll) - 1)
            print(
                f"| {kv} | {name} | {dppl:+.3f}% | {acc.kl / acc.n:.2e} | "
                f"{100 * acc.agree / acc.n:.2f}% |",
                flush=True,
            )


def score_errors(model_dir, text: str, window: int):
    from tinyllm.api import LLM
    from tinyllm.backends.numpy_backend import softmax
    from tinyllm.memory import engine_for_model

    llm = LLM(str(model_dir), backend="numpy", kv_dtype="fp32", max_seq_len=window, max_batch=1)
    ids = llm.tokenizer.encode(text)[:window]
    cfg, queries = llm.cfg, {}
    rope_kv_write = llm.backend.rope_kv_write

    def record(q, k, v, cache, layer, batch, inv_freq):  # keep the rotated queries
        q = rope_kv_write(q, k, v, cache, layer, batch, inv_freq)
        queries.setdefault(layer, []).append(q)
        return q

    llm.backend.rope_kv_write = record
    eng = engine_for_model(
        llm.model, llm.tokenizer, llm.backend, set(), window, "fp32", max_batch=1
    )
    eng.logits(ids)
    T, scale = len(ids), 1.0 / np.sqrt(cfg.head_dim)
    causal = np.tril(np.ones((T, T), bool))
    print(
        f"{T} tokens. Per layer, over all query heads and causal (query, key) pairs: the score "
        "error"
    )
    print(
        "q·(k̂ - k)/sqrt(d) from storing K quantized (V exact), RMS and max; the attention "
        "output's worst"
    )
    print(
        "relative error over heads; the largest |score|; how often a K vector's absmax sits in the"
    )
    print("head's most frequent absmax channel.\n")
    print(
        "| layer | int8 score err rms / max | int8 out err | fp8 score err rms / max | fp8 out err "
        "| max abs score | outlier channel |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for layer in range(cfg.n_layers):
        q = np.concatenate(queries[layer])  # (T, n_heads, hd)
        k, v = eng.cache.read(layer, 0, T)  # (T, n_kv, hd), K after RoPE
        cells, smax = [], 0.0
        for kv in ("int8", "fp8"):
            kq = fake_quant(k, kv)
            rms, mx, out = [], 0.0, 0.0
            for h in range(cfg.n_heads):
                g = h // cfg.n_rep
                s = q[:, h] @ k[:, g].T * scale
                sq = q[:, h] @ kq[:, g].T * scale
                d = (sq - s)[causal]
                rms.append(np.mean(d * d))
                mx, smax = (
                    max(mx, float(np.abs(d).max())),
                    max(smax, float(np.abs(s[causal]).max())),
                )
                o = softmax(np.where(causal, s, -np.inf)) @ v[:, g]
                oq = softmax(np.where(causal, sq, -np.inf)) @ v[:, g]
                out = max(out, float(np.linalg.norm(oq - o) / np.linalg.norm(o)))
            cells += [f"{np.sqrt(np.mean(rms)):.3f} / {mx:.2f}", f"{100 * out:.1f}%"]
        top = np.abs(k).argmax(-1)  # (T, n_kv)
        share = np.mean([np.bincount(top[:, g]).max() / T for g in range(cfg.n_kv_heads)])
        print(
            f"| {layer} | " + " | ".join(cells) + f" | {smax:.1f} | {100 * share:.0f}% |",
            flush=True,
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None)
    p.add_argument("--text", default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--kv-dtypes", default="fp32,fp16,bf16,int8,fp8")
    p.add_argument(
        "--ablate", action="store_true", help="run the fake-quantization ablations instead"
    )
    p.add_argument("--scores", action="store_true", help="per-layer attention-score errors instead")
    p.add_argument(
        "--only", default="", help="with --ablate: the ablations whose name contains this"
    )
    a = p.parse_args(argv)
    if not (a.ablate or a.scores):
        args = [
            "eval",
            "--backend",
            "numpy",
            "--kv-dtypes",
            a.kv_dtypes,
            "--tokens",
            str(a.tokens or 4096),
            "--window",
            str(a.window or 1024),
        ]
        args += ["--model", a.model] if a.model else []
        args += ["--text", a.text] if a.text else []
        return cli.main(args)
    from tinyllm.api import resolve_model_dir
    from tinyllm.evaluate import default_text_files, load_text

    n, w = a.tokens or 1024, a.window or 512
    files = [Path(a.text)] if a.text else default_text_files(min_chars=5 * n)
    print(f"text: {', '.join(map(str, files))}")
    t0 = time.perf_counter()
    if a.scores:
        score_errors(resolve_model_dir(a.model), load_text(files), a.window or 1024)
    else:
        ablate(resolve_model_dir(a.model), load_text(files), n, w, a.only)
    print(f"\n[{time.perf_counter() - t0:.0f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
