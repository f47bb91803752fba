"""Bad input: the CLI prints one line naming the problem, exits non-zero, no traceback."""

import json
import shutil
import subprocess
import sys

import pytest


def run_cli(*args, timeout=120):
    p = subprocess.run(
        [sys.executable, "-m", "tinyllm", *args], capture_output=True, text=True, timeout=timeout
    )
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(rc, err, *words):
    assert rc != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("tinyllm: error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


@pytest.fixture
def broken(tmp_path, tiny_factory):
    """A writable copy of a tiny checkpoint to break in each test."""
    d = tmp_path / "model"
    shutil.copytree(tiny_factory("llama_gqa"), d)
    return d


def generate(d):
    return run_cli("generate", "--model", str(d), "--prompt", "hi", "--backend", "numpy", "-n", "2")


def test_missing_directory(tmp_path):
    rc, _, err = generate(tmp_path / "nope")
    assert_one_line_error(rc, err, "does not exist")


def test_missing_config(broken):
    (broken / "config.json").unlink()
    rc, _, err = generate(broken)
    assert_one_line_error(rc, err, "config.json")


def test_unsupported_architecture(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (broken / "config.json").write_text(json.dumps(cfg))
    rc, _, err = generate(broken)
    assert_one_line_error(
        rc, err, "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"
    )


def test_unsupported_rope_type(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "longrope", "factor": 2.0}
    cfg.pop("rope_parameters", None)
    (broken / "config.json").write_text(json.dumps(cfg))
    rc, _, err = generate(broken)
    assert_one_line_error(rc, err, "longrope", "llama3")


def _rewrite_tensors(d, edit):
    import ml_dtypes  # noqa: F401
    from safetensors.numpy import load_file, save_file

    t = load_file(str(d / "model.safetensors"))
    edit(t)
    save_file(t, str(d / "model.safetensors"))


def test_missing_tensor(broken):
    _rewrite_tensors(broken, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    rc, _, err = generate(broken)
    assert_one_line_error(rc, err, "missing", "model.layers.1.mlp.up_proj.weight")


def test_wrong_shape(broken):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][
            :-1
        ]

    _rewrite_tensors(broken, edit)
    rc, _, err = generate(broken)
    assert_one_line_error(rc, err, "mis-shaped", "model.layers.0.self_attn.k_proj.weight")


def test_truncated_safetensors(broken):
    f = broken / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    rc, _, err = generate(broken)
    assert_one_line_error(rc, err, "truncated", "model.safetensors")


def test_garbage_safetensors(broken):
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    rc, _, err = generate(broken)
    assert_one_line_error(rc, err, "model.safetensors")


def test_bad_sampling_flag(broken):
    rc, _, err = run_cli(
        "generate", "--model", str(broken), "--prompt", "hi", "--backend", "numpy", "--top-p", "1.5"
    )
    assert_one_line_error(rc, err, "top_p")


def test_cuda_without_gpu_is_a_clear_error(broken):
    from tinyllm.backends import cuda_available

    if cuda_available():
        pytest.skip("a GPU is present")
    rc, _, err = run_cli("generate", "--model", str(broken), "--prompt", "hi", "--backend", "cuda")
    assert_one_line_error(rc, err, "cuda")
    assert "pip install" in err or "GPU" in err
