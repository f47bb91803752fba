"""Malformed and hostile model directories, table-driven: every case must end in one
`tinyllm: error:` line and exit 2, with no traceback, nothing read outside the model
directory, bounded time and bounded memory.

All cases run in one child process (imports are paid once) under an address-space limit
(RLIMIT_AS) and an audit hook that records every file opened under the test's root but
outside the case's model directory. Safetensors cases are also handed to the safetensors
library itself, the independent reference: it must reject each file too.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TIME_LIMIT = 20.0  # seconds per case (the chat-template limit is 5 s)
MEMORY_LIMIT = 6 * 2**30  # address space of the child that runs every case

# ---- safetensors surgery ------------------------------------------------------------------


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path: Path, header, data: bytes, raw_header: bytes | None = None):
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def edit_header(edit):
    def apply(d: Path):
        f = d / "model.safetensors"
        header, data = read_st(f)
        data = edit(header, data) or data
        write_st(f, header, data)

    return apply


def sorted_names(header) -> list[str]:
    return sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )


def _overlap(h, data):
    a, b = sorted_names(h)[:2]
    if h[a]["shape"] == h[b]["shape"]:
        h[b]["data_offsets"] = list(h[a]["data_offsets"])
    else:  # make b a copy of a's shape at a's place
        h[b].update(shape=list(h[a]["shape"]), data_offsets=list(h[a]["data_offsets"]))


def _gap(h, data):
    last = sorted_names(h)[-1]
    h[last]["data_offsets"] = [o + 4 for o in h[last]["data_offsets"]]
    return data + b"\0" * 4


def _first(h):
    return sorted_names(h)[0]


def _raw_file(content: bytes):
    def apply(d: Path):
        (d / "model.safetensors").write_bytes(content)

    return apply


def _header_bytes(raw: bytes):
    def apply(d: Path):
        _, data = read_st(d / "model.safetensors")
        write_st(d / "model.safetensors", None, data, raw_header=raw)

    return apply


SECRET = b"SECRET-TOKEN-0123456789"


def _shard_index(name_of):
    """Shard the model's tensors through an index whose file names come from name_of(d)."""

    def apply(d: Path):
        header, _ = read_st(d / "model.safetensors")
        names = [k for k in header if k != "__metadata__"]
        (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
        target = name_of(d)
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {n: target for n in names}})
        )

    return apply


# ---- config surgery -------------------------------------------------------------------------


def edit_json(name: str, **changes):
    def apply(d: Path):
        p = d / name
        cfg = json.loads(p.read_text()) if p.exists() else {}
        for k, v in changes.items():
            if v is _DROP:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        p.write_text(json.dumps(cfg))  # json.dumps writes NaN as the (non-standard) literal NaN

    return apply


_DROP = object()


def write_text(name: str, text: str | bytes):
    def apply(d: Path):
        p = d / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())

    return apply


def nan_weight(d: Path):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(d / "model.safetensors"))
    w = t["model.layers.1.mlp.down_proj.weight"].copy()
    w[3, 5] = np.nan
    t["model.layers.1.mlp.down_proj.weight"] = w
    save_file(t, str(d / "model.safetensors"))


def template(src: str):
    return write_text("chat_template.jinja", src)


GEN = ("generate", "-n", "2", "hi")
CHAT = ("chat", "-n", "2", "hi")

