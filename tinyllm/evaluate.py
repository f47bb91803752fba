"""`tinyllm eval`: how much a KV-cache dtype costs in quality, on real text.

Owns the measurement only: the text (a license file found on this machine by default), the
segmentation, and the metrics per kv dtype against the reference cache (kv "fp32" on the
same backend; on numpy that is the float32 reference of the whole project):
perplexity, mean KL(reference || candidate) of the next-token distributions, max |Δlogit|
and top-1 agreement. It does not quantize anything itself (kv_cache.py does) and owns no
model code; every segment is prefilled from scratch through the engine, so attention reads
the quantized cache already during prefill, as in serving.

Study formats (`kv_formats`, numpy backend only: kv_formats.py) run through the same loop
with a fake-quantized float32 cache in place of a real one, side by side on the same tokens.

Weight formats (`--weights fp32,q8_0,q4_0,...`, `evaluate_weights`): the same metrics with the
model's matrices quantized at load (quant.py; the KV cache fp32), each against the unquantized
model on the same segments; a quant.STUDY name (e.g. `q4_k-mse`) loads its format's blocks
written by the study's quantizer instead of llama.cpp's.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import TinyLLMError
from .quant import STUDY, study_quantizer

# Real English prose that ships with the OS (Debian/Ubuntu base-files), in the order they are
# concatenated when one is too short. GPL-3 alone is ~7.6k SmolLM2 tokens.
DEFAULT_TEXTS = ("GPL-3", "GPL-2", "Apache-2.0", "LGPL-2.1", "MPL-2.0", "GFDL-1.3")
LICENSE_DIR = Path("/usr/share/common-licenses")
REFERENCE_KV = "fp32"
ROWS_PER_BLOCK = 256  # log-softmax in float64 a block of positions at a time (memory)


@dataclass
class KVRow:
    kv_dtype: str
    bytes_per_token: float  # K and V, all layers, with scales (and a KIVI format's open block)
    n_scored: int  # next-token predictions scored (window - 1 per segment)
    nll: float  # mean negative log-likelihood, nats
    ppl: float
    ppl_delta_pct: float  # 100 * (ppl / ppl_ref - 1)
    ppl_delta_se_pct: float  # its standard error from the per-token NLL differences (tokens
    # taken as independent, so a lower bound on the real noise)
    kl: float  # mean KL(P_ref || P_kv), nats
    max_abs_logit_diff: float
    top1_agree: float  # fraction of positions whose argmax equals the reference's
    seconds: float  # prefill time for all segments with this cache


def default_text_files(min_chars: int = 0) -> list[Path]:
    """License texts from /usr/share/common-licenses, as many as reach min_chars."""
    found, seen, chars = [], set(), 0
    for name in DEFAULT_TEXTS:
        p = LICENSE_DIR / name
        if not p.is_file() or p.resolve() in seen:
            continue
        seen.add(p.resolve())
        found.append(p)
        chars += p.stat().st_size
        if chars >= min_chars:
            break
    if not found:
        raise TinyLLMError(f"no default text found under {LICENSE_DIR}; pass --text FILE")
    return found


def load_text(files: list[Path]) -> str:
    try:
        return "\n\n".join(Path(f).read_text(encoding="utf-8") for f in files)
    except (OSError, UnicodeDecodeError) as e:
        raise TinyLLMError(f"cannot read the evaluation text: {e}") from None


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class _Acc:
    """Running sums of one kv dtype's metrics over all scored positions."""

    def __init__(self):
        self.nll = self.kl = 0.0
        self.dnll = self.dnll2 = 0.0  # Σ and Σ² of per-token NLL(kv) - NLL(reference)
        self.n = self.agree = 0
        self.max_diff = 0.0
        self.seconds = 0.0

    def add(self, logits: np.ndarray, targets: np.ndarray, ref: np.ndarray | None):
        """logits (L, V) predicting targets (L,); ref: the reference logits (L, V) or None."""
        for s in range(0, len(targets), ROWS_PER_BLOCK):
            blk = slice(s, s + ROWS_PER_BLOCK)
            rows = np.arange(len(targets[blk]))
            lp = log_softmax64(logits[blk])
            self.nll -= lp[rows, targets[blk]].sum()
            if ref is not None:
                lr = log_softmax64(ref[blk])
                d = lr[rows, targets[blk]] - lp[rows, targets[blk]]
                self.dnll += d.sum()
                self.dnll2 += (d * d).sum()
                self.kl += (np.exp(lr) * (lr - lp)).sum()
                self.agree += int((logits[blk].argmax(-1) == ref[blk].argmax(-1)).sum())
                self.max_diff = max(self.max_diff, float(np.abs(logits[blk] - ref[blk]).max()))
        self.n += len(targets)


