"""tinyllm.tokenizer against independent references: transformers (SmolLM2's tokenizer files and
small Llama-style byte-fallback tokenizers built here with `tokenizers`), mistral-common and
SentencePiece (Mistral's own tokenizer files shipped inside the mistral-common package)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from tinyllm.errors import TinyLLMError
from tinyllm.tokenizer import STREAM_CONTEXT, ChatTemplateError, StreamDecoder, Tokenizer

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; isn't it?",
    "def f(x):\n    return x ** 2  # square\n\n\tif x != 0: print(f'{x=}')",
    "1234567890 3.14159 -42 1e-5 0x1F 1,000,000",
    "   leading spaces, trailing spaces   ",
    "many\n\n\n\nnewlines\r\n and\ttabs\t\tand  double  spaces",
    "Café, naïve, résumé, Ångström, Straße, ąćęłńóśźż, Ελληνικά, русский",
    "東京は日本の首都です。中文测试。한국어 텍스트.",
    "emoji 😀🦜🫠 family 👩‍👩‍👧 flag 🇫🇷 skin 👍🏽",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√∞ ≠ ≤ and rare ꙮ 鿰",
    "combining e\u0301 and zero\u200bwidth",
    "special <|im_end|> inside <|im_start|>user text",
    "",
    " ",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Hi 東京 😀"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about  spaces."},
    ],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c\n\nd"},
        {"role": "assistant", "content": "e"},
        {"role": "user", "content": "f"},
    ],
]


def stream_all(dec: StreamDecoder, ids) -> tuple[str, list[str]]:
    chunks = [dec.push(i) for i in ids]
    chunks.append(dec.flush())
    return "".join(chunks), chunks


# ----------------------------------------------------------------------- SmolLM2 (byte-level BPE)


@pytest.fixture(scope="module")
def smol(smollm2_hf):
    d, _, hf = smollm2_hf
    return Tokenizer.load(d), hf


def test_smollm2_special_tokens_match_transformers(smol):
    tok, hf = smol
    assert tok.vocab_size == len(hf)
    assert tok.bos_token_id == hf.bos_token_id
    assert tok.eos_token_id == hf.eos_token_id
    assert tok.eos_token_ids == {hf.eos_token_id}
    assert tok.has_chat_template


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_smollm2_encode_matches_transformers(smol, add_special_tokens):
    tok, hf = smol
    for text in CORPUS:
        assert (
            tok.encode(text, add_special_tokens=add_special_tokens)
            == hf(text, add_special_tokens=add_special_tokens)["input_ids"]
        ), text


@pytest.mark.parametrize("skip", [True, False])
def test_smollm2_decode_matches_transformers(smol, skip):
    tok, hf = smol
    chat_ids = hf.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True, tokenize=True)[
        "input_ids"
    ]
    for ids in [hf(t)["input_ids"] for t in CORPUS] + [chat_ids]:
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_matches_transformers(smol, add_generation_prompt):
    tok, hf = smol
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt
        ) == hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        ref = hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True
        )
        assert (
            tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
            == ref["input_ids"]
        )


def test_smollm2_stream_equals_one_shot_decode(smol):
    tok, hf = smol
    for text in CORPUS + ["".join(CORPUS)]:
        ids = tok.encode(text, add_special_tokens=False)
        joined, chunks = stream_all(tok.stream(), ids)
        assert joined == hf.decode(ids, skip_special_tokens=True)
        if "\ufffd" not in joined:
            assert not any("\ufffd" in c for c in chunks), chunks
    # The case that needs care is real: byte-level tokens split characters when decoded alone.
    ids = tok.encode(CORPUS[8], add_special_tokens=False)
    assert "".join(tok.decode([i]) for i in ids) != tok.decode(ids)


def test_smollm2_stream_random_ids(smol):
    assert _random_stream_check(smol[0], seed=0, low=300) > 30


def test_smollm2_stream_after_a_chat_prompt(smol):
    tok, hf = smol
    prompt = tok.encode_chat(CONVERSATIONS[2])
    reply = tok.encode("Sure! 東京 is 🦜-friendly.<|im_end|>", add_special_tokens=False)
    joined, _ = stream_all(tok.stream(prompt), reply)
    full, head = (
        hf.decode(prompt + reply, skip_special_tokens=True),
        hf.decode(prompt, skip_special_tokens=True),
    )
    assert full.startswith(head)
    assert joined == full[len(head) :]


# ------------------------------------------------------------------ Llama-style byte-fallback BPE

TRAIN_TEXT = [
    "Hello world, this is a small test of a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "Tokenizers split text into pieces; spaces become a special marker.",
    "Numbers like 123 and 4567 and words like café appear here.",
] * 10


def _build_llama_style(kind: str):
    """A SentencePiece-like BPE: <unk>/<s>/</s>, 256 <0xNN> byte tokens, merges learned from
    TRAIN_TEXT (so CJK and emoji fall back to bytes), a BOS post-processor and Llama's decoder.
    kind "metaspace": Metaspace pre-tokenizer (newer conversions); "legacy": Llama-2's
    Prepend+Replace normalizer with no pre-tokenizer."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    trainer_tok = Backend(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first", split=False
    )
    trainer_tok.train_from_iterator(
        TRAIN_TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"])
    )
    learned = json.loads(trainer_tok.to_str())["model"]
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [
        p for p, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if p not in pieces
    ]
    vocab = {p: i for i, p in enumerate(pieces)}

    tok = Backend(
        models.BPE(
            vocab=vocab,
            merges=[
                tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]
            ],
            unk_token="<unk>",
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    if kind == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first", split=False
        )
    else:
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def _save(
    tok, d: Path, config: dict | None = None, post_processor=True, files: dict | None = None
) -> Path:
    """A tokenizer directory: tokenizer.json, tokenizer_config.json and any extra {path: text}."""
    d.mkdir(parents=True, exist_ok=True)
    spec = json.loads(tok.to_str())
    if not post_processor:
        spec["post_processor"] = None
    (d / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", **(config or {})}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    for name, text in (files or {}).items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text, encoding="utf-8")
    return d


@pytest.fixture(scope="module", params=["metaspace", "legacy"])
def llama_style(request, tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    backend = _build_llama_style(request.param)
    d = _save(backend, tmp_path_factory.mktemp(f"llama_{request.param}"))
    ref = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    return Tokenizer.load(d), ref, backend


def test_llama_style_encode_decode_match_transformers(llama_style):
    tok, ref, _ = llama_style
    assert (tok.bos_token_id, tok.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    for text in CORPUS:
        for add in (True, False):
            ids = tok.encode(text, add_special_tokens=add)
            assert ids == ref(text, add_special_tokens=add)["input_ids"], text
            for skip in (True, False):
                assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(
                    ids, skip_special_tokens=skip
                )


def test_llama_style_stream_keeps_spaces_and_characters(llama_style):
    tok, ref, backend = llama_style
    byte_fallback_seen = False
    for text in CORPUS + ["".join(CORPUS)]:
        ids = tok.encode(text, add_special_tokens=True)
        byte_fallback_seen |= any(backend.id_to_token(i).startswith("<0x") for i in ids)
        joined, chunks = stream_all(tok.stream(), ids)
        assert joined == ref.decode(ids, skip_special_tokens=True), text
        assert not any("\ufffd" in c for c in chunks), chunks
        # After a prompt: what the stream prints is exactly what decoding the whole adds.
        prompt = tok.encode("Question: what is this?")
        joined, _ = stream_all(tok.stream(prompt), ids[1:])
        full, head = (
            ref.decode(prompt + ids[1:], skip_special_tokens=True),
            ref.decode(prompt, skip_special_tokens=True),
        )
        assert full.startswith(head) and joined == full[len(head) :], text
    assert byte_fallback_seen
    # Token-by-token decoding really loses spaces and splits characters here.
    ids = tok.encode("Hello world 東京", add_special_tokens=False)
    assert "".join(tok.decode([i]) for i in ids) != tok.decode(ids)


def test_stream_is_constant_work_per_token(llama_style):
    tok, _, _ = llama_style
    ids = tok.encode(" ".join(CORPUS) * 20, add_special_tokens=False)
    seen = []

    def decode(window):
        seen.append(len(window))
        return tok.decode(window)

    joined, _ = stream_all(StreamDecoder(decode, prompt_ids=ids[:50]), ids[50:])
    assert joined == tok.decode(ids)[len(tok.decode(ids[:50])) :]
    assert (
        len(ids) > 1000 and max(seen) <= STREAM_CONTEXT + 8
    )  # longest character is a few byte tokens


def _random_stream_check(tok, seed: int, low: int) -> int:
    """Random id sequences, one id in five drawn from the `low` first ids (bytes, specials): the
    stream must join to the one-shot decode whenever that decode is valid text."""
    import random

    rng = random.Random(seed)

    def draw():
        return rng.randrange(low) if rng.random() < 0.2 else rng.randrange(low, tok.vocab_size)

    checked = 0
    for _ in range(300):
        ids = [draw() for _ in range(rng.randint(1, 30))]
        prompt = [draw() for _ in range(rng.randint(0, 8))]
        ref = tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
        if "\ufffd" in ref:
            continue
        assert tok.decode(prompt + ids).startswith(tok.decode(prompt))
        assert stream_all(tok.stream(prompt), ids)[0] == ref, (prompt, ids)
        checked += 1
    return checked


def test_stream_random_ids(llama_style):
    assert _random_stream_check(llama_style[0], seed=1, low=3 + 256) > 30


def test_stream_flushes_bytes_that_never_complete(llama_style):
    tok, _, backend = llama_style
    ids = tok.encode("ok 東", add_special_tokens=False)[:-1]  # drop the last byte of 東
    dec = tok.stream()
    pushed = "".join(dec.push(i) for i in ids)
    assert "\ufffd" not in pushed
    assert pushed + dec.flush() == tok.decode(ids)
    assert tok.decode(ids).endswith("\ufffd")


def test_add_bos_token_follows_transformers(tmp_path):
    """transformers (>= 5) lets tokenizer.json's post-processor decide; tokenizer_config's
    add_bos_token/add_eos_token do not override it."""
    from transformers import AutoTokenizer

    backend = _build_llama_style("metaspace")
    for i, (post, cfg) in enumerate(
        [
            (True, {}),
            (True, {"add_bos_token": False, "add_eos_token": True}),
            (False, {}),
            (False, {"add_bos_token": True}),
        ]
    ):
        d = _save(backend, tmp_path / str(i), cfg, post_processor=post)
        ref = AutoTokenizer.from_pretrained(d)
        for text in ("Hello world", "x</s> y"):
            assert Tokenizer.load(d).encode(text) == ref(text)["input_ids"], (post, cfg)


# ----------------------------------------------------------------- chat templates vs transformers

CHATML = (
    "{% for m in messages %}{{ '<s>' + m['role'] + '\n' + m['content'] + '</s>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def backend():
    return _build_llama_style("metaspace")


def _both(d: Path):
    from transformers import AutoTokenizer

    return Tokenizer.load(d), AutoTokenizer.from_pretrained(d)


def _same_render(tok, ref, messages, **kw):
    text = tok.apply_chat_template(messages, add_generation_prompt=True, **kw)
    assert text == ref.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, **kw
    )
    assert (
        tok.encode_chat(messages, **kw)
        == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kw)[
            "input_ids"
        ]
    )
    return text


def test_template_features_render_like_transformers(backend, tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% "
        "endgeneration %}"
        "{% else %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endif %}"
        "{% if loop.index >= 4 %}{% break %}{% endif %}{% endfor %}\n"
        "  {% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}"
        "META {{ messages[0] | tojson(indent=2, sort_keys=True) }} {{ {'a': '<é>'} | tojson }}\n"
        "{{ strftime_now('%Y-%m') }} {{ custom_flag }} {{ unk_token }}"
        "{% if add_generation_prompt %}\n[ASSISTANT]{% endif %}"
    )
    tok, ref = _both(_save(backend, tmp_path, {"chat_template": template}))
    messages = CONVERSATIONS[3]
    text = _same_render(tok, ref, messages, custom_flag="on")
    # the template really ran: tags, filters, {% break %} after four messages, trim_blocks
    assert (
        text.startswith("<s>[SYSTEM]")
        and text.endswith("on <unk>[ASSISTANT]")
        and "[USER] f" not in text
    )
    _same_render(
        tok, ref, messages, custom_flag=1, bos_token="<BOS>"
    )  # kwargs override special tokens
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    _same_render(tok, ref, messages, tools=tools, custom_flag=None)


def test_raise_exception_becomes_chat_template_error(backend, tmp_path):
    import jinja2

    template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') "
        "}}"
        "{% endif %}" + CHATML
    )
    tok, ref = _both(_save(backend, tmp_path, {"chat_template": template}))
    with pytest.raises(jinja2.exceptions.TemplateError) as ref_err:
        ref.apply_chat_template(CONVERSATIONS[1], tokenize=False)
    with pytest.raises(ChatTemplateError) as err:
        tok.apply_chat_template(CONVERSATIONS[1])
    assert str(err.value) == str(ref_err.value)
    assert isinstance(err.value, TinyLLMError)
    assert tok.apply_chat_template(CONVERSATIONS[0])  # other conversations still render


def test_named_templates_in_tokenizer_config(backend, tmp_path):
    named = [
        {"name": "tool_use", "template": "TOOLS " + CHATML},
        {"name": "default", "template": CHATML},
        {"name": "rag", "template": "RAG " + CHATML},
    ]
    tok, ref = _both(_save(backend, tmp_path, {"chat_template": named}))
    assert _same_render(tok, ref, CONVERSATIONS[2]).startswith("<s>user")
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert _same_render(tok, ref, CONVERSATIONS[2], tools=tools).startswith("TOOLS ")


def test_chat_template_jinja_takes_precedence(backend, tmp_path):
    tok, ref = _both(
        _save(
            backend,
            tmp_path,
            {"chat_template": "CONFIG " + CHATML},
            files={"chat_template.jinja": "FILE " + CHATML},
        )
    )
    assert _same_render(tok, ref, CONVERSATIONS[1]).startswith("FILE ")


def test_additional_chat_templates_dir(backend, tmp_path):
    tok, ref = _both(
        _save(
            backend,
            tmp_path,
            files={
                "chat_template.jinja": CHATML,
                "additional_chat_templates/tool_use.jinja": "T " + CHATML,
            },
        )
    )
    _same_render(tok, ref, CONVERSATIONS[0])
    _same_render(
        tok, ref, CONVERSATIONS[0], tools=[{"type": "function", "function": {"name": "f"}}]
    )


def test_special_tokens_map_overrides_config_like_transformers(backend, tmp_path):
    d = _save(
        backend,
        tmp_path,
        {"eos_token": "<unk>", "chat_template": "{{ eos_token }}" + CHATML},
        files={
            "special_tokens_map.json": json.dumps(
                {"eos_token": {"content": "</s>", "lstrip": False}}
            )
        },
    )
    tok, ref = _both(d)
    assert tok.eos_token_id == ref.eos_token_id
    _same_render(tok, ref, CONVERSATIONS[0])


def test_missing_chat_template_is_a_user_error(backend, tmp_path):
    tok = Tokenizer.load(_save(backend, tmp_path))
    assert not tok.has_chat_template
    for call in (tok.apply_chat_template, tok.encode_chat):
        with pytest.raises(TinyLLMError, match="generate") as err:
            call(CONVERSATIONS[0])
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------- Mistral native (SentencePiece)


def _mistral_data() -> Path | None:
    spec = importlib.util.find_spec("mistral_common")
    return Path(spec.origin).parent / "data" if spec and spec.origin else None


MISTRAL_FILES = {
    "v1": "tokenizer.model.v1",
    "v2": "mistral_instruct_tokenizer_240216.model.v2",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
}

MISTRAL_CONVERSATIONS = CONVERSATIONS + [
    [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "system", "content": "S1"},
        {"role": "user", "content": "c"},
        {"role": "system", "content": "S2"},
        {"role": "assistant", "content": "x"},
        {"role": "assistant", "content": "y  "},
        {"role": "user", "content": "東京 🦜 ꙮ"},
    ],
    [
        {"role": "system", "content": "sys"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "q"},
    ],
]


