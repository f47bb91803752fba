"""GGUF -> HF conversion (tinyllm/gguf_convert.py), checked against independent readers of
the same files: transformers' GGUF loader (config, dequantized + un-permuted tensors,
tokenizer, logits), the gguf package's quantizers, transformers' own torch dequantizers,
sentencepiece itself, and torch's bfloat16 rounding. Synthetic GGUFs are written here with
gguf.GGUFWriter, q/k rows permuted the way llama.cpp's convert_hf_to_gguf does."""

from __future__ import annotations

import io
import json
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from safetensors.numpy import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from tinyllm import gguf_convert  # noqa: E402
from tinyllm.config import ModelConfig  # noqa: E402
from tinyllm.errors import TinyLLMError  # noqa: E402
from tinyllm.gguf_convert import convert_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType

# Text that exercises every branch of the pre-tokenizer regexes and byte-level fallbacks.
CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's, we've, they'll, I'd, she'S DON'T.",
    "In 2024, 365 days passed; π≈3.14159, 1,234,567.89 and 0x1F are numbers. Call 555-0100!",
    "   leading spaces and    runs   \n\n\n\ttabs\t\there  \r\n windows line\r\nend   ",
    "café naïve résumé Ångström Ærø straße ﬁnance",
    "e\u0301 combining acute vs \u00e9 precomposed",
    "日本語のテキストです。中文字符和标点符号！한국어 텍스트",
    "emoji 🎉🚀👍🏽 family 👨‍👩‍👧 flags 🇫🇷 done",
    "def f(x):\n    return x**2  # square\n\nclass A:\n\tpass\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text right after a special token<|im_end|>",
    "URL: https://example.com/path?q=1&r=2 and email a.b@c.de",
    "x" * 60 + " " + "ab" * 30,
    "",
    " ",
    "\n",
    "🙂",
]


def bytes_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [bytes_to_unicode()[b] for b in range(256)]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows (HF rotate-half -> interleaved):
    rows grouped (head, half, j) are stored (head, j, half)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# byte offsets of the fp16 scale fields in one block, per llama.cpp's block_* structs; random
# blocks get sane scales there (random bytes elsewhere are valid quants)
F16_FIELDS = {
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "IQ4_NL": (0,),
    "IQ4_XS": (0,),
}
QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # gguf.quants.quantize implements these


