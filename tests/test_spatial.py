"""Spatial adapters on single blocks: the global row pattern survives any chunking."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import avgpool_rows, flatten_rows

from chunkcca.spatial import block_rows, row_count


@given(datapoints=st.integers(1, 30), height=st.integers(1, 5), width=st.integers(1, 5),
       stride=st.integers(1, 9), cuts=st.lists(st.integers(1, 29), max_size=5),
       spatial=st.sampled_from(["flatten", "avgpool"]))
def test_blocks_reassemble_the_global_strided_rows(datapoints, height, width, stride, cuts, spatial):
    acts = np.arange(datapoints * height * width * 2, dtype=np.float64).reshape(datapoints, height, width, 2)
    edges = sorted({0, datapoints, *[c for c in cuts if c < datapoints]})
    got = np.concatenate([block_rows(acts[a:b], spatial, a, stride) for a, b in itertools.pairwise(edges)])
    want = flatten_rows(acts, stride) if spatial == "flatten" else avgpool_rows(acts, stride)
    np.testing.assert_array_equal(got, want)
    assert got.shape[0] == row_count(spatial, acts.shape, stride)


def test_flatten_is_a_view_and_keeps_every_other_pixel_column():
    acts = np.arange(1 * 2 * 4 * 1, dtype=np.float32).reshape(1, 2, 4, 1)
    rows = block_rows(acts, "flatten", 0, 2)
    assert np.shares_memory(rows, acts)
    np.testing.assert_array_equal(rows[:, 0], [0, 2, 4, 6])


def test_fully_connected_rows_are_datapoints():
    acts = np.arange(12.0).reshape(6, 2)
    np.testing.assert_array_equal(block_rows(acts[3:], "flatten", 3, 2), acts[4::2])
    assert row_count("flatten", acts.shape, 4) == 2


def test_unknown_adapter_is_named():
    with pytest.raises(ValueError, match="unknown spatial adapter 'fft'"):
        block_rows(np.zeros((1, 2)), "fft", 0, 1)