@pytest.fixture(scope="module", params=list(MISTRAL_FILES))
def mistral(request, tmp_path_factory):
    pytest.importorskip("sentencepiece")
    data = _mistral_data()
    src = data / MISTRAL_FILES[request.param] if data else None
    if src is None or not src.is_file():
        pytest.skip("mistral-common (which ships Mistral's tokenizer files) is not installed")
    d = tmp_path_factory.mktemp(f"mistral_{request.param}")
    shutil.copy(src, d / f"tokenizer.model.{request.param}")
    return request.param, src, Tokenizer.load(d)


def _mistral_common(src: Path):
    try:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    except ImportError as e:  # mistral-common installed without its dependencies (pillow, ...)
        pytest.skip(f"mistral-common cannot be imported: {e}")
    return MistralTokenizer.from_file(str(src))


def test_mistral_encode_decode_match_sentencepiece(mistral):
    import sentencepiece

    _, src, tok = mistral
    sp = sentencepiece.SentencePieceProcessor(model_file=str(src))
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_ids) == (
        sp.vocab_size(),
        sp.bos_id(),
        {sp.eos_id()},
    )
    for text in CORPUS:
        assert tok.encode(text) == [sp.bos_id()] + sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))


def test_mistral_encode_decode_match_mistral_common(mistral):
    _, src, tok = mistral
    ref = _mistral_common(src).instruct_tokenizer.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id) == (ref.bos_id, ref.eos_id)
    for text in CORPUS:
        assert tok.encode(text) == ref.encode(text, bos=True, eos=False)
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, bos=False, eos=False)
        ids = ref.encode(text, bos=True, eos=True)
        assert tok.decode(ids) == ref.decode(ids)