def evaluate_kv(
    model_dir,
    text: str,
    n_tokens: int = 4096,
    window: int = 1024,
    kv_dtypes=("fp32", "int8", "fp8"),
    backend: str = "numpy",
    dtype: str | None = None,
    progress: bool = False,
    kv_formats=(),
    plan=None,
    drop_unfit: bool = False,
    kivi_block: int = 16,
) -> tuple[list[KVRow], dict]:
    """Perplexity and divergence from the reference cache for each kv dtype (a real cache)
    and each kv format (kv_formats.py, a fake-quantized cache on the numpy backend).

    The first n_tokens tokens of `text` are cut into non-overlapping segments of `window`
    tokens (a shorter tail is dropped); each segment is prefilled from position 0, and
    positions 0..window-2 predict tokens 1..window-1. Returns (rows, info) where info says
    how many tokens/segments were used. plan(info, seconds_per_pass) is called once the
    reference has run on the first segment (for the run-time estimate). A format that cannot
    hold this model's head_dim is an error, or with drop_unfit is left out (info["dropped"]).
    kivi_block: the token block B of the KIVI formats' key scales."""
    from .kv_cache import resolve_kv_dtype

    if window < 2:
        raise TinyLLMError(f"--window {window} is too short: a segment needs at least 2 tokens")
    if kivi_block < 1:
        raise TinyLLMError(f"--kivi-block {kivi_block}: a block holds at least 1 token")
    llm = _eval_llm(model_dir, backend, dtype, window)
    kvs = list(dict.fromkeys(resolve_kv_dtype(k, llm.backend.compute_dtype) for k in kv_dtypes))
    fmts, unfit = _study_formats(llm, kv_formats, drop_unfit)
    ids = llm.tokenizer.encode(text)
    segments = _segments(ids, n_tokens, window)
    n_seg = len(segments)
    engines = _engines(llm, kvs, fmts, window, kivi_block)
    info = {
        "model_dir": str(llm.model_dir),
        "backend": llm.backend.name,
        "text_tokens": len(ids),
        "tokens": n_seg * window,
        "segments": n_seg,
        "window": window,
        "reference": REFERENCE_KV,
        "passes": len(engines),
        "dropped": unfit,
    }
    accs = _score(segments, engines, info, plan, progress)
    ref_ppl = float(np.exp(accs[REFERENCE_KV].nll / accs[REFERENCE_KV].n))
    cfg = llm.cfg
    named = [(kv, kv, cfg.kv_bytes_per_token(kv)) for kv in kvs]
    named += [(f"format:{f}", f, _format_bytes_per_token(f, cfg, window, kivi_block)) for f in fmts]
    info["reference_ppl"] = ref_ppl
    return [_row(accs[key], name, nbytes, ref_ppl) for key, name, nbytes in named], info


def _segments(ids: list[int], n_tokens: int, window: int) -> list[list[int]]:
    """The first n_tokens of ids in non-overlapping windows (a shorter tail dropped)."""
    n_seg = min(n_tokens, len(ids)) // window
    if n_seg == 0:
        raise TinyLLMError(
            f"the text has {len(ids)} tokens, fewer than one window of {window}; "
            f"lower --window or pass a longer --text"
        )
    return [ids[i * window : (i + 1) * window] for i in range(n_seg)]


def _study_formats(llm, kv_formats, drop_unfit: bool) -> tuple[list[str], dict[str, str]]:
    """The study formats to run (numpy backend only), and those left out as unfit for this
    model's head_dim ({name: why}; an error unless drop_unfit)."""
    from .kv_formats import parse_formats, unfit_reason

    fmts = parse_formats(kv_formats)
    if fmts and llm.backend.name != "numpy":
        raise TinyLLMError(
            "--kv-formats is a study on the numpy backend; add --backend numpy "
            "(or use --kv-dtypes for the real caches on this backend)"
        )
    unfit = {f: why for f in fmts if (why := unfit_reason(f, llm.cfg.head_dim))}
    if unfit and not drop_unfit:
        raise TinyLLMError(next(iter(unfit.values())))
    return [f for f in fmts if f not in unfit], unfit


