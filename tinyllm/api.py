"""The Python API: LLM ties config, weights, tokenizer, model and engine together.

    llm = LLM("weights/smollm2-135m-instruct")
    llm.generate(["Once upon a time"], SamplingParams(max_tokens=32, temperature=0))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .backends import get_backend
from .config import ModelConfig
from .engine import Completion, Engine, Request
from .errors import TinyLLMError
from .model import Transformer
from .sampling import SamplingParams
from .kv_cache import resolve_kv_dtype
from .weights import available_memory, checkpoint_dtype, fmt_bytes, load_weights

DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_SEQ_LEN = 8192       # the KV-cache length when the caller names none


def resolve_model_dir(model) -> Path:
    """A path, or (through tinyllm.hub) a name, an alias or None for the embedded default."""
    from .hub import resolve_model
    return Path(resolve_model(None if model is None else str(model)))


class LLM:
    def __init__(self, model=None, backend: str = "numpy", dtype: str | None = None,
                 kv_dtype: str = "auto", max_seq_len: int | None = None, max_batch: int = 8,
                 progress: bool = False, prefill_chunk: int = 512, cuda_graph: bool = True):
        self.model_dir = resolve_model_dir(model)
        cfg = ModelConfig.load(self.model_dir)
        self.backend = get_backend(backend, dtype, checkpoint_dtype(self.model_dir))
        if hasattr(self.backend, "graphs"):      # cuda: decode steps replay CUDA graphs unless off
            self.backend.graphs.enabled = bool(cuda_graph)
        self.kv_dtype = resolve_kv_dtype(kv_dtype, self.backend.compute_dtype)
        self.max_seq_len = int(max_seq_len or min(cfg.max_position_embeddings, DEFAULT_MAX_SEQ_LEN))
        if self.max_seq_len < 2:
            raise TinyLLMError(f"max_seq_len={self.max_seq_len} is too small (need at least 2)")
        for name, v in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk)):
            if not isinstance(v, int) or v < 1:
                raise TinyLLMError(f"{name}={v!r} must be an integer >= 1")
        self.prefill_chunk = prefill_chunk
        self._check_memory(cfg, max_batch)
        self.cfg, weights = load_weights(self.model_dir, cfg, self.backend, progress=progress)
        self.weights_bytes = weights.nbytes_on_disk
        from .tokenizer import Tokenizer
        self.tokenizer = Tokenizer.load(self.model_dir)
        self.generation_defaults = self._generation_defaults()
        self.eos_token_ids = self._eos_ids()
        self.model = Transformer(self.cfg, weights, self.backend)
        self.engine = Engine(self.model, self.tokenizer, self.backend, self.eos_token_ids,
                             self.max_seq_len, self.kv_dtype, max_batch=max_batch,
                             prefill_chunk=prefill_chunk)

    # ---- setup ---------------------------------------------------------------------
    def _check_memory(self, cfg: ModelConfig, max_batch: int):
        if hasattr(self.backend, "check_fits"):  # GPU: weights (bf16) + the KV cache in free memory
            from .kv_cache import KVCacheSpec
            spec = KVCacheSpec.for_model(cfg, self.kv_dtype, self.max_seq_len, max_batch, chunk=self.prefill_chunk)
            graphs = getattr(self.backend, "graphs", None)
            graph_bytes = graphs.estimate_bytes(cfg, max_batch) if graphs is not None and graphs.enabled else 0
            self.backend.check_fits(cfg.n_params() * 2 + graph_bytes, spec.nbytes(),
                                    kv_bytes_per_token=cfg.kv_bytes_per_token(self.kv_dtype) * max_batch,
                                    max_seq_len=self.max_seq_len)
            return
        need = cfg.n_params() * 4           # float32 weights
        have = available_memory()
        if have is not None and need > have:
            raise TinyLLMError(f"the model needs {fmt_bytes(need)} of RAM in float32 and {fmt_bytes(have)} "
                               f"is available; use --backend cuda or a smaller model")

    def _read_json(self, name: str) -> dict:
        p = self.model_dir / name
        try:
            return json.loads(p.read_text()) if p.is_file() else {}
        except ValueError as e:
            raise TinyLLMError(f"cannot parse {p}: {e}") from None

    def _generation_defaults(self) -> dict:
        """Sampling defaults from generation_config.json, as transformers reads them:
        without do_sample=true, generation is greedy."""
        g = self._read_json("generation_config.json")
        d = {"max_tokens": DEFAULT_MAX_TOKENS, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
             "repetition_penalty": 1.0}
        if g.get("do_sample"):
            d["temperature"] = float(g.get("temperature", 1.0))
            d["top_p"] = float(g.get("top_p", 1.0))
            d["top_k"] = int(g.get("top_k", 50) or 0)     # transformers' GenerationConfig default
        if g.get("repetition_penalty"):
            d["repetition_penalty"] = float(g["repetition_penalty"])
        return d

    def _eos_ids(self) -> set[int]:
        """Every EOS id from generation_config.json, config.json and the tokenizer."""
        ids = set(self.cfg.eos_token_ids) | set(self.tokenizer.eos_token_ids)
        e = self._read_json("generation_config.json").get("eos_token_id")
        ids |= set(e) if isinstance(e, list) else ({e} if e is not None else set())
        return ids

    # ---- API -----------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Full-prefill logits at every position: (len(token_ids), vocab) float32."""
        return self.engine.logits(list(token_ids))

    def resolve_params(self, params: SamplingParams | None) -> SamplingParams:
        return (params or SamplingParams()).validate().with_defaults(self.generation_defaults)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def requests(self, prompts, params) -> list[Request]:
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if not all(p is None or isinstance(p, SamplingParams) for p in plist):
            raise TinyLLMError("params must be a SamplingParams, a list of them (one per prompt), or None")
        if len(plist) != len(prompts):
            raise TinyLLMError(f"{len(plist)} SamplingParams for {len(prompts)} prompts: pass one, or one per prompt")
        return [Request(self._encode(p), self.resolve_params(sp), i) for i, (p, sp) in enumerate(zip(prompts, plist))]

    def generate(self, prompts, params: SamplingParams | list | None = None,
                 progress: bool = False) -> list[Completion]:
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

    def stream(self, prompt, params: SamplingParams | None = None, slot: int | None = None,
               result: list | None = None) -> Iterator[str]:
        """Text pieces of one generation as they become certain. With `slot`, the K/V
        already in that cache slot is reused for the common prefix (chat turns). The
        Completion is appended to `result` when given."""
        req = self.requests([prompt], params)[0]
        req.slot = slot
        for ev in self.engine.run([req]):
            if ev.kind == "error":
                raise TinyLLMError(ev.error)
            if ev.kind == "text":
                yield ev.text
            elif ev.kind == "finish" and result is not None:
                result.append(ev.completion)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> Completion:
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        return self.generate([ids], params)[0]