def test_mistral_chat_ids_match_mistral_common(mistral):
    _, src, tok = mistral
    ref = _mistral_common(src)
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    from_role = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}
    for messages in MISTRAL_CONVERSATIONS:
        request = ChatCompletionRequest(
            messages=[from_role[m["role"]](content=m["content"]) for m in messages]
        )
        assert tok.encode_chat(messages) == ref.encode_chat_completion(request).tokens, messages


def test_mistral_chat_text_has_the_documented_shape(mistral):
    # docs.mistral.ai, "tokenization templates": V1 puts spaces around [INST]/[/INST] (plain
    # text), V3 uses control tokens and no space before [/INST].
    version, _, tok = mistral
    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Fine"},
        {"role": "user", "content": "Next"},
    ]
    expected = {
        "v1": "<s> [INST] Hello [/INST] Fine</s> [INST] Next [/INST]",
        "v2": "<s>[INST] Hello[/INST] Fine</s>[INST] Next[/INST]",
        "v3": "<s>[INST] Hello[/INST] Fine</s>[INST] Next[/INST]",
    }[version]
    assert tok.apply_chat_template(messages) == expected
    if version != "v1":
        assert (
            tok.encode_chat(messages)[:2] == [tok.bos_token_id, 3]
            and tok.encode_chat(messages)[-1] == 4
        )