def random_blocks(rng, rows: int, cols: int, qtype: str) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[Q[qtype]]
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for off in F16_FIELDS.get(qtype, ()):
        scale = rng.uniform(0.0005, 0.01, size=(rows, cols // block)) * rng.choice(
            [-1, 1], (rows, cols // block)
        )
        data[:, :, off : off + 2] = scale.astype(np.float16)[..., None].view(np.uint8)
    return data.reshape(rows, -1)


def byte_vocab() -> dict:
    """A tiny byte-level BPE vocabulary (gpt2 style) with three control tokens."""
    alpha = bytes_alphabet()
    merged = ["Ġt", "he", "Ġthe", "in", "Ġin"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + alpha + merged
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ in"]
    return dict(
        model="gpt2",
        pre="default",
        tokens=tokens,
        types=[3, 3, 3] + [1] * (len(tokens) - 3),
        merges=merges,
        bos=1,
        eos=2,
        unk=None,
        pad=2,
        add_bos=False,
        template="{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% "
        "endfor %}",
    )


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    qtype: str = "F32",
    name: str = "tiny",
    vocab: dict | None = None,
    n_layers: int = 2,
    dim: int = 256,
    ffn: int = 512,
    n_heads: int = 4,
    n_kv: int = 2,
    tie: bool = False,
    bias: bool | None = None,
    theta: float = 10000.0,
    extra=None,
    seed: int = 0,
    overrides: dict[str, str] | None = None,
) -> dict:
    """Write a random llama/qwen2 GGUF the way llama.cpp lays one out. 2-D weights get `qtype`,
    norms and biases F32. Returns the HF-layout float32 source tensors (None for tensors whose
    bytes are random blocks, which have no float source)."""
    rng = np.random.default_rng(seed)
    qtype_all = qtype
    vocab = vocab or byte_vocab()
    V = len(vocab["tokens"])
    hd = dim // n_heads
    bias = (arch == "qwen2") if bias is None else bias
    src: dict[str, np.ndarray | None] = {}
    gnames: dict[str, str] = {}

    def add(hf: str, gg: str, shape):
        src[hf] = (rng.standard_normal(shape) * (0.05 if len(shape) == 2 else 1.0)).astype(
            np.float32
        )
        if len(shape) == 1 and hf.endswith("layernorm.weight") or hf == "model.norm.weight":
            src[hf] = 1.0 + 0.1 * src[hf]
        gnames[hf] = gg

    add("model.embed_tokens.weight", "token_embd.weight", (V, dim))
    for i in range(n_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(p + "input_layernorm.weight", b + "attn_norm.weight", (dim,))
        add(p + "self_attn.q_proj.weight", b + "attn_q.weight", (n_heads * hd, dim))
        add(p + "self_attn.k_proj.weight", b + "attn_k.weight", (n_kv * hd, dim))
        add(p + "self_attn.v_proj.weight", b + "attn_v.weight", (n_kv * hd, dim))
        if bias:
            add(p + "self_attn.q_proj.bias", b + "attn_q.bias", (n_heads * hd,))
            add(p + "self_attn.k_proj.bias", b + "attn_k.bias", (n_kv * hd,))
            add(p + "self_attn.v_proj.bias", b + "attn_v.bias", (n_kv * hd,))
        add(p + "self_attn.o_proj.weight", b + "attn_output.weight", (dim, n_heads * hd))
        add(p + "post_attention_layernorm.weight", b + "ffn_norm.weight", (dim,))
        add(p + "mlp.gate_proj.weight", b + "ffn_gate.weight", (ffn, dim))
        add(p + "mlp.up_proj.weight", b + "ffn_up.weight", (ffn, dim))
        add(p + "mlp.down_proj.weight", b + "ffn_down.weight", (dim, ffn))
    add("model.norm.weight", "output_norm.weight", (dim,))
    if not tie:
        add("lm_head.weight", "output.weight", (V, dim))

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(n_layers)
    w.add_context_length(512)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-6 if arch == "qwen2" else 1e-5)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(V)
    w.add_tokenizer_model(vocab["model"])
    if vocab.get("pre"):
        w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if vocab.get("merges") is not None:
        w.add_token_merges(vocab["merges"])
    if vocab.get("scores") is not None:
        w.add_token_scores(vocab["scores"])
    for key in ("bos", "eos", "unk", "pad"):
        if vocab.get(key) is not None:
            getattr(w, f"add_{key}_token_id")(vocab[key])
    w.add_add_bos_token(vocab["add_bos"])
    if "add_space_prefix" in vocab:
        w.add_add_space_prefix(vocab["add_space_prefix"])
    if vocab.get("template"):
        w.add_chat_template(vocab["template"])
    if extra:
        extra(w, src)

    for hf, gg in gnames.items():
        x = src[hf]
        qtype = (overrides or {}).get(gg, qtype_all)
        if arch == "llama" and ("attn_q." in gg or "attn_k." in gg):
            x = llama_cpp_permute(x, n_heads if "attn_q." in gg else n_kv)
        if x.ndim == 1 or qtype == "F32":
            w.add_tensor(gg, x)
        elif qtype == "F16":
            w.add_tensor(gg, x.astype(np.float16))
        elif qtype in ("BF16",) + QUANTIZABLE:
            w.add_tensor(gg, gguf.quants.quantize(x, Q[qtype]), raw_dtype=Q[qtype])
        else:
            w.add_tensor(gg, random_blocks(rng, x.shape[0], x.shape[1], qtype), raw_dtype=Q[qtype])
            src[hf] = None
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return src


def transformers_state_dict(path: Path) -> dict[str, np.ndarray]:
    """transformers' own reading of a GGUF: dequantized, q/k reverse-permuted, float32."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return {k: v.detach().numpy() for k, v in m.state_dict().items()}


def transformers_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def converted_tensors(d: Path) -> dict[str, np.ndarray]:
    """safetensors -> float32 arrays (bf16 widened), plus each tensor's stored dtype."""
    header_len = int.from_bytes((d / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((d / "model.safetensors").read_bytes()[8 : 8 + header_len])
    out = {}
    with (d / "model.safetensors").open("rb") as f:
        blob = f.read()[8 + header_len :]
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        dt = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[info["dtype"]]
        arr = np.frombuffer(blob[a:b], dtype=dt).reshape(info["shape"])
        out[name] = (arr, info["dtype"])
    return out


def widen(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


# ---- the real model: SmolLM2-135M-Instruct Q4_1 ------------------------------------------


@pytest.fixture(scope="session")
def smollm2_converted(tmp_path_factory, smollm2_gguf_path) -> Path:
    t0 = time.perf_counter()
    d = convert_gguf(smollm2_gguf_path, tmp_path_factory.mktemp("conv") / "smollm2", progress=False)
    print(
        f"\n[test_gguf] SmolLM2-135M Q4_1 GGUF converted in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    return d


def test_smollm2_config_matches_transformers(smollm2_converted, smollm2_hf):
    cfg = json.loads((smollm2_converted / "config.json").read_text())
    ref = smollm2_hf[1].config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == ref.model_type
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert cfg["rope_theta"] == pytest.approx(ref.rope_parameters["rope_theta"])
    assert cfg["rope_scaling"] is None and ref.rope_parameters["rope_type"] == "default"
    assert cfg["torch_dtype"] == "float32"
    mc = ModelConfig.load(smollm2_converted)  # and tinyllm reads it
    assert (mc.arch, mc.dim, mc.n_heads, mc.n_kv_heads, mc.head_dim, mc.tie_embeddings) == (
        "llama",
        ref.hidden_size,
        ref.num_attention_heads,
        ref.num_key_value_heads,
        ref.head_dim,
        True,
    )
    gen = json.loads((smollm2_converted / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert ref.eos_token_id in eos and gen["bos_token_id"] == ref.bos_token_id


def test_smollm2_tensors_match_transformers(smollm2_converted, smollm2_hf):
    ref = {
        k: v.detach().numpy()
        for k, v in smollm2_hf[1].state_dict().items()
        if k != "lm_head.weight"
    }
    mine = load_file(str(smollm2_converted / "model.safetensors"))
    assert set(mine) == set(ref)  # tied: no lm_head.weight
    for name, arr in mine.items():
        assert arr.dtype == np.float32 and arr.shape == ref[name].shape, name
        np.testing.assert_allclose(arr, ref[name], rtol=0, atol=1e-7, err_msg=name)


def test_smollm2_tokenizer_matches_transformers(smollm2_converted, smollm2_hf):
    from transformers import PreTrainedTokenizerFast

    ref = smollm2_hf[2]
    raw = Tokenizer.from_file(str(smollm2_converted / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(smollm2_converted / "tokenizer.json"))
    for text in CORPUS:
        want = ref(text, add_special_tokens=False)["input_ids"]
        assert raw.encode(text, add_special_tokens=False).ids == want, text
        assert fast(text, add_special_tokens=False)["input_ids"] == want, text
        assert raw.encode(text).ids == ref(text)["input_ids"], text  # post-processor: no BOS here
        assert raw.decode(want, skip_special_tokens=False) == ref.decode(want), text
    assert raw.get_vocab_size(with_added_tokens=True) == len(ref)


def test_smollm2_tokenizer_config_matches_transformers(smollm2_converted, smollm2_hf):
    ref = smollm2_hf[2]
    tc = json.loads((smollm2_converted / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == ref.chat_template
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert tc[key] == getattr(ref, key), key
    assert tc["add_bos_token"] is False
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    from transformers import AutoTokenizer

    mine = AutoTokenizer.from_pretrained(str(smollm2_converted))
    assert mine.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    ) == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_smollm2_converted_dir_gives_transformers_logits(smollm2_converted, smollm2_hf):
    """The converted directory is a valid HF checkpoint: transformers loads it and computes the
    same logits as its own GGUF reading."""
    from transformers import AutoModelForCausalLM

    ref_model, tok = smollm2_hf[1], smollm2_hf[2]
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_converted), dtype=torch.float32).eval()
    ids = torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        np.testing.assert_allclose(
            model(ids).logits.numpy(), ref_model(ids).logits.numpy(), atol=1e-4, rtol=0
        )


def test_smollm2_greedy_chat_matches_transformers(smollm2_converted, smollm2_hf):
    """End to end on the converted directory: tinyllm's template, tokenizer and weights give
    transformers' greedy reply (transformers reading the GGUF itself)."""
    try:
        from tinyllm import LLM, SamplingParams
    except ImportError:
        pytest.skip("tinyllm.LLM is not available yet")
    model, tok = smollm2_hf[1], smollm2_hf[2]
    msgs = [{"role": "user", "content": "Name three colors."}]
    ids = tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    want = out[0, len(ids) :].tolist()
    llm = LLM(str(smollm2_converted), max_seq_len=256)
    assert llm.tokenizer.encode_chat(msgs) == list(ids)
    got = llm.chat(msgs, SamplingParams(max_tokens=24, temperature=0)).token_ids
    assert got == [t for t in want if t not in llm.eos_token_ids] and got == want[: len(got)]


# ---- synthetic files: dtypes, quantization, permutation ---------------------------------


def _convert(tmp_path: Path, **kw):
    path = tmp_path / "m.gguf"
    src = write_gguf(path, **kw)
    return path, src, convert_gguf(path, tmp_path / "out", progress=False)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_float_tensors_exact_and_qk_unpermuted(tmp_path, qtype):
    path, src, d = _convert(tmp_path, qtype=qtype, dim=64, ffn=128)
    out = converted_tensors(d)
    assert set(out) == set(src)
    for name, (arr, dt) in out.items():
        want = src[name]
        if want.ndim == 2 and qtype == "F16":
            assert dt == "F16"
            np.testing.assert_array_equal(arr, want.astype(np.float16), err_msg=name)
        elif want.ndim == 2 and qtype == "BF16":
            assert dt == "BF16"  # bits copied, not re-rounded
            ref = (
                torch.from_numpy(want).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            )
            np.testing.assert_array_equal(arr, ref, err_msg=name)
        else:
            assert dt == "F32"
            np.testing.assert_array_equal(arr, want, err_msg=name)  # q/k back in HF row order
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["torch_dtype"] == {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[qtype]
    assert cfg["tie_word_embeddings"] is False and cfg["architectures"] == ["LlamaForCausalLM"]


def test_permutation_actually_matters(tmp_path):
    """Guard against a vacuous un-permutation test: the GGUF's q rows differ from HF's."""
    path, src, d = _convert(tmp_path, dim=64, ffn=128)
    r = gguf.GGUFReader(str(path))
    stored = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight").data
    assert not np.array_equal(stored, src["model.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(
        gguf_convert.unpermute_rows(np.asarray(stored), 4),
        src["model.layers.0.self_attn.q_proj.weight"],
    )


# Largest rounding error as a fraction of the block's absmax, from each format's definition:
# Q8_0 half a step of amax/127; Q4_0/Q5_0 use d = signed max / -8 (-16), so the opposite
# extreme is clipped by up to one step; Q4_1/Q5_1 half a step of (max - min)/15 (31).
QUANT_ERR = {"Q8_0": 0.5 / 127, "Q4_0": 1 / 8, "Q4_1": 1 / 15, "Q5_0": 1 / 16, "Q5_1": 1 / 31}


@pytest.mark.parametrize("qtype", QUANTIZABLE)
def test_legacy_quants_close_to_source_and_equal_to_transformers(tmp_path, qtype):
    path, src, d = _convert(tmp_path, qtype=qtype)
    out = converted_tensors(d)
    ref = transformers_state_dict(path)
    for name, (arr, dt) in out.items():
        assert dt == "F32", name
        np.testing.assert_allclose(arr, ref[name], rtol=0, atol=1e-7, err_msg=name)
        want = src[name]
        if want.ndim == 2:  # within quantization error of the float source, block by block
            blocks = want.reshape(want.shape[0], -1, 32)
            err = np.abs(arr.reshape(blocks.shape) - blocks).max(-1)
            # plus the fp16 rounding of the block scale(s) times the largest value
            bound = np.abs(blocks).max(-1) * (QUANT_ERR[qtype] + 2**-10) + 1e-6
            assert (err <= bound).all(), (name, float((err / bound).max()))
        else:
            np.testing.assert_array_equal(arr, want)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"])
def test_kquants_equal_transformers_and_torch_dequant(tmp_path, qtype):
    """gguf cannot quantize these, so the file holds random blocks; the reference is transformers'
    whole-file reading, plus its independent torch dequantizer on the un-permuted tensors."""
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

    path, src, d = _convert(tmp_path, qtype=qtype)
    out = converted_tensors(d)
    ref = transformers_state_dict(path)
    raw = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for name, (arr, dt) in out.items():
        assert dt == "F32"
        np.testing.assert_allclose(arr, ref[name], rtol=0, atol=1e-7, err_msg=name)
        gg = {
            "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
            "model.layers.1.self_attn.v_proj.weight": "blk.1.attn_v.weight",
            "model.embed_tokens.weight": "token_embd.weight",
        }.get(name)
        if gg:
            t = raw[gg]
            flat = torch_dequantize(
                torch.from_numpy(np.array(t.data).reshape(-1)), int(t.tensor_type)
            )
            np.testing.assert_allclose(
                arr.reshape(-1), flat.numpy(), rtol=1e-6, atol=1e-6, err_msg=name
            )


def test_qwen2_not_permuted_biases_and_config(tmp_path):
    path, src, d = _convert(tmp_path, arch="qwen2", dim=64, ffn=128, tie=True)
    out = converted_tensors(d)
    assert set(out) == set(src) and "model.layers.0.self_attn.q_proj.bias" in out
    for name, (arr, _) in out.items():
        np.testing.assert_array_equal(arr, src[name], err_msg=name)
    cfg = json.loads((d / "config.json").read_text())
    from transformers import AutoConfig

    ref = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and ref.model_type == "qwen2"
    for key in (
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "num_hidden_layers",
        "intermediate_size",
        "vocab_size",
        "tie_word_embeddings",
        "max_position_embeddings",
    ):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps)
    mc = ModelConfig.load(d)
    assert mc.arch == "qwen2" and mc.tie_embeddings and mc.sliding_window is None
    ref_sd = transformers_state_dict(path)
    for name, (arr, _) in out.items():
        np.testing.assert_array_equal(arr, ref_sd[name], err_msg=name)


def test_mistral_in_llama_arch_is_recognised(tmp_path):
    path, src, d = _convert(tmp_path, name="Mistral-7B-Instruct-v0.3", dim=64, ffn=128)
    cfg = json.loads((d / "config.json").read_text())
    # (transformers' loader means to do the same, but tests `"mistral" in [general.name]`, a
    # list membership that only matches a name spelled exactly "mistral")
    assert cfg["model_type"] == "mistral"
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["sliding_window"] is None
    out = converted_tensors(d)
    for name, (arr, _) in out.items():  # still permuted in the file, so still un-permuted here
        np.testing.assert_array_equal(arr, src[name], err_msg=name)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    """llama.cpp stores llama3 RoPE scaling as a `rope_freqs` tensor of per-frequency divisors;
    build it from transformers' own llama3 inv_freq and check the parameters come back."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    }
    hf_cfg = LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        rope_parameters=params,
        max_position_embeddings=131072,
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    base = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64)
    divisors = (base / scaled).numpy().astype(np.float32)
    assert divisors.min() == pytest.approx(1.0) and divisors.max() == pytest.approx(32.0)

    def extra(w, src):
        w.add_tensor("rope_freqs.weight", divisors)

    path, src, d = _convert(tmp_path, theta=500000.0, extra=extra)
    cfg = json.loads((d / "config.json").read_text())
    got = cfg["rope_scaling"]
    assert got == {k: v for k, v in params.items() if k != "rope_theta"}
    assert cfg["rope_theta"] == 500000.0
    assert "rope_freqs.weight" not in converted_tensors(d)
    mc = ModelConfig.load(d)
    assert mc.rope_type == "llama3"


def test_linear_rope_scaling(tmp_path):
    def extra(w, src):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    _, _, d = _convert(tmp_path, dim=64, ffn=128, extra=extra)
    assert json.loads((d / "config.json").read_text())["rope_scaling"] == {
        "rope_type": "linear",
        "factor": 4.0,
    }


def test_dtype_override_bfloat16_rounds_like_torch(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, qtype="Q8_0")
    d = convert_gguf(path, tmp_path / "bf16", progress=False, dtype="bfloat16")
    ref = transformers_state_dict(path)
    out = converted_tensors(d)
    for name, (arr, dt) in out.items():
        assert dt == "BF16"
        want = (
            torch.from_numpy(ref[name]).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        )
        np.testing.assert_array_equal(arr, want, err_msg=name)
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ---- tokenizers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_vocab(smollm2_gguf_path) -> dict:
    r = gguf.GGUFReader(str(smollm2_gguf_path))
    get = lambda k: r.fields[k].contents()  # noqa: E731
    return dict(
        model="gpt2",
        tokens=get("tokenizer.ggml.tokens"),
        types=get("tokenizer.ggml.token_type"),
        merges=get("tokenizer.ggml.merges"),
        bos=1,
        eos=2,
        unk=None,
        pad=2,
        add_bos=False,
    )


@pytest.mark.parametrize("pre", ["default", "llama-bpe", "qwen2"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path, smollm2_vocab, pre):
    """The real SmolLM2 vocabulary under the other pre-tokenizers tinyllm knows, against
    transformers' GGUF tokenizer for the same file. Qwen2's tokenizer.json normalizes to NFC
    (transformers' GGUF path does not), so the reference gets NFC text for that one."""
    vocab = dict(smollm2_vocab, pre=pre)
    path, _, d = _convert(tmp_path, vocab=vocab, dim=32, ffn=64, n_heads=2, n_kv=1, n_layers=1)
    mine = Tokenizer.from_file(str(d / "tokenizer.json"))
    ref = transformers_tokenizer(path)
    for text in CORPUS:
        ref_text = unicodedata.normalize("NFC", text) if pre == "qwen2" else text
        assert (
            mine.encode(text, add_special_tokens=False).ids
            == ref(ref_text, add_special_tokens=False)["input_ids"]
        ), (pre, text)


def _sentencepiece_vocab(tmp_path: Path):
    """Train a small SentencePiece BPE model (byte fallback, identity normalization) and lay
    its pieces out as llama.cpp's converter does: scores, and token types from the proto."""
    spm = pytest.importorskip("sentencepiece")
    text = [t for t in CORPUS if t.strip()] * 20 + [
        "the theory of the thing is that there are three tokens"
    ] * 40
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=model,
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        character_coverage=0.999,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        hard_vocab_limit=False,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(
            2
            if sp.is_unknown(i)
            else 3
            if sp.is_control(i)
            else 6
            if sp.is_byte(i)
            else 5
            if sp.is_unused(i)
            else 1
        )
    vocab = dict(
        model="llama",
        tokens=tokens,
        scores=scores,
        types=types,
        merges=None,
        bos=1,
        eos=2,
        unk=0,
        pad=None,
        add_bos=True,
        add_space_prefix=True,
    )
    return sp, vocab


def test_sentencepiece_vocab_matches_sentencepiece_and_transformers(tmp_path):
    """A SentencePiece vocabulary (merges derived from scores) tokenizes as sentencepiece itself
    does and as transformers' GGUF tokenizer does. One known difference with sentencepiece is
    kept on purpose: like HF's non-legacy Llama/Mistral tokenizers (Metaspace, prepend "first"),
    text that already starts with a space gets no extra "▁" (sentencepiece always adds one), and
    text after a special token gets none either (what Mistral v0.3's "[INST]Hello" needs)."""
    sp, vocab = _sentencepiece_vocab(tmp_path)
    path, _, d = _convert(tmp_path, vocab=vocab, dim=32, ffn=64, n_heads=2, n_kv=1, n_layers=1)
    mine = Tokenizer.from_file(str(d / "tokenizer.json"))
    ref = transformers_tokenizer(path)
    samples = [t for t in CORPUS if "<|" not in t] + [
        "the theory",
        "  two leading",
        "<s>hi</s>",
        "tokens tokens",
    ]
    for text in samples:
        ids = mine.encode(text, add_special_tokens=False).ids
        assert ids == ref(text, add_special_tokens=False)["input_ids"], text
        assert mine.encode(text).ids == [1] + ids  # add_bos_token
        if not text[:1].isspace() and "<s>" not in text:
            assert ids == sp.encode(text), text
            assert mine.decode(ids) == sp.decode(ids), text
    assert mine.encode("<s>", add_special_tokens=False).ids == [
        1
    ]  # control tokens are matched whole
    tc = json.loads((d / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["unk_token"], tc["add_bos_token"]) == (
        "<s>",
        "</s>",
        "<unk>",
        True,
    )


# ---- errors and file handling ------------------------------------------------------------


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "gemma2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(TinyLLMError, match=r"'gemma2'.*supported: llama, mistral, qwen2"):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unsupported_quant_type(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, qtype="Q8_0", n_layers=1, overrides={"blk.0.ffn_up.weight": "IQ2_XXS"})
    with pytest.raises(
        TinyLLMError, match=r"blk.0.ffn_up.weight.*IQ2_XXS.*supported: F32, F16, BF16, Q8_0"
    ):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == [path]  # nothing written


def test_unsupported_pre_tokenizer(tmp_path):
    vocab = dict(byte_vocab(), pre="falcon")
    path = tmp_path / "m.gguf"
    write_gguf(path, vocab=vocab, dim=64, ffn=128)
    with pytest.raises(TinyLLMError, match=r"pre-tokenizer 'falcon'.*smollm"):
        convert_gguf(path, tmp_path / "out", progress=False)


def test_refuses_non_empty_output_and_cleans_up_on_interrupt(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    write_gguf(path, dim=64, ffn=128)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    with pytest.raises(TinyLLMError, match="not empty"):
        convert_gguf(path, tmp_path / "busy", progress=False)
    assert (tmp_path / "busy" / "x").read_text() == "keep"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "_write_safetensors", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "m.gguf"]  # no partial directory


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(TinyLLMError, match="does not exist"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(TinyLLMError, match="not a readable GGUF"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "out")
