"""GPU memory refusals name the flag at fault (issue #25, item 11's GPU side): a pool sized by
--kv-cache-memory, or a --block-size whose whole blocks do not fit where the default's do, is
named; --ctx-size/--max-batch are suggested only when they are what does not fit. A stand-in
backend reports free memory and refuses with cuda_backend.fits_message, the real message."""

from __future__ import annotations

import pytest

from tinyllm import memory
from tinyllm.backends import cuda_backend as cb
from tinyllm.config import ModelConfig
from tinyllm.errors import TinyLLMError
from tinyllm.kv_cache import KVCacheSpec

MB = 1 << 20


class FakeGPU:
    def __init__(self, free: int):
        self.free = free

    def free_memory(self) -> int:
        return self.free

    def check_fits(self, weight_bytes, kv_bytes=0, working=0, **kw):
        msg = cb.fits_message(weight_bytes, kv_bytes, self.free, working, **kw)
        if msg:
            raise TinyLLMError(f"{msg} (fake GPU)")


@pytest.fixture(scope="module")
def cfg(tiny_factory):
    return ModelConfig.load(tiny_factory("llama_gqa"))


def spec(cfg, ctx: int, block_size: int, n_blocks=None, batch: int = 1) -> KVCacheSpec:
    return KVCacheSpec.for_model(cfg, "bf16", ctx, batch, block_size=block_size, n_blocks=n_blocks)


def pool_refusal(full: KVCacheSpec, room: int) -> str:
    """gpu_pool_blocks' refusal with `room` bytes left for the pool (no working memory)."""
    free = int(room / memory.GPU_MEMORY_UTILIZATION) + 1
    with pytest.raises(TinyLLMError) as e:
        memory.gpu_pool_blocks(FakeGPU(free), full, 0, 0)
    return str(e.value)


def test_default_pool_names_block_size_when_the_default_fits(cfg):
    """A context of 1040 tokens in blocks of 256 takes 5 blocks (1280 tokens); in blocks of 16,
    65 (1040 tokens). Room for 1100 tokens: --block-size is at fault, not the context."""
    full = spec(cfg, 1040, 256)
    per_token = full.block_nbytes() // 256
    msg = pool_refusal(full, 1100 * per_token)
    assert "--block-size 256 is what does not fit" in msg and "default 16 does" in msg, msg
    assert "--ctx-size" not in msg and "--max-batch" not in msg, msg
    # room for 1000 tokens: not even the default block size fits, so the context is at fault
    msg = pool_refusal(full, 1000 * per_token)
    assert "lower --ctx-size or --max-batch" in msg and "--block-size 256 is" not in msg, msg
    # the default block size itself: the context is at fault
    msg = pool_refusal(spec(cfg, 1040, 16), 1000 * per_token)
    assert "lower --ctx-size or --max-batch" in msg, msg


def test_explicit_pool_names_kv_cache_memory(cfg):
    """A --kv-cache-memory pool larger than the GPU's room: the refusal names that flag and how
    much fits; neither a longest context nor a --max-batch (neither shrinks the pool)."""

    def spec_of(batch, n_blocks):
        return spec(cfg, 256, 16, n_blocks, batch)

    n_blocks = (64 * MB) // spec_of(1, 1).block_nbytes()  # a 64 MB pool
    fixed = memory.weights_nbytes(cfg, 2) + memory.gpu_working_estimate(cfg, 512, 4)
    gpu = FakeGPU(fixed + 16 * MB)
    with pytest.raises(TinyLLMError) as e:
        memory.check_gpu_fits(gpu, cfg, spec_of, 4, n_blocks, 512, lambda b: 0)
    msg = str(e.value)
    assert "the --kv-cache-memory pool takes 64.0 MiB: at most 16.0 MiB fits" in msg, msg
    assert "--max-batch" not in msg and "longest context" not in msg, msg
    # the default pool (one sequence's ring before loading) fits in the same memory
    memory.check_gpu_fits(gpu, cfg, spec_of, 4, None, 512, lambda b: 0)