def test_mistral_stream_equals_decode(mistral):
    import sentencepiece

    _, src, tok = mistral
    sp = sentencepiece.SentencePieceProcessor(model_file=str(src))
    byte_tokens = 0
    for text in CORPUS + ["".join(CORPUS)]:
        ids = tok.encode(text)
        byte_tokens += sum(sp.IsByte(i) for i in ids)
        joined, chunks = stream_all(tok.stream(), ids)
        assert joined == tok.decode(ids), text
        assert not any("\ufffd" in c for c in chunks)
        prompt = tok.encode_chat(CONVERSATIONS[2])
        joined, _ = stream_all(tok.stream(prompt), ids[1:] + [tok.eos_token_id])
        full, head = tok.decode(prompt + ids[1:]), tok.decode(prompt)
        assert full.startswith(head) and joined == full[len(head) :]
    assert byte_tokens > 0  # the rare characters went through byte fallback


def test_mistral_stream_random_ids(mistral):
    assert _random_stream_check(mistral[2], seed=2, low=300) > 30


def test_mistral_rejects_tool_messages(mistral):
    _, _, tok = mistral
    with pytest.raises(ChatTemplateError, match="tool"):
        tok.encode_chat([{"role": "user", "content": "x"}, {"role": "tool", "content": "{}"}])


def test_mistral_without_sentencepiece_is_a_user_error(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.model.v3").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # makes `import sentencepiece` fail
    with pytest.raises(TinyLLMError, match=r"pip install 'tinyllm\[mistral\]'"):
        Tokenizer.load(tmp_path)


# -------------------------------------------------------------------- missing / unsupported files


@pytest.mark.parametrize(
    "files, match",
    [
        ({}, "no tokenizer.json or tokenizer.model"),
        ({"tekken.json": "{}"}, "not supported yet"),
        ({"tokenizer.model": ""}, "no tokenizer.json"),
        ({"tokenizer.model.v1": "", "tokenizer.model.v3": ""}, "several Mistral tokenizers"),
        ({"tokenizer.model.v7": ""}, "not supported yet"),
        ({"tokenizer.json": "{not json"}, "cannot load"),
    ],
)
def test_load_errors_name_the_problem(tmp_path, files, match):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(TinyLLMError, match=match) as err:
        Tokenizer.load(tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_load_error_for_a_missing_directory(tmp_path):
    with pytest.raises(TinyLLMError, match="not a directory"):
        Tokenizer.load(tmp_path / "nope")
