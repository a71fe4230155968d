"""Recording activations from a PyTorch model into a store, batch by batch (torch is an optional extra).

Forward hooks catch each chosen module's output and lay it out channels-last: (N, C, H, W) → (datapoint,
height, width, channel), a 1-d conv's (N, C, L) → (datapoint, time, channel), a 3-d conv's (N, C, D, H, W) →
(datapoint, depth, height, width, channel); a transformer's (N, T, C) stays (datapoint, token, channel), and
the batch's attention mask becomes the layer's padding mask. Each layer's
batches are gathered in a buffer of one zarr chunk and appended a whole chunk at a time (the rest when
recording ends), so no more than one chunk per layer and one batch are ever held, and no chunk is written
twice: appending batches smaller than a chunk would make zarr read, decode and rewrite the partial last
chunk on every batch. The store is written to a temporary folder and renamed into place when recording ends.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .layers import CONV_DIMS, FC_DIMS, VARIABLE, datapoints_per_chunk
from .options import MASK
from .store import (
    WriteMode,
    check_new_layers,
    codecs_for,
    default_coords,
    every_chunk_written,
    open_activations,
    write_store,
)


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


def first_tensor(output: Any) -> Any:
    """The tensor recorded of a module's output: the output itself, the first tensor of a tuple or list, or of a
    dict or model-output object its ``last_hidden_state`` if it has one, else its first tensor value."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("last_hidden_state"), torch.Tensor):
            return output["last_hidden_state"]
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            found = first_tensor(item) if isinstance(item, (tuple, list, Mapping, torch.Tensor)) else None
            if found is not None:
                return found
    return None


def _channels_last(output: Any, module: Any, path: str, select: Any) -> tuple[np.ndarray, tuple[str, ...]]:
    """A module's output as (datapoint, *positions, channel) and its dims (see the module docstring)."""
    tensor = select(output)
    if tensor is None:
        raise ValueError(f"layer {path!r} gives a {type(output).__name__} holding no tensor; pass output= to say "
                         f"which to record")
    if getattr(tensor, "is_nested", False):  # PyTorch's transformer fast path leaves padding out: put it back
        tensor = tensor.to_padded_tensor(0.0)
    array = tensor.detach().cpu().numpy()
    one_d = type(module).__name__.endswith("1d")  # Conv1d, MaxPool1d, BatchNorm1d…: (N, C, L)
    if array.ndim == 2:
        return array, FC_DIMS
    if array.ndim == 3:
        if one_d:
            return np.ascontiguousarray(array.transpose(0, 2, 1)), ("datapoint", "time", "channel")
        return array, ("datapoint", "token", "channel")
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(0, 2, 3, 1)), CONV_DIMS
    if array.ndim == 5:
        return np.ascontiguousarray(array.transpose(0, 2, 3, 4, 1)), ("datapoint", "depth", "height", "width",
                                                                      "channel")
    raise ValueError(f"layer {path!r} gives outputs of shape {tuple(array.shape)}; expected (N, C), (N, T, C), "
                     f"(N, C, L), (N, C, H, W) or (N, C, D, H, W)")


def attention_mask(batch: Any) -> Any:
    """A batch's attention mask: its ``"attention_mask"`` entry when the batch is a dict, else None."""
    return batch.get("attention_mask") if isinstance(batch, Mapping) else None


