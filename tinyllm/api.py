"""The Python API: LLM ties config, weights, tokenizer, model and engine together.

llm = LLM("weights/smollm2-135m-instruct")
llm.generate(["Once upon a time"], SamplingParams(max_tokens=32, temperature=0))
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from . import memory
from .backends import get_backend
from .config import ModelConfig
from .engine import Completion, Engine, Request
from .errors import TinyLLMError
from .jsonfile import JsonObject
from .kv_cache import DEFAULT_BLOCK_SIZE, resolve_kv_dtype
from .model import Transformer
from .sampling import SamplingParams
from .weights import (
    available_memory,
    check_backend_formats,
    checkpoint_dtype,
    detect_config,
    load_weights,
    open_checkpoint,
    planned_formats,
)

DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_SEQ_LEN = 8192  # the KV-cache length when the caller names none


def resolve_model_dir(model) -> Path:
    """A path, or (through tinyllm.hub) a name, an alias or None for the embedded default."""
    from .hub import resolve_model

    return Path(resolve_model(None if model is None else str(model)))


def _check_sizes(max_seq_len, max_batch, prefill_chunk, block_size):
    """Each given size is an int >= 1 (a bool is not)."""
    for name, v in (
        ("max_seq_len", max_seq_len),
        ("max_batch", max_batch),
        ("prefill_chunk", prefill_chunk),
        ("block_size", block_size),
    ):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise TinyLLMError(f"{name}={v!r} must be an integer >= 1")


def default_context(cfg: ModelConfig, max_seq_len: int | None) -> int:
    """The KV-cache length: max_seq_len, else the model's, at most DEFAULT_MAX_SEQ_LEN."""
    return max_seq_len or min(cfg.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)


def _context(cfg: ModelConfig, max_seq_len: int | None) -> int:
    """default_context, checked (>= 2) and warned about past the trained length."""
    n = default_context(cfg, max_seq_len)
    if n < 2:
        raise TinyLLMError(f"max_seq_len={n} is too small (need at least 2)")
    if n > cfg.max_position_embeddings:
        # as llama.cpp: allowed, but positions past the trained length are out of distribution
        warnings.warn(
            f"the context {n} exceeds the {cfg.max_position_embeddings} tokens "
            "this "
            f"model was trained on (max_position_embeddings); output past that may degrade",
            ContextWarning,
            stacklevel=3,  # LLM(...)'s caller
        )
    return n


