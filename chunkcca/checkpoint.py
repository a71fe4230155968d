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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.base
import xarray as xr

from .moments import Moments
from .spatial import Adapter
from .store import store_signature
from .stream import common_boundaries, connected, stream_moments


class CheckpointError(ValueError):
    """A checkpoint that this run cannot resume (another run's, or not a checkpoint)."""


def _fingerprint(layers: Sequence[xr.DataArray], adapters: Sequence[Adapter], options: dict[str, Any]) -> str:
    """What the saved statistics were computed from: each layer's name, shape, dtype, Dask token (which
    hashes in-memory data and names store-backed data by path) and, for store-backed layers, the hash of
    their files' names, sizes and modification times (so a rewritten or edited store is another run);
    the adapters (every field, by Dask token) and the options."""
    described = [(str(layer.name), list(layer.shape), str(layer.dtype), layer.data.name, store_signature(layer))
                 for layer in layers]
    tokens = [dask.base.tokenize(adapter) for adapter in adapters]
    return json.dumps({"layers": described, "adapters": tokens, **dict(sorted(options.items()))}, default=str)


def _difference(saved: str, current: str) -> str:
    """What differs between a checkpoint's fingerprint and this run's, in words."""
    before, now = json.loads(saved), json.loads(current)
    fields = ("name", "shape", "dtype", "Dask name", "files")
    if len(before.get("layers", [])) != len(now["layers"]):
        return f"it has {len(before.get('layers', []))} layers, this run {len(now['layers'])}"
    changed = [f"{key} {before.get(key)!r} then, {now[key]!r} now" for key in now
               if key not in ("layers", "adapters") and before.get(key) != now[key]]
    if changed:
        return "; ".join(changed)
    for old_layer, new_layer in zip(before["layers"], now["layers"]):
        for field, was, is_now in zip(fields, old_layer, new_layer):
            if was != is_now:
                if field == "files":
                    return f"the files of layer {new_layer[0]!r} changed since (its store was rewritten or edited)"
                if field == "Dask name":
                    return f"layer {new_layer[0]!r} holds other data (or is computed otherwise) than then"
                return f"layer {new_layer[0]!r} has another {field} ({was} then, {is_now} now)"
    if before.get("adapters") != now["adapters"]:
        return "the spatial adapters differ (spatial sizes, frequencies, interpolation or spectrum dtype)"
    return "its fingerprint differs"


def load_progress(path: str | os.PathLike) -> tuple[Moments, int, str]:
    """The Moments saved in a checkpoint, the datapoints they cover and the run's fingerprint."""
    with xr.open_zarr(path, consolidated=False, chunks=None) as saved:
        if "datapoints_done" not in saved.attrs or "fingerprint" not in saved.attrs:
            raise CheckpointError(f"{path} is not a chunkcca checkpoint (saved Moments without a run's progress); "
                             f"pass another checkpoint path")
        done, fingerprint = int(saved.attrs["datapoints_done"]), str(saved.attrs["fingerprint"])
    return Moments.load(path), done, fingerprint


def stream_with_checkpoint(layers: Sequence[xr.DataArray], adapters: Sequence[Adapter], path: str | os.PathLike, *,
                           every: int, stride: int, precision: str, nan_policy: str, row_norms: bool,
                           **stream_options: Any) -> Moments:
    """Stream aligned layers ``every`` datapoint chunks at a time, saving the running Moments to ``path`` after
    each group; a checkpoint of the same run is resumed after the datapoints it covers. ``stream_options``
    (split_every, scheduler, progress, names) go to :func:`~chunkcca.stream.stream_moments`."""
    path = Path(path)
    options = {"spatial": adapters[0].kind, "stride": stride, "precision": precision, "nan_policy": nan_policy,
               "row_norms": row_norms}
    fingerprint = _fingerprint(layers, adapters, options)
    total, done = None, 0  # as_activations refuses empty layers, so a fresh run streams at least one chunk
    if path.exists():
        total, done, saved_fingerprint = load_progress(path)
        if saved_fingerprint != fingerprint:
            raise CheckpointError(f"checkpoint {path} belongs to another run: "
                                  f"{_difference(saved_fingerprint, fingerprint)}. Remove it or pass another path")
    boundaries = common_boundaries([layer.data for layer in layers])  # groups never split a layer's chunk
    if done not in boundaries:
        raise CheckpointError(f"checkpoint {path} stopped after datapoint {done}, which is not a chunk boundary of "
                              f"every layer now; stream with the chunking it was made with")
    edges = boundaries[boundaries.index(done) :: every]
    if edges[-1] != boundaries[-1]:
        edges.append(boundaries[-1])
    with connected(stream_options.pop("scheduler", None)) as scheduler:  # an address: one connection
        for start, stop in itertools.pairwise(edges):
            part = stream_moments([layer.data[start:stop] for layer in layers], adapters, stride=stride,
                                  precision=precision, nan_policy=nan_policy, row_norms=row_norms, offset=start,
                                  scheduler=scheduler, **stream_options)
            total = part if total is None else total + part
            _save_progress(total, path, stop, fingerprint)
    assert total is not None
    return total


def _save_progress(moments: Moments, path: Path, done: int, fingerprint: str) -> None:
    moments.save(path, overwrite=True, attrs={"datapoints_done": done, "fingerprint": fingerprint})