def _call(model: Any, batch: Any) -> Any:
    """Run the model on a batch: a dict as keyword arguments, a tuple or list by its first element (e.g. a
    ``DataLoader``'s (inputs, targets)), else the batch itself; returns the inputs."""
    if isinstance(batch, Mapping):
        model(**batch)
        return next(iter(batch.values()))
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    model(inputs)
    return inputs


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
           output: Callable[[Any], Any] = first_tensor, mask: Callable[[Any], Any] | None = attention_mask,
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
        Input tensors, tuples/lists whose first element is the input (e.g. a ``DataLoader``), or dicts of
        keyword arguments (``input_ids``, ``attention_mask``…). For image inputs (N, C, H, W) the layers'
        ``height``/``width`` coordinates are pixel centres in input pixels.
    datapoints
        Labels of the datapoints, in order (default 0, 1, …).
    mode
        "w": a new store (``overwrite`` replaces an existing one); "a": add the layers to the existing store at
        ``path`` (e.g. a second model's, recorded on the same inputs) without touching its own; a layer path
        it holds already is an error, raised before the model runs.
    output
        Which tensor of a module's output to record (default ``first_tensor``: the tensor, the first of a
        tuple, a model output's ``last_hidden_state``).
    mask
        The batch's padding mask (N, T), True (or 1) at real tokens, from a batch (default: a dict batch's
        ``attention_mask``; None: no masks). Recorded as the ``mask`` of every layer of T positions.
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
    captured: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {}
    hooks = [module.register_forward_hook(lambda module_, _i, out, path=path: captured.__setitem__(
        path, _channels_last(out, module_, path, output))) for path, module in modules.items()]
    count = {"datapoints": 0}
    image: dict[str, tuple[int, int]] = {}

    def build(tmp: Path, stored: tuple[int, int] | None) -> tuple[list[str], tuple[int, int] | None]:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        arrays: dict[str, Any] = {}
        writers: dict[str, _ChunkWriter] = {}
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode(), every_chunk_written():
                for batch in batches:
                    captured.clear()
                    inputs = _call(model, batch)
                    if getattr(inputs, "ndim", 0) == 4:
                        image.setdefault("size", (int(inputs.shape[2]), int(inputs.shape[3])))
                    padding = mask(batch) if mask is not None else None
                    padding = None if padding is None else padding.detach().cpu().numpy().astype(bool)
                    for path in modules:
                        if path not in captured:
                            raise ValueError(f"layer {path!r} produced no output for this batch")
                        values, dims = captured[path]
                        if padding is not None and values.ndim == 3 and dims[1] == "token" \
                                and values.shape[0] == padding.shape[0] and values.shape[1] < padding.shape[1]:
                            # a nested output padded to its longest sequence only: to the batch's length
                            values = np.pad(values, ((0, 0), (0, padding.shape[1] - values.shape[1]), (0, 0)))
                        masked = padding is not None and values.ndim == 3 and padding.shape == values.shape[:2]
                        if path not in arrays:
                            per_chunk = datapoints_per_chunk(values.shape, values.dtype.itemsize, chunks)
                            arrays[path] = root.create_array(
                                f"{path}/{VARIABLE}", shape=(0, *values.shape[1:]), dtype=values.dtype,
                                chunks=(per_chunk, *values.shape[1:]), compressors=compressors, dimension_names=dims)
                            writers[path] = _ChunkWriter(arrays[path], path)
                            if masked:
                                writers[f"{path}/{MASK}"] = _ChunkWriter(root.create_array(
                                    f"{path}/{MASK}", shape=(0, values.shape[1]), dtype=bool,
                                    chunks=(per_chunk, values.shape[1]), compressors=compressors,
                                    dimension_names=dims[:2]), path)
                        writers[path].add(values)
                        if f"{path}/{MASK}" in writers:
                            if not masked:
                                raise ValueError(f"layer {path!r}: a batch without an attention mask of its "
                                                 f"{values.shape[1]} tokens, after batches with one")
                            writers[f"{path}/{MASK}"].add(padding)
                    count["datapoints"] += len(next(iter(captured.values()))[0])
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
            _write_coords(root[path], array.shape, labels, extent, tuple(array.metadata.dimension_names),
                          compressors)
        return list(modules), extent

    try:
        write_store(path, build, mode=mode, overwrite=overwrite)
    finally:
        for hook in hooks:
            hook.remove()
    return open_activations(path)


def _write_coords(group: Any, shape: tuple[int, ...], labels: np.ndarray,
                  image_size: tuple[int, int] | None, dims: tuple[str, ...], compressors: tuple[Any, ...]) -> None:
    """Coordinates of one recorded layer: the datapoint labels and ``default_coords`` (pixel centres in input-image
    units, the map's own pixels if the input is not an image); checksummed as the activations are."""
    coords = {**default_coords(dict(zip(dims, shape)), image_size), "datapoint": labels}
    for name, values in coords.items():
        values = np.asarray(values)
        if values.dtype.kind in "UO":  # variable-length strings have a stable zarr v3 spec; fixed-width do not
            group.create_array(name, shape=values.shape, dtype=str, dimension_names=(name,),
                               compressors=compressors)[:] = values.astype(object)
        else:
            group.create_array(name, data=values, dimension_names=(name,), compressors=compressors)
