"""Recording activations from a PyTorch model into a store, batch by batch (torch is an optional extra).

Forward hooks catch each chosen module's output, NCHW → (datapoint, height, width, channel). Each layer's
batches are gathered in a buffer of one zarr chunk and appended a whole chunk at a time (the rest when
recording ends), so no more than one chunk per layer and one batch are ever held, and no chunk is written
twice: appending batches smaller than a chunk would make zarr read, decode and rewrite the partial last
chunk on every batch. The store is written to a temporary folder and renamed into place when recording ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .layers import CONV_DIMS, FC_DIMS, VARIABLE, datapoints_per_chunk
from .rows import pixel_centres
from .store import WriteMode, check_new_layers, codecs_for, open_activations, write_store


def _modules(model: Any, layers: Mapping[str, Any] | Sequence[str]) -> dict[str, Any]:
    """Store path → module, from module names (``"features.0"``) or modules themselves."""
    named = dict(model.named_modules())
    if not isinstance(layers, Mapping):
        layers = {str(name).replace(".", "/"): name for name in layers}
    modules = {}
    for path, module in layers.items():
        if isinstance(module, str):
            if module not in named:
                raise ValueError(f"layer {path!r}: the model has no module {module!r}; it has "
                                 f"{', '.join(n for n in named if n) or 'none'}")
            module = named[module]
        modules[str(path).strip("/")] = module
    if not modules:
        raise ValueError("record needs at least one layer")
    return modules


def _channels_last(output: Any, path: str) -> np.ndarray:
    array = output.detach().cpu().numpy()
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(0, 2, 3, 1))
    if array.ndim == 2:
        return array
    raise ValueError(f"layer {path!r} gives outputs of shape {tuple(array.shape)}; expected (N, C, H, W) or (N, C)")


class _ChunkWriter:
    """Appends one layer's batches to a zarr array in whole chunks only, through a buffer of one chunk."""

    def __init__(self, array: Any, path: str) -> None:
        self.array, self.path = array, path
        self.per_chunk = array.chunks[0]
        self.buffer = np.empty((self.per_chunk, *array.shape[1:]), dtype=array.dtype)
        self.filled = 0

    def add(self, values: np.ndarray) -> None:
        if values.shape[1:] != self.buffer.shape[1:]:
            raise ValueError(f"layer {self.path!r} gave outputs of shape {tuple(values.shape)} after outputs of "
                             f"shape (N, {', '.join(map(str, self.buffer.shape[1:]))})")
        start = 0
        while start < len(values):
            if self.filled == 0 and len(values) - start >= self.per_chunk:  # whole chunks straight from the batch
                stop = start + (len(values) - start) // self.per_chunk * self.per_chunk
                self.array.append(values[start:stop], axis=0)
                start = stop
                continue
            taken = min(self.per_chunk - self.filled, len(values) - start)
            self.buffer[self.filled : self.filled + taken] = values[start : start + taken]
            self.filled += taken
            start += taken
            if self.filled == self.per_chunk:
                self.flush()

    def flush(self) -> None:
        """Append what the buffer holds (a whole chunk, or the last, partial one at the end)."""
        if self.filled:
            self.array.append(self.buffer[: self.filled], axis=0)
            self.filled = 0


