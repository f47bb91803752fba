"""Write a random model of a real model's shape, stored quantized (weights.py's quantized
safetensors layout), tensor by tensor: nothing is ever held whole in float32.

    python scripts/make_quant_model.py OUT_DIR [--shape mistral-7b] [--format q4_0]
    python -m tinyllm info --model OUT_DIR --backend numpy --memory 16GB
    python -c "from tinyllm import LLM; print(LLM(OUT_DIR).generate([[1, 22, 333]])[0])"

The projection matrices are random *blocks* of the format (uniform codes, scales drawn so the
weights have std ~0.02), written a part at a time; the embedding table is bf16, norms are 1.
Issue 20's check: a Mistral-7B-shaped q4_0 model loads and decodes on a 24 GB machine with the
numpy backend, and its memory plan says about 4 GB of weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinyllm import quant  # noqa: E402
from tinyllm.config import ModelConfig  # noqa: E402
from tinyllm.weights import (  # noqa: E402
    SafetensorsWriter,
    expected_shapes,
    quant_metadata,
    quant_specs,
    quantizable,
)

SHAPES = {
    # Mistral-7B-v0.3: 32 layers, dim 4096, GQA 32/8, SwiGLU 14336, vocab 32768, no window
    "mistral-7b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32768,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
    ),
}


def random_quant(rng, fmt: str, shape) -> quant.QuantTensor:
    """Random parts of fmt for an (N, K) matrix: uniform codes, scales for std ~0.02."""
    n, k = shape
    parts = {}
    for part, dt, per_block in quant.GGUF_FIELDS[fmt]:
        cols = k // quant.BLOCK[fmt] * per_block
        if dt == np.float16:
            scale = {"m": -0.04, "dmin": 0.001}.get(part, 0.02 / 4.6)
            parts[part] = (scale * rng.uniform(0.5, 1.5, (n, cols))).astype(np.float16)
        elif fmt == "q6_k" and part == "scales":
            parts[part] = rng.integers(1, 64, (n, cols), dtype=np.int8)
        elif fmt == "q4_k" and part == "scales":
            parts[part] = rng.integers(0, 256, (n, cols), dtype=np.uint8) & 0x3F | 0x01
        else:
            parts[part] = rng.integers(0, 256, (n, cols), dtype=np.uint8).view(dt)
    return quant.QuantTensor(fmt, (n, k), parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--shape", default="mistral-7b", choices=sorted(SHAPES))
    p.add_argument("--format", default="q4_0", choices=quant.FORMATS)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    hf = {
        "architectures": ["MistralForCausalLM"],
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        **SHAPES[a.shape],
    }
    cfg = ModelConfig.from_hf(hf)
    shapes = expected_shapes(cfg)
    held = {n: (a.format, s) for n, s in shapes.items() if quantizable(n)}
    specs = []
    for name, shape in shapes.items():
        if name in held:
            specs += quant_specs(name, a.format, shape)
        else:
            specs.append((name, "BF16" if len(shape) == 2 else "F32", shape))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "config.json").write_text(json.dumps(hf, indent=2))
    rng = np.random.default_rng(a.seed)
    t0 = time.perf_counter()
    w = SafetensorsWriter(a.out / "model.safetensors", specs, quant_metadata(held))
    for name, shape in shapes.items():
        if name in held:
            w.write_quant(name, random_quant(rng, a.format, shape))
        elif len(shape) == 2:  # the embedding table, a slice of rows at a time would do too
            e = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
            w.write(name, e)
        else:
            w.write(name, np.ones(shape, np.float32))
    w.close()
    size = (a.out / "model.safetensors").stat().st_size
    print(f"wrote {a.out} ({size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
