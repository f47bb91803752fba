"""A Qwen2-family stand-in for the KV-format study: a Llama checkpoint re-labelled as Qwen2
(q/k/v biases) with large k_proj biases planted in its lowest-frequency RoPE channels.

    python scripts/plant_qwen2_biases.py --src weights/smollm2-135m-instruct \
        --out /tmp/qwen2-planted [--factors 100,300]

No Qwen2 checkpoint can be downloaded here, so this plants what makes Qwen2 keys hard to
quantize: a few channels of every key that are orders of magnitude larger than the rest,
put there by k_proj biases. For each layer and kv head, channel D/2 - 1 - i (i = 0, 1, ...)
gets the bias factors[i] * rms, where rms is the root-mean-square of that layer's key channels
estimated from the weights (sqrt of mean_c sum_i (W_k[c, i] * g_i)^2, g the attention-norm gain:
a unit-variance normalized input). The lowest-frequency RoPE pairs barely rotate over a few
thousand positions, so the bias adds a nearly constant q·b to every score of a query, which
softmax ignores: the float32 model stays (almost) the same language model, while a per-token
quantizer must spend its range on these channels. q and v biases are zero. The model is a
synthetic stand-in, not Qwen2's weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def plant(src: Path, out: Path, factors: list[float]) -> Path:
    cfg = json.loads((src / "config.json").read_text())
    n_layers, n_kv = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    n_q = cfg["num_attention_heads"] * d
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    w = load_file(str(src / "model.safetensors"))
    for layer in range(n_layers):
        p = f"model.layers.{layer}."
        wk, g = w[p + "self_attn.k_proj.weight"], w[p + "input_layernorm.weight"]
        rms = float(np.sqrt(np.mean(np.sum((wk * g[None, :]) ** 2, axis=1))))
        bk = np.zeros(n_kv * d, np.float32)
        for h in range(n_kv):
            for i, fac in enumerate(factors):
                bk[h * d + d // 2 - 1 - i] = fac * rms
        w[p + "self_attn.k_proj.bias"] = bk
        w[p + "self_attn.q_proj.bias"] = np.zeros(n_q, np.float32)
        w[p + "self_attn.v_proj.bias"] = np.zeros(n_kv * d, np.float32)
    save_file(w, str(out / "model.safetensors"))
    cfg.update(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        attention_bias=True,
        use_sliding_window=False,
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="a Llama-architecture HF checkpoint directory")
    ap.add_argument("--out", required=True, help="where to write the Qwen2-architecture copy")
    ap.add_argument(
        "--factors", default="100,300", help="bias / key rms, one planted channel per factor"
    )
    a = ap.parse_args(argv)
    out = plant(Path(a.src), Path(a.out), [float(x) for x in a.factors.split(",")])
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