class LLM:
    """A loaded model ready to generate. `threads` sets the BLAS threads of this process
    and the cpu backend's numba threads (see threads.py for the default)."""

    def __init__(
        self,
        model=None,
        backend: str = "numpy",
        dtype: str | None = None,
        kv_dtype: str = "auto",
        max_seq_len: int | None = None,
        max_batch: int = 8,
        progress: bool = False,
        prefill_chunk: int = 512,
        threads: int | None = None,
        cuda_graph: bool = True,
        kv_cache_memory: int | str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        enable_prefix_caching: bool = True,
        quantization: str | None = None,
    ):
        from .threads import set_threads

        self.threads = set_threads(threads)
        self.model_dir = resolve_model_dir(model)
        if quantization is not None:
            from .quant import check_format

            check_format(quantization)
        self.quantization = quantization
        cfg = ModelConfig.load(self.model_dir)
        self.backend = get_backend(
            backend, dtype, checkpoint_dtype(self.model_dir), threads=self.threads
        )
        if self.backend.graphs is not None:  # cuda: decode steps replay CUDA graphs unless off
            self.backend.graphs.enabled = bool(cuda_graph)
        self.kv_dtype = resolve_kv_dtype(kv_dtype, self.backend.compute_dtype)
        _check_sizes(max_seq_len, max_batch, prefill_chunk, block_size)
        self.max_seq_len = _context(cfg, max_seq_len)
        self.prefill_chunk, self.block_size = prefill_chunk, block_size
        # The memory plan (memory.py), decided once: the pool's blocks, checked before loading.
        self.n_blocks = memory.budget_blocks(self.kv_spec(cfg, max_batch, 1), kv_cache_memory)
        # Which weights are held quantized (stored so, or --quantize): the plan counts them so.
        index = open_checkpoint(self.model_dir)
        self.weight_formats = planned_formats(
            detect_config(cfg, index), quantization, index.formats()
        )
        check_backend_formats(self.backend, self.weight_formats)
        self._check_memory(cfg, max_batch)
        self._load(cfg, progress)
        if self.backend.device_memory and self.n_blocks is None:  # GPU: from a measured warm-up
            full = self.kv_spec(self.cfg, max_batch)
            working = memory.measure_working(
                self.backend, self.model, full, prefill_chunk, max_batch
            )
            self.n_blocks = memory.gpu_pool_blocks(
                self.backend, full, working, self._graph_bytes(self.cfg, max_batch)
            )
        self.engine = Engine(
            self.model,
            self.tokenizer,
            self.backend,
            self.eos_token_ids,
            self.kv_spec(self.cfg, max_batch, self.n_blocks),
            max_batch=max_batch,
            prefill_chunk=prefill_chunk,
            prefix_caching=bool(enable_prefix_caching),
        )

    def _load(self, cfg: ModelConfig, progress: bool):
        """Weights (quantized at load as planned), tokenizer, generation defaults, the model."""
        from .tokenizer import Tokenizer

        self.cfg, weights = load_weights(
            self.model_dir, cfg, self.backend, progress=progress, quantization=self.quantization
        )
        self.weights_bytes = weights.nbytes_on_disk
        # A checkpoint without tokenizer files still runs on token ids (vLLM's skip_tokenizer_init).
        self.tokenizer = (
            Tokenizer.load(self.model_dir) if Tokenizer.present(self.model_dir) else None
        )
        self.generation_defaults = self._generation_defaults()
        self.eos_token_ids = self._eos_ids()
        self.model = Transformer(self.cfg, weights, self.backend)

    # ---- setup ---------------------------------------------------------------------
    def kv_spec(self, cfg: ModelConfig, max_batch: int, n_blocks: int | None = None):
        from .kv_cache import KVCacheSpec

        return KVCacheSpec.for_model(
            cfg,
            self.kv_dtype,
            self.max_seq_len,
            max_batch,
            chunk=self.prefill_chunk,
            block_size=self.block_size,
            n_blocks=n_blocks,
        )

    def _graph_bytes(self, cfg: ModelConfig, max_batch: int) -> int:
        """Device memory the captured decode graphs will hold (0 without graphs)."""
        graphs = self.backend.graphs
        if graphs is None or not graphs.enabled:
            return 0
        return graphs.estimate_bytes(cfg, max_batch, self.kv_spec(cfg, max_batch).ring)

    def _check_memory(self, cfg: ModelConfig, max_batch: int):
        """Weights + KV cache + working memory must fit before anything large is allocated."""
        if self.backend.device_memory:
            memory.check_gpu_fits(
                self.backend,
                cfg,
                lambda b, n: self.kv_spec(cfg, b, n),
                max_batch,
                self.n_blocks,
                self.prefill_chunk,
                lambda b: self._graph_bytes(cfg, b),
                self.weight_formats,
            )
        else:
            memory.check_host_fits(
                cfg,
                self.kv_dtype,
                self.max_seq_len,
                max_batch,
                self.prefill_chunk,
                available_memory(),
                self.block_size,
                self.n_blocks,
                self.weight_formats,
                self.backend.float_bytes(cfg.torch_dtype),
            )

    def need_tokenizer(self, what: str):
        """The tokenizer, or a TinyLLMError saying that `what` needs one."""
        if self.tokenizer is None:
            raise TinyLLMError(
                f"{what} needs a tokenizer and {self.model_dir} has none (no tokenizer.json or "
                f"tokenizer.model.v1/v2/v3); pass token ids instead"
            )
        return self.tokenizer

    def _generation_config(self) -> JsonObject:
        p = self.model_dir / "generation_config.json"
        return JsonObject.read(p) if p.is_file() else JsonObject({}, p.name)

    def _generation_defaults(self) -> dict:
        """Sampling defaults from generation_config.json, as transformers reads them:
        without do_sample=true, generation is greedy. Every value is range-checked."""
        g = self._generation_config()
        d = {
            "max_tokens": DEFAULT_MAX_TOKENS,
            "temperature": 0.0,
            "top_p": 1.0,
            "top_k": 0,
            "repetition_penalty": 1.0,
        }
        sampled = {
            "temperature": g.number("temperature", 1.0, positive=False, lo=0),
            "top_p": g.number("top_p", 1.0, hi=1.0),
            "top_k": g.int("top_k", 50, lo=0),
        }  # transformers' GenerationConfig defaults
        if g.bool("do_sample", False):
            d.update(sampled)
        d["repetition_penalty"] = g.number("repetition_penalty", 1.0)
        return d

    def _eos_ids(self) -> set[int]:
        """Every EOS id from generation_config.json, config.json and the tokenizer."""
        tok_ids = set(self.tokenizer.eos_token_ids) if self.tokenizer is not None else set()
        return (
            set(self.cfg.eos_token_ids)
            | tok_ids
            | set(self._generation_config().token_ids("eos_token_id"))
        )

    # ---- API -----------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Full-prefill logits at every position: (len(token_ids), vocab) float32."""
        return self.engine.logits(_token_ids(token_ids, "token_ids"))

    def resolve_params(self, params: SamplingParams | None) -> SamplingParams:
        if params is not None and not isinstance(params, SamplingParams):
            raise TinyLLMError(
                f"params must be a SamplingParams or None, not {type(params).__name__}"
            )
        p = (params or SamplingParams()).validate().with_defaults(self.generation_defaults)
        if p.stop and self.tokenizer is None:
            self.need_tokenizer("a stop string")
        if p.constrained:  # an invalid schema, regex or grammar fails here, naming what is wrong
            self.need_tokenizer("a json_schema, regex, grammar or json_object constraint")
            self.engine.constraints.check(p)
        return p

    def _encode(self, prompt, i: int) -> list[int]:
        if isinstance(prompt, str):
            return self.need_tokenizer("a text prompt").encode(prompt)
        return _token_ids(prompt, f"prompt {i}")

    def requests(self, prompts, params) -> list[Request]:
        """One Request per prompt. `prompts` is a str, a list of token ids, or a list of those."""
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and len(prompts) and _is_token(prompts[0])
        ):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TinyLLMError(
                f"prompts must be a str, a list of token ids, or a list of those; "
                f"got {type(prompts).__name__}" + _BYTES_HINT.get(type(prompts), "")
            )
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if not all(p is None or isinstance(p, SamplingParams) for p in plist):
            raise TinyLLMError(
                "params must be a SamplingParams, a list of them (one per prompt), or None"
            )
        if len(plist) != len(prompts):
            raise TinyLLMError(
                f"{len(plist)} SamplingParams for {len(prompts)} prompts: pass one, or one per "
                "prompt"
            )
        return [
            Request(self._encode(p, i), self.resolve_params(sp), i)
            for i, (p, sp) in enumerate(zip(prompts, plist))
        ]

    def generate(
        self, prompts, params: SamplingParams | list | None = None, progress: bool = False
    ) -> list[Completion]:
        """Continuous-batched generation; results in input order. A prompt is a str or a
        list of token ids. A prompt that cannot run raises TinyLLMError."""
        reqs = self.requests(prompts, params)
        out: list[Completion | None] = [None] * len(reqs)
        from tqdm.auto import tqdm

        with tqdm(total=len(reqs), desc="generating", unit="req", disable=not progress) as bar:
            for ev in self.engine.run(reqs):
                if ev.kind == "error":
                    raise TinyLLMError(f"prompt {ev.index}: {ev.error}")
                if ev.kind == "finish":
                    out[ev.index] = ev.completion
                    bar.update(1)
        return out  # type: ignore[return-value]

    def stream(
        self, prompt, params: SamplingParams | None = None, result: list | None = None
    ) -> Iterator[str]:
        """Text pieces of one generation as they become certain (full blocks of K/V that an
        earlier request computed for the same leading tokens come from the prefix cache:
        chat turns). The Completion is appended to `result` when given."""
        req, ids = self.requests([prompt], params)[0], []
        run = self.engine.run([req], added=ids.append)  # (held: closing it aborts the request)
        try:
            for ev in run:
                if ev.kind == "error":
                    raise TinyLLMError(ev.error)
                if ev.kind == "text":
                    yield ev.text
                elif ev.kind == "finish" and result is not None:
                    result.append(ev.completion)
        except (GeneratorExit, KeyboardInterrupt):  # stopped early: Ctrl-C here or in the consumer
            c = self.engine.partial(ids[0]) if result is not None and ids else None
            if c is not None:  # what was generated so far, finish "interrupted"
                result.append(c)
            raise
        finally:
            run.close()

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> Completion:
        """One assistant reply to `messages` ([{"role": str, "content": str}, ...])."""
        from .tokenizer import check_messages

        ids = self.need_tokenizer("chat").encode_chat(
            check_messages(messages), add_generation_prompt=True
        )
        return self.generate([ids], params)[0]


class ContextWarning(UserWarning):
    """The context asked for is longer than the model was trained on."""


_BYTES_HINT = {bytes: " (decode bytes to str first)", bytearray: " (decode bytes to str first)"}


def _is_token(t) -> bool:
    return isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_))


def _token_ids(ids, what: str) -> list[int]:
    """A list of token ids (ints or numpy integers; not bools, floats or None)."""
    if isinstance(ids, np.ndarray):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)) or not all(_is_token(t) for t in ids):
        kind = (
            type(ids).__name__
            if not isinstance(ids, (list, tuple))
            else "a list holding "
            + ", ".join(sorted({type(t).__name__ for t in ids if not _is_token(t)}))
        )
        raise TinyLLMError(
            f"{what} must be a str or a list of integer token ids, not {kind}"
            + _BYTES_HINT.get(type(ids), "")
        )
    return [int(t) for t in ids]