def _engines(llm, kvs: list[str], fmts: list[str], window: int, kivi_block: int) -> dict:
    """One single-sequence engine per cache: the reference and each kv dtype (real caches),
    and "format:NAME" per study format (the reference cache on a FormatBackend that
    fake-quantizes K/V; keys "format:NAME" never clash with kv dtypes)."""
    from .kv_formats import FORMATS, FormatBackend
    from .memory import engine_for_model
    from .model import Transformer

    engines = {
        kv: engine_for_model(llm.model, llm.tokenizer, llm.backend, set(), window, kv, max_batch=1)
        for kv in dict.fromkeys([REFERENCE_KV] + kvs)
    }
    for f in fmts:
        study = FormatBackend(FORMATS[f], kivi_block)
        engines[f"format:{f}"] = engine_for_model(
            Transformer(llm.cfg, llm.model.w, study),
            llm.tokenizer,
            study,
            set(),
            window,
            REFERENCE_KV,
            max_batch=1,
        )
    return engines


def _score(segments: list, engines: dict, info: dict, plan, progress: bool) -> dict:
    """Every segment through every engine (anything with .logits(ids): Engines, LLMs), the
    reference (key REFERENCE_KV) first: {engine key: _Acc}."""
    from tqdm.auto import tqdm

    accs = {kv: _Acc() for kv in engines}
    for i, seg in enumerate(
        tqdm(segments, desc="segments", unit="seg", disable=not progress, file=sys.stderr)
    ):
        targets = np.asarray(seg[1:], np.int64)
        t0 = time.perf_counter()
        ref = engines[REFERENCE_KV].logits(seg)[:-1]
        accs[REFERENCE_KV].seconds += time.perf_counter() - t0
        if i == 0 and plan is not None:
            plan(info, accs[REFERENCE_KV].seconds)
        accs[REFERENCE_KV].add(ref, targets, ref)
        for kv, eng in engines.items():
            if kv == REFERENCE_KV:
                continue
            t0 = time.perf_counter()
            lg = eng.logits(seg)[:-1]
            accs[kv].seconds += time.perf_counter() - t0
            if hasattr(eng, "cache"):
                eng.cache = None  # one candidate cache alive at a time (an Engine's)
            accs[kv].add(lg, targets, ref)
    return accs


def _format_bytes_per_token(f: str, cfg, window: int, kivi_block: int) -> float:
    from .kv_formats import FORMATS

    return FORMATS[f].bytes_per_token(
        cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, window, kivi_block
    )


def _row(a: _Acc, name: str, nbytes: float, ref_ppl: float) -> KVRow:
    """One table row from a cache's accumulated sums."""
    nll = a.nll / a.n
    ppl = float(np.exp(nll))
    mean_d = a.dnll / a.n
    se = np.sqrt(max(a.dnll2 / a.n - mean_d**2, 0.0) / max(a.n - 1, 1))
    return KVRow(
        name,
        nbytes,
        a.n,
        nll,
        ppl,
        100 * (ppl / ref_ppl - 1),
        100 * float(np.exp(mean_d) * se),
        a.kl / a.n,
        a.max_diff,
        a.agree / a.n,
        a.seconds,
    )


