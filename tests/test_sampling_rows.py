"""sampling.sample_rows (a step's plain rows drawn together) against sampling.sample, the
per-row reference: the same token for every row, greedy and at several temperatures, with
ties, a peaked row and a flat one, and RNG streams left where sample() leaves them."""

from __future__ import annotations

import numpy as np
import pytest

from tinyllm.sampling import SamplingParams, sample, sample_rows, unfiltered


@pytest.mark.parametrize("temperature", [0.0, 0.3, 1.0, 1.7])
@pytest.mark.parametrize("vocab", [7, 256, 5000])
def test_sample_rows_equals_sample_row_by_row(temperature, vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.normal(0, 3, (9, vocab)).astype(np.float32)
    logits[1] = 0.0  # all tied: argmax takes the first, the draw is uniform
    logits[2, 3] = 60.0  # one token takes (almost) all the mass
    logits[3, :2] = logits[3].max() + 1  # a tie at the top
    params = SamplingParams(temperature=temperature)
    assert unfiltered(params)
    seeds = range(100, 109)
    got = sample_rows(logits, temperature, [np.random.default_rng(s) for s in seeds])
    for _ in range(3):  # and again from where each stream stands now
        mine = [np.random.default_rng(s) for s in seeds]
        theirs = [np.random.default_rng(s) for s in seeds]
        got = sample_rows(logits, temperature, mine)
        want = [sample(row, params, r, np.zeros(0, np.int64)) for row, r in zip(logits, theirs)]
        assert got == want
        assert [r.random() for r in mine] == [r.random() for r in theirs]
        logits = np.roll(logits, 1, axis=1)


def test_unfiltered_names_what_sample_would_change():
    assert unfiltered(SamplingParams(temperature=0, top_k=5, top_p=0.5))  # greedy: no filters
    assert not unfiltered(SamplingParams(temperature=0, repetition_penalty=1.2))
    assert not unfiltered(SamplingParams(temperature=0.8, top_k=40))
    assert not unfiltered(SamplingParams(temperature=0.8, top_p=0.9))
    assert unfiltered(SamplingParams(temperature=0.8, top_k=0, top_p=1.0, repetition_penalty=1.0))