def record(model: Any, layers: Mapping[str, Any] | Sequence[str], batches: Iterable[Any],
           path: str | os.PathLike, *, datapoints: Sequence[Any] | None = None, mode: WriteMode = "w",
           chunks: int | str = "auto", compression: str | None = "lz4", overwrite: bool = False) -> xr.DataTree:
    """Run ``model`` over ``batches`` and write the outputs of ``layers`` to a store at ``path``.

    Parameters
    ----------
    model
        A ``torch.nn.Module``; it is put in eval mode and run under ``torch.inference_mode()``.
    layers
        Module names (``["features.0", "classifier.1"]``, stored as ``features/0``…) or a mapping of store
        path → module name or module.
    batches
        Input tensors, or tuples/lists whose first element is the input (e.g. a ``DataLoader``). For image
        inputs (N, C, H, W) the layers' ``height``/``width`` coordinates are pixel centres in input pixels.
    datapoints
        Labels of the datapoints, in order (default 0, 1, …).
    mode
        "w": a new store (``overwrite`` replaces an existing one); "a": add the layers to the existing store at
        ``path`` (e.g. a second model's, recorded on the same inputs) without touching its own; a layer path
        it holds already is an error, raised before the model runs.
    chunks, compression, overwrite
        As for [`chunkcca.write_activations()`][chunkcca.write_activations].

    Returns
    -------
    xarray.DataTree
        The store, opened lazily, its layers in the order ``layers`` names them.
    """
    import torch
    import zarr

    modules = _modules(model, layers)
    compressors = codecs_for(compression)
    check_new_layers(path, list(modules), mode=mode, overwrite=overwrite)
    captured: dict[str, np.ndarray] = {}
    hooks = [module.register_forward_hook(lambda _m, _i, output, path=path: captured.__setitem__(
        path, _channels_last(output, path))) for path, module in modules.items()]
    count = {"datapoints": 0}
    image: dict[str, tuple[int, int]] = {}

    def build(tmp: Path, stored: tuple[int, int] | None) -> tuple[list[str], tuple[int, int] | None]:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        arrays: dict[str, Any] = {}
        writers: dict[str, _ChunkWriter] = {}
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for batch in batches:
                    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                    if inputs.ndim == 4:
                        image.setdefault("size", (int(inputs.shape[2]), int(inputs.shape[3])))
                    captured.clear()
                    model(inputs)
                    for path in modules:
                        if path not in captured:
                            raise ValueError(f"layer {path!r} produced no output for this batch")
                        values = captured[path]
                        if path not in arrays:
                            per_chunk = datapoints_per_chunk(values.shape, values.dtype.itemsize, chunks)
                            arrays[path] = root.create_array(
                                f"{path}/{VARIABLE}", shape=(0, *values.shape[1:]), dtype=values.dtype,
                                chunks=(per_chunk, *values.shape[1:]), compressors=compressors,
                                dimension_names=CONV_DIMS if values.ndim == 4 else FC_DIMS)
                            writers[path] = _ChunkWriter(arrays[path], path)
                        writers[path].add(values)
                    count["datapoints"] += len(next(iter(captured.values())))
        finally:
            model.train(was_training)
        for writer in writers.values():
            writer.flush()
        if not arrays:
            raise ValueError("record got no batches")
        labels = np.arange(count["datapoints"]) if datapoints is None else np.asarray(datapoints)
        if labels.shape != (count["datapoints"],):
            raise ValueError(f"datapoints has {labels.size} labels for {count['datapoints']} recorded datapoints")
        extent = stored or image.get("size")
        for path, array in arrays.items():
            _write_coords(root[path], array.shape, labels, extent)
        return list(modules), extent

    try:
        write_store(path, build, mode=mode, overwrite=overwrite)
    finally:
        for hook in hooks:
            hook.remove()
    return open_activations(path)


def _write_coords(group: Any, shape: tuple[int, ...], labels: np.ndarray,
                  image_size: tuple[int, int] | None) -> None:
    """Coordinates of one recorded layer: datapoint labels, channel indices, and pixel centres in input-image
    units (pixel i of an s-pixel map at (i + 0.5) · image / s; the map's own pixels if the input is not an image)."""
    coords = {"datapoint": labels, "channel": np.arange(shape[-1])}
    if len(shape) == 4:
        extent = image_size or shape[1:3]
        coords["height"], coords["width"] = pixel_centres(shape[1], extent[0]), pixel_centres(shape[2], extent[1])
    for name, values in coords.items():
        values = np.asarray(values)
        if values.dtype.kind in "UO":  # variable-length strings have a stable zarr v3 spec; fixed-width do not
            group.create_array(name, shape=values.shape, dtype=str, dimension_names=(name,))[:] = values.astype(object)
        else:
            group.create_array(name, data=values, dimension_names=(name,))