def evaluate_weights(
    model_dir,
    text: str,
    n_tokens: int = 2048,
    window: int = 1024,
    weights=("fp32", "q8_0", "q4_0"),
    backend: str = "numpy",
    dtype: str | None = None,
    progress: bool = False,
) -> tuple[list[KVRow], dict]:
    """Perplexity and divergence from the unquantized model for each weight format ("fp32":
    no quantization, the reference; a quant.py format given to LLM(quantization=); or a
    quant.STUDY name, whose quantizer writes its format's blocks). Segments as evaluate_kv;
    every model is loaded side by side (one quantized copy each). KVRow.bytes_per_token holds
    the bytes of the weights as held, kv_dtype the formats held (and the study name)."""
    from .backends import float_bytes
    from .memory import weights_nbytes

    if window < 2:
        raise TinyLLMError(f"--window {window} is too short: a segment needs at least 2 tokens")
    llms = _weight_llms(model_dir, weights, backend, dtype, window)
    ref_llm = llms[REFERENCE_KV]
    ids = ref_llm.tokenizer.encode(text)
    segments = _segments(ids, n_tokens, window)
    accs = _score(segments, llms, {}, None, progress)
    ref_ppl = float(np.exp(accs[REFERENCE_KV].nll / accs[REFERENCE_KV].n))
    fb = float_bytes(ref_llm.backend.name, ref_llm.cfg.torch_dtype)  # as the backend holds them
    rows = []
    for w in dict.fromkeys(weights):
        key = "fp32" if w == "float" else w
        llm = llms[key]
        held = "/".join(sorted(set(llm.weight_formats.values()))) or "fp32"
        name = held if key == "fp32" or key in held.split("/") else f"{w}: {held}"
        rows.append(_row(accs[key], name, weights_nbytes(llm.cfg, fb, llm.weight_formats), ref_ppl))
    info = {
        "model_dir": str(ref_llm.model_dir),
        "backend": ref_llm.backend.name,
        "text_tokens": len(ids),
        "tokens": len(segments) * window,
        "segments": len(segments),
        "window": window,
        "reference": "unquantized weights",
        "reference_ppl": ref_ppl,
    }
    return rows, info


def _weight_llms(model_dir, weights, backend, dtype, window) -> dict:
    """{"fp32" (the reference, REFERENCE_KV's key), each other weight name: LLM}."""
    llms = {}
    for w in dict.fromkeys(["fp32", *(w for w in weights if w != "float")]):
        with study_quantizer(w) if w in STUDY else nullcontext(None if w == "fp32" else w) as q:
            llms[w] = _eval_llm(model_dir, backend, dtype, window, q)
    return llms


def _eval_llm(model_dir, backend, dtype, window: int, quantization: str | None = None):
    """One single-sequence LLM with the reference KV cache, as every study loads it."""
    from .api import LLM

    return LLM(
        str(model_dir),
        backend=backend,
        dtype=dtype,
        kv_dtype=REFERENCE_KV,
        max_seq_len=window,
        max_batch=1,
        quantization=quantization,
    )


