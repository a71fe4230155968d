"""Resumable streaming: Moments written as they grow, so an interrupted run continues where it stopped.

The datapoints are streamed in groups of chunks; after each group the running Moments and the number of
datapoints done are saved atomically to the checkpoint. A later call with the same checkpoint, the same
layers and options loads it and streams only the datapoints not done yet: finished chunks are not read
again. A finished checkpoint is simply the full Moments.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import dask.base
import numpy as np
import xarray as xr

from .moments import Moments
from .pairs import Streamed, reading
from .stream import stream_moments


def _fingerprint(streamed: Streamed, options: dict[str, Any]) -> str:
    """What the saved statistics were computed from: each layer's name, shape, dtype and Dask token (which
    hashes in-memory data and names store-backed data by file), the adapters (every field, by Dask token)
    and the options."""
    layers = [(str(layer.name), list(layer.shape), str(layer.dtype), layer.data.name)
              for layer in (streamed.layer_a, streamed.layer_b)]
    adapters = [dask.base.tokenize(adapter) for adapter in streamed.adapters]
    return json.dumps({"layers": layers, "adapters": adapters, **dict(sorted(options.items()))}, default=str)


def load_progress(path: str | os.PathLike) -> tuple[Moments, int, str]:
    """The Moments saved in a checkpoint, the datapoints they cover and the run's fingerprint."""
    with xr.open_zarr(path, consolidated=False) as saved:
        done, fingerprint = int(saved.attrs["datapoints_done"]), str(saved.attrs["fingerprint"])
    return Moments.load(path), done, fingerprint


def stream_with_checkpoint(streamed: Streamed, path: str | os.PathLike, *, every: int, stride: int, precision: str,
                           split_every: int, scheduler: Any, progress: bool, nan_policy: str,
                           row_norms: bool) -> Moments:
    """Stream ``streamed``'s layers ``every`` chunks at a time, saving the running Moments to ``path`` after each."""
    path = Path(path)
    layer_a, layer_b, adapters = streamed.layer_a, streamed.layer_b, streamed.adapters
    options = {"spatial": adapters[0].kind, "stride": stride, "precision": precision, "nan_policy": nan_policy,
               "row_norms": row_norms}
    fingerprint = _fingerprint(streamed, options)
    total, done = None, 0  # as_activations refuses empty layers, so a fresh run streams at least one chunk
    if path.exists():
        total, done, saved_fingerprint = load_progress(path)
        if saved_fingerprint != fingerprint:
            raise ValueError(f"checkpoint {path} belongs to another run ({saved_fingerprint}); this run is "
                             f"{fingerprint}. Remove it or pass another path")
    boundaries = [0, *np.cumsum(layer_a.data.chunks[0]).tolist()]
    if done not in boundaries:
        raise ValueError(f"checkpoint {path} stopped after datapoint {done}, which is not a chunk boundary of "
                         f"layer {layer_a.name!r} now; stream with the chunking it was made with")
    edges = boundaries[boundaries.index(done) :: every]
    if edges[-1] != boundaries[-1]:
        edges.append(boundaries[-1])
    names = (str(layer_a.name), str(layer_b.name))
    for start, stop in itertools.pairwise(edges):
        with reading((layer_a, layer_b)):
            part = stream_moments([layer_a.data[start:stop], layer_b.data[start:stop]], adapters, stride=stride,
                                  precision=precision, split_every=split_every, scheduler=scheduler,
                                  progress=progress, nan_policy=nan_policy, names=names, row_norms=row_norms,
                                  offset=start)
        total = part if total is None else total + part
        _save_progress(total, path, stop, fingerprint)
    if total.n == 0:
        raise ValueError(f"every row of layers {layer_a.name!r}, {layer_b.name!r} holds NaN or Inf; nothing is left")
    return total


def _save_progress(moments: Moments, path: Path, done: int, fingerprint: str) -> None:
    moments.save(path, overwrite=True, attrs={"datapoints_done": done, "fingerprint": fingerprint})