# name: (how to break the copy, command, words the error line must contain, library must reject)
CASES = {
    # safetensors header
    "header_list": (_header_bytes(b"[]"), GEN, ["model.safetensors", "list"], True),
    "header_null": (_header_bytes(b"null"), GEN, ["model.safetensors", "null"], True),
    "header_string": (
        _header_bytes(b'"tensors"'),
        GEN,
        ["model.safetensors", "not an object"],
        True,
    ),
    "header_not_json": (
        _header_bytes(b"{not json"),
        GEN,
        ["model.safetensors", "not valid JSON"],
        True,
    ),
    "header_not_utf8": (
        _header_bytes(b'{"\xff\xfe": 1}'),
        GEN,
        ["model.safetensors", "UTF-8"],
        True,
    ),
    "header_too_large": (
        _raw_file(struct.pack("<Q", 100_000_001) + b"{}" + b"\0" * 64),
        GEN,
        ["model.safetensors", "100 MB"],
        True,
    ),
    "header_past_eof": (
        _raw_file(struct.pack("<Q", 4096) + b"{}"),
        GEN,
        ["model.safetensors", "past the end"],
        True,
    ),
    "not_safetensors": (_raw_file(SECRET * 40), GEN, ["model.safetensors"], True),
    "short_file": (_raw_file(b"abc"), GEN, ["model.safetensors", "shorter"], True),
    "entry_not_object": (
        edit_header(lambda h, d: h.__setitem__(_first(h), [1, 2])),
        GEN,
        ["not an object"],
        True,
    ),
    "unknown_dtype": (
        edit_header(lambda h, d: h[_first(h)].__setitem__("dtype", "F99")),
        GEN,
        ["dtype"],
        True,
    ),
    "shape_negative": (
        edit_header(lambda h, d: h[_first(h)].__setitem__("shape", [-1, 64])),
        GEN,
        ["shape"],
        True,
    ),
    "shape_float": (
        edit_header(lambda h, d: h[_first(h)].__setitem__("shape", [2.5])),
        GEN,
        ["shape"],
        True,
    ),
    "shape_bool": (
        edit_header(lambda h, d: h[_first(h)].__setitem__("shape", [True])),
        GEN,
        ["shape"],
        True,
    ),
    "offsets_reversed": (
        edit_header(lambda h, d: h[_first(h)]["data_offsets"].reverse()),
        GEN,
        ["data_offsets", "end before"],
        True,
    ),
    "offsets_negative": (
        edit_header(lambda h, d: h[_first(h)].__setitem__("data_offsets", [-4, 0])),
        GEN,
        ["data_offsets"],
        True,
    ),
    "offsets_three": (
        edit_header(lambda h, d: h[_first(h)].__setitem__("data_offsets", [0, 4, 8])),
        GEN,
        ["data_offsets"],
        True,
    ),
    "offsets_overlap": (edit_header(_overlap), GEN, ["overlaps"], True),
    "offsets_gap": (edit_header(_gap), GEN, ["gap"], True),
    "bytes_not_shape": (
        edit_header(
            lambda h, d: h[_first(h)].__setitem__("shape", [math.prod(h[_first(h)]["shape"]) + 1])
        ),
        GEN,
        ["needs", "bytes"],
        True,
    ),
    "trailing_bytes": (
        edit_header(lambda h, d: d + b"\0" * 16),
        GEN,
        ["follow the last tensor"],
        True,
    ),
    "truncated_data": (edit_header(lambda h, d: d[: len(d) // 2]), GEN, ["truncated"], True),
    "metadata_not_strings": (
        edit_header(lambda h, d: h.__setitem__("__metadata__", {"format": 1})),
        GEN,
        ["__metadata__"],
        True,
    ),
    # the shard index
    "index_traversal": (
        _shard_index(lambda d: "../outside/secret.safetensors"),
        GEN,
        ["shard", ".."],
        False,
    ),
    "index_absolute": (
        _shard_index(lambda d: str(d.parent / "outside" / "secret.safetensors")),
        GEN,
        ["shard", "relative"],
        False,
    ),
    "index_not_safetensors_name": (_shard_index(lambda d: "config.json"), GEN, ["shard"], False),
    "index_weight_map_list": (
        write_text("model.safetensors.index.json", '{"weight_map": ["a"]}'),
        GEN,
        ["weight_map"],
        False,
    ),
    "index_not_json": (
        write_text("model.safetensors.index.json", b"\x00\x01garbage"),
        GEN,
        ["model.safetensors.index.json"],
        False,
    ),
    "index_wrong_shard": (
        lambda d: (
            _shard_index(lambda d: "model-00001-of-00001.safetensors")(d),
            edit_json(
                "model.safetensors.index.json",
                weight_map={"model.nonexistent.weight": "model-00001-of-00001.safetensors"},
            )(d),
        ),
        GEN,
        ["model.nonexistent.weight", "does not hold"],
        False,
    ),
    # config.json types and ranges
    "config_list": (
        write_text("config.json", "[1, 2]"),
        GEN,
        ["config.json", "JSON object"],
        False,
    ),
    "config_not_utf8": (
        write_text("config.json", b'{"a": "\xff"}'),
        GEN,
        ["config.json", "UTF-8"],
        False,
    ),
    "zero_layers": (
        edit_json("config.json", num_hidden_layers=0),
        GEN,
        ["num_hidden_layers", "0", ">= 1"],
        False,
    ),
    "negative_hidden": (
        edit_json("config.json", hidden_size=-64),
        GEN,
        ["hidden_size", "-64"],
        False,
    ),
    "heads_float": (
        edit_json("config.json", num_attention_heads=4.5),
        GEN,
        ["num_attention_heads", "4.5"],
        False,
    ),
    "vocab_string": (
        edit_json("config.json", vocab_size="256"),
        GEN,
        ["vocab_size", "integer"],
        False,
    ),
    "kv_heads_not_divisor": (
        edit_json("config.json", num_key_value_heads=3),
        GEN,
        ["num_key_value_heads", "divide"],
        False,
    ),
    "head_dim_odd": (edit_json("config.json", head_dim=15), GEN, ["head_dim", "even"], False),
    "rope_theta_negative": (
        edit_json("config.json", rope_theta=-1.0, rope_parameters=_DROP),
        GEN,
        ["rope_theta", "-1"],
        False,
    ),
    "rope_theta_nan": (
        edit_json("config.json", rope_theta=float("nan"), rope_parameters=_DROP),
        GEN,
        ["rope_theta", "finite"],
        False,
    ),
    "rms_norm_eps_zero": (
        edit_json("config.json", rms_norm_eps=0),
        GEN,
        ["rms_norm_eps", "> 0"],
        False,
    ),
    "sliding_window_zero": (
        edit_json("config.json", sliding_window=0),
        GEN,
        ["sliding_window", ">= 1"],
        False,
    ),
    "rope_scaling_no_factor": (
        edit_json("config.json", rope_parameters=_DROP, rope_scaling={"rope_type": "linear"}),
        GEN,
        ["factor"],
        False,
    ),
    "rope_llama3_bands": (
        edit_json(
            "config.json",
            rope_parameters=_DROP,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 4.0,
                "high_freq_factor": 1.0,
                "original_max_position_embeddings": 16,
            },
        ),
        GEN,
        ["high_freq_factor", "low_freq_factor"],
        False,
    ),
    "rope_scaling_list": (
        edit_json("config.json", rope_parameters=_DROP, rope_scaling=[8.0]),
        GEN,
        ["rope_scaling", "object"],
        False,
    ),
    "eos_string": (
        edit_json("config.json", eos_token_id="</s>"),
        GEN,
        ["eos_token_id", "token id"],
        False,
    ),
    "eos_list_of_floats": (
        edit_json("config.json", eos_token_id=[2.0]),
        GEN,
        ["eos_token_id"],
        False,
    ),
    "tie_not_bool": (
        edit_json("config.json", tie_word_embeddings="yes"),
        GEN,
        ["tie_word_embeddings"],
        False,
    ),
    # other JSON files
    "generation_temperature": (
        edit_json("generation_config.json", do_sample=True, temperature=-0.5),
        GEN,
        ["generation_config.json", "temperature"],
        False,
    ),
    "generation_top_p": (
        edit_json("generation_config.json", do_sample=True, top_p=2),
        GEN,
        ["top_p", "<= 1"],
        False,
    ),
    "generation_eos": (
        edit_json("generation_config.json", eos_token_id={"id": 2}),
        GEN,
        ["eos_token_id"],
        False,
    ),
    "tokenizer_config_list": (
        write_text("tokenizer_config.json", "[]"),
        GEN,
        ["tokenizer_config.json"],
        False,
    ),
    "chat_template_number": (
        edit_json("tokenizer_config.json", chat_template=42),
        GEN,
        ["chat_template"],
        False,
    ),
    # weights that compute garbage
    "nan_weight": (nan_weight, GEN, ["NaN", "model.layers.1.mlp.down_proj.weight"], False),
    # hostile chat templates
    "template_endless_loop": (
        template(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
        ),
        CHAT,
        ["longer than"],
        False,
    ),
    "template_huge_string": (template("{{ 'x' * 10**10 }}"), CHAT, ["limit"], False),
    "template_doubling": (
        template(
            "{% set ns = namespace(s='ab') %}{% for i in range(80) %}"
            "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}"
        ),
        CHAT,
        ["grew past"],
        False,
    ),
    "template_zero_division": (template("{{ 1 // 0 }}"), CHAT, ["ZeroDivisionError"], False),
    "template_recursion": (
        template("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
        CHAT,
        ["recursed"],
        False,
    ),
    "template_overflow": (template("{{ 10.0 ** 400 }}"), CHAT, ["OverflowError"], False),
    "template_include": (template("{% include 'other.jinja' %}"), CHAT, ["loader"], False),
    "template_type_error": (template("{{ messages + 1 }}"), CHAT, ["TypeError"], False),
    "template_format_width": (template("{{ '%999999999d' % 1 }}"), CHAT, ["format width"], False),
    "template_does_not_compile": (template("{% for %}"), CHAT, ["does not compile"], False),
}

DRIVER = r"""
import contextlib, io, json, os, resource, sys, time, traceback
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[3]), int(sys.argv[3])))
root = os.path.realpath(sys.argv[1])
cases = json.loads(open(sys.argv[2]).read())
current = {"dir": None, "outside": []}

def audit(event, args):
    if event != "open" or current["dir"] is None or not args:
        return
    if not isinstance(args[0], (str, bytes)):
        return
    p = os.path.realpath(os.fsdecode(args[0]))
    if p.startswith(root + os.sep) and not p.startswith(current["dir"] + os.sep):
        current["outside"].append(p)

sys.addaudithook(audit)
from tinyllm.cli import main
results = {}
for name, (model_dir, argv) in cases.items():
    current.update(dir=os.path.realpath(model_dir), outside=[])
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv + ["--model", model_dir, "--backend", "numpy"])
        except BaseException:
            rc, tb = "exception", traceback.format_exc()
            err.write(tb)
    results[name] = {"rc": rc, "stderr": err.getvalue(), "seconds": time.perf_counter() - t0,
                     "outside": current["outside"]}
current["dir"] = None
results["_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def outcomes(tiny_factory, tmp_path_factory):
    """Build every broken directory, run every case in one guarded child; name -> result."""
    root = tmp_path_factory.mktemp("untrusted")
    (root / "outside").mkdir()
    src = tiny_factory("llama_gqa")
    shutil.copy(
        src / "model.safetensors", root / "outside" / "secret.safetensors"
    )  # loads if ever read
    cases = {}
    for name, (build, argv, _, _) in CASES.items():
        d = root / name
        shutil.copytree(src, d)
        build(d)
        cases[name] = (str(d), list(argv))
    spec = root / "cases.json"
    spec.write_text(json.dumps(cases))
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    env = {
        "PYTHONPATH": str(REPO),
        "PATH": "/usr/bin:/bin",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HOME": str(root),
    }
    p = subprocess.run(
        [sys.executable, str(driver), str(root), str(spec), str(MEMORY_LIMIT)],
        capture_output=True,
        text=True,
        timeout=60 + TIME_LIMIT * len(CASES) / 4,
        env=env,
        cwd=root,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return root, json.loads(p.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_model_is_one_clean_error(outcomes, name):
    root, results = outcomes
    r = results[name]
    words = CASES[name][2]
    assert "Traceback" not in r["stderr"], r["stderr"]
    assert r["rc"] == 2, r["stderr"]
    lines = [ln for ln in r["stderr"].splitlines() if ln.startswith("tinyllm: error:")]
    assert len(lines) == 1, r["stderr"]
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    assert r["outside"] == [], f"read outside the model directory: {r['outside']}"
    assert r["seconds"] < TIME_LIMIT
    assert SECRET.decode()[:8] not in r["stderr"]  # no file bytes echoed
    assert str(int.from_bytes(SECRET[:8], "little")) not in r["stderr"]


def test_memory_stayed_bounded(outcomes):
    """Every case ran under RLIMIT_AS (a bomb would have raised MemoryError, a traceback);
    the peak resident size of the whole run stays far below it."""
    _, results = outcomes
    assert results["_maxrss_kb"] * 1024 < MEMORY_LIMIT / 2


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c[3]))
def test_the_safetensors_library_rejects_each_bad_file_too(outcomes, name):
    """The independent reference: safetensors' own parser refuses every file we refuse."""
    from safetensors import safe_open

    root, _ = outcomes
    with pytest.raises(Exception):  # noqa: B017  (safetensors raises several error types)
        with safe_open(str(root / name / "model.safetensors"), framework="numpy"):
            pass


def test_the_unbroken_copy_loads(tiny_factory, tmp_path):
    """The cases differ from a working model only by what each breaks."""
    from tinyllm import LLM

    d = tmp_path / "ok"
    shutil.copytree(tiny_factory("llama_gqa"), d)
    LLM(str(d)).generate([[1, 2, 3]])


def test_symlinked_files_still_load(tiny_factory, tmp_path):
    """The Hugging Face cache links every file of a snapshot into its blobs/ folder."""
    from tinyllm import LLM

    src = tiny_factory("llama_gqa", shard=True)
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / f.name)
    assert (snap / "model.safetensors.index.json").is_symlink()
    ref = LLM(str(src)).generate([[1, 2, 3]])[0].token_ids
    assert LLM(str(snap)).generate([[1, 2, 3]])[0].token_ids == ref