def format_weights_table(rows: list[KVRow]) -> str:
    lines = [
        "| weights (matrices) | weight bytes | perplexity | Δ ppl vs fp32 (± 1 s.e.) "
        "| mean KL (nats) | max abs Δlogit | top-1 agree | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.kv_dtype} | {r.bytes_per_token / 2**20:,.1f} MiB | {r.ppl:.4f} | "
            f"{r.ppl_delta_pct:+.3f}% ± {r.ppl_delta_se_pct:.3f} | {r.kl:.2e} | "
            f"{r.max_abs_logit_diff:.4f} | {100 * r.top1_agree:.2f}% | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def format_table(rows: list[KVRow]) -> str:
    lines = [
        "| kv dtype / format | bytes/token | perplexity | Δ ppl vs fp32 (± 1 s.e.) | mean KL "
        "(nats) | max abs Δlogit | top-1 agree | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.kv_dtype} | {r.bytes_per_token:,.0f} | {r.ppl:.4f} | {r.ppl_delta_pct:+.3f}% ± "
            f"{r.ppl_delta_se_pct:.3f} | "
            f"{r.kl:.2e} | {r.max_abs_logit_diff:.4f} | {100 * r.top1_agree:.2f}% | "
            f"{r.seconds:.1f} |"
        )
    return "\n".join(lines)


DEFAULT_DTYPES = "fp32,fp16,bf16,int8,fp8"  # real caches (any backend)
# On numpy: the real caches next to the anchors other runtimes ship (llama.cpp's q8_0, vLLM's
# fp8) and our previous per-token formats, as study formats on the same tokens; the fp32
# reference always runs (its perplexity is printed), so it is not listed.
DEFAULT_NUMPY_DTYPES = "bf16,int8,fp8"
DEFAULT_FORMATS = "int8-token,q8_0,fp8-token,fp8-vllm"


def _names(arg: str | None) -> list[str]:
    return [k.strip() for k in (arg or "").split(",") if k.strip()]


def run_eval(a) -> int:
    """`tinyllm eval`: print the plan, an estimate of the run time once the reference has run
    on one segment, then the markdown table."""
    from .api import resolve_model_dir
    from .backends import cuda_available

    model_dir = resolve_model_dir(a.model)
    if a.text:
        files = [Path(a.text)]
        if not files[0].is_file():
            raise TinyLLMError(f"--text {a.text}: no such file")
    else:
        # ~4 characters per token in English prose; a margin so the tokens reach --tokens.
        files = default_text_files(min_chars=5 * a.tokens)
    text = load_text(files)
    backend = getattr(a, "backend", "numpy") or "numpy"
    if getattr(a, "weights", None):
        return _run_weights(a, model_dir, files, text, backend)
    kivi_block = getattr(a, "kivi_block", 16)
    kv_dtypes, kv_formats = _names(a.kv_dtypes), _names(getattr(a, "kv_formats", None))
    defaults = a.kv_dtypes is None and getattr(a, "kv_formats", None) is None
    if defaults:
        on_numpy = backend == "numpy" or (backend == "auto" and not cuda_available())
        kv_formats = _names(DEFAULT_FORMATS) if on_numpy else []
        kv_dtypes = _names(DEFAULT_NUMPY_DTYPES if on_numpy else DEFAULT_DTYPES)
    print(
        f"plan: {a.tokens} tokens of {', '.join(str(f) for f in files)} in segments of {a.window}, "
        f"each prefilled from scratch; kv dtypes: {', '.join(kv_dtypes) or '-'}; "
        f"kv formats (numpy study): {', '.join(kv_formats) or '-'}"
        + (
            f" (KIVI key block {kivi_block} tokens)" if any("kivi" in f for f in kv_formats) else ""
        ),
        flush=True,
    )

    def plan(info, seconds):
        for why in info["dropped"].values():
            print(f"skipped: {why}", flush=True)
        total = seconds * info["passes"] * info["segments"]
        print(
            f"estimate: {info['passes']} passes x {info['segments']} segments x {seconds:.1f} s "
            f"(the reference's first segment) = about {total / 60:.1f} min",
            flush=True,
        )

    t0 = time.perf_counter()
    rows, info = evaluate_kv(
        model_dir,
        text,
        a.tokens,
        a.window,
        kv_dtypes,
        backend=backend,
        dtype=getattr(a, "dtype", None),
        progress=True,
        kv_formats=kv_formats,
        plan=plan,
        drop_unfit=defaults,
        kivi_block=kivi_block,
    )
    _print_result(a, files, info, f"kv {info['reference']}", format_table(rows), t0)
    return 0


def _print_result(a, files, info: dict, reference: str, table: str, t0: float) -> None:
    """What `tinyllm eval` prints after the run, for the KV and the weight studies alike."""
    print(f"model: {info['model_dir']}  backend: {info['backend']}")
    print(
        f"text: {', '.join(str(f) for f in files)} ({info['text_tokens']} tokens); evaluated "
        f"{info['tokens']} tokens = {info['segments']} segments of {info['window']}, each "
        f"prefilled from scratch; reference: {reference} "
        f"(perplexity {info['reference_ppl']:.4f})"
    )
    if info["tokens"] < a.tokens:
        print(
            f"note: {a.tokens} tokens were asked for; the text gave {info['tokens']} in whole "
            "windows"
        )
    print()
    print(table)
    print(f"\n[{time.perf_counter() - t0:.1f} s in all]")


def _run_weights(a, model_dir, files, text, backend) -> int:
    """`tinyllm eval --weights fp32,q8_0,...`: the weight-format table."""
    from .quant import check_format

    weights = _names(a.weights)
    for w in weights:
        if w not in ("fp32", "float", *STUDY):
            check_format(w)
    print(
        f"plan: {a.tokens} tokens of {', '.join(str(f) for f in files)} in segments of "
        f"{a.window}, each prefilled from scratch; weights: {', '.join(weights)} (KV cache fp32)",
        flush=True,
    )
    t0 = time.perf_counter()
    rows, info = evaluate_weights(
        model_dir,
        text,
        a.tokens,
        a.window,
        weights,
        backend=backend,
        dtype=getattr(a, "dtype", None),
        progress=True,
    )
    _print_result(a, files, info, info["reference"], format_weights_table(rows), t0)
    return 0
