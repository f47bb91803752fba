"""A pytest plugin (not a test module) for the negative checks of tests/test_cuda_host.py:
loaded into a run on the CuPy stand-in with `-p plumbing_bugs`, it plants one deliberate
host-side bug in the CUDA backend, named by FAKECUPY_BUG, so that the check can show that the
stand-in catches that kind of bug."""

import os

import numpy as np


def corrupt_launches(prefix, corrupt):
    """A bug: every launch of the kernels named prefix* gets its argument tuple corrupted."""
    def plant():
        from tinyllm.backends import cuda_kernels as ck
        get = ck.get

        def buggy_get(filename, name, smem=0, **extra):
            kernel = get(filename, name, smem, **extra)
            if not name.startswith(prefix):
                return kernel
            return lambda grid, block, args, **kw: kernel(grid, block, corrupt(args), **kw)

        ck.get = buggy_get
    return plant


def forget_upload_events():
    """A bug: upload() forgets the events of earlier uploads' copies, so it refills a pinned
    staging buffer without waiting for the copy that is still reading it."""
    from tinyllm.backends.cuda_backend import CudaBackend
    upload = CudaBackend.upload

    def buggy_upload(self, name, a):
        self._pinned_events = [None, None]
        return upload(self, name, a)

    CudaBackend.upload = buggy_upload


def graph_positions_as_scalars():
    """A bug: a decode graph's launch geometry comes from the step it was captured in (its
    positions), not from the longest range: the decode split length and count, scalar launch
    arguments, replay stale once the sequences grow past what they covered."""
    import cupy as cp
    from tinyllm.backends import Batch
    from tinyllm.backends import cuda_graphs as cg
    from tinyllm.backends.cuda_backend import CudaBatch
    write = cg._Graph.write

    def buggy_write(self, tokens, batch, *rest):
        write(self, tokens, batch, *rest)
        if self.graph is None:                   # about to be captured: geometry of this step
            pad = np.minimum(np.arange(self.rows), len(batch.lens) - 1)
            self.batch = CudaBatch(Batch(batch.tables[pad], batch.starts[pad], np.ones(self.rows, np.int32)),
                                   cp)
            self.batch.bind(self.d["meta"])

    cg._Graph.write = buggy_write


def graph_upload_in_capture():
    """A bug: the captured step uploads this step's token ids itself (cupy.asarray inside the
    capture) instead of reading the static input buffer written before the replay."""
    import cupy as cp
    from tinyllm.backends import cuda_graphs as cg

    def buggy_forward(self, g, model, cache):
        d = g.d
        logits = model.forward(cp.asarray(np.array(g.h["tokens"])), g.batch, cache)
        self.be.sample_into(logits, d["temperature"], d["top_k"], d["top_p"], d["seeds"], d["steps"], g.out)

    cg.DecodeGraphs._forward = buggy_forward


BUGS = {
    # k and v caches swapped: same dtype and shape, only the emulated semantics can tell
    "kv_swapped": corrupt_launches("flash_prefill_hd", lambda a: a[:2] + (a[3], a[2]) + a[4:]),
    # row stride one 8-element vector too long: the last row reads past its buffer
    "row_stride": corrupt_launches("rms_norm_bf16", lambda a: a[:1] + (np.int32(a[1] + 8),) + a[2:]),
    # N passed as a 64-bit integer to an int parameter: the signature check
    "int64_scalar": corrupt_launches("gemv_bf16_", lambda a: a[:6] + (np.int64(a[6]),) + a[7:]),
    # split length halved: the decode splits no longer cover every key
    "short_splits": corrupt_launches("decode_split_hd", lambda a: a[:-1] + (np.int32(a[-1] // 2),)),
    # a pinned staging buffer reused while its copy may be in flight
    "upload_no_wait": forget_upload_events,
    # a decode graph's split geometry (scalar arguments) from the positions it was captured at
    "graph_scalar_positions": graph_positions_as_scalars,
    # a decode graph uploading its inputs inside the capture
    "graph_upload_in_capture": graph_upload_in_capture,
}


def pytest_configure(config):
    BUGS[os.environ["FAKECUPY_BUG"]]()
