"""Recording activations from a PyTorch model into a store, batch by batch (torch is an optional extra).

Forward hooks catch each chosen module's output and lay it out channels-last: (N, C, H, W) → (datapoint,
height, width, channel), a 1-d conv's (N, C, L) → (datapoint, time, channel), a 3-d conv's (N, C, D, H, W) →
(datapoint, depth, height, width, channel); a transformer's (N, T, C) stays (datapoint, token, channel), and
the batch's attention mask becomes the layer's padding mask. A recurrent module's (``torch.nn.RNNBase``: RNN,
LSTM, GRU) output is (datapoint, token, channel), as are attention's and transformers' with ``batch_first``, as
torch documents them: with ``batch_first=False`` its (T, N, C) is transposed, as are
those of attention and transformer modules with ``batch_first=False`` and of the modules that keep the (T, N)
leading dims of such a tensor (a Dropout, a Linear after it). Its final states ``h_n`` and ``c_n`` (picked with
``output=``) are (D · layers, N, H) whatever ``batch_first``: they become (datapoint, token, channel), one token
per layer and direction; attention's averaged weights (``out[1]``) are (N, L, S) whatever ``batch_first``
and are kept so. A ``PackedSequence`` is refused, naming the layer.

Where the channels of an output of 3 to 5 dims are is decided in this order: channels first from a module whose
class ends in ``1d``, ``2d`` or ``3d`` as its output has 3, 4 or 5 dims (conv, pooling, batch norm) or is a
GroupNorm, SyncBatchNorm or LocalResponseNorm; the layout of the tensor that a submodule made, when the module
returns that tensor (a block ending in a Conv1d or a ReLU), or a view of it with its last two dims swapped
(``h.transpose(1, 2)`` in its forward: channels last); channels last from a block whose last 3-d tensor made in its
call is a channels-first (N, C, L) and whose output (N, L, C) lies in memory as that shape transposed (a conv block
ending in ``F.relu(conv(x)).transpose(1, 2)``, or that plus a position embedding, its input not lying so itself: a
residual sum keeps its input's strides; a reshape to the transposed shape, a sub-pixel shuffle, is not taken for
one, nor a copy); channels last from a parameter-free module whose output so lies transposed where the latest tensor
a module made of that (N, C, L) shape is channels first and later than any of its own shape (a Dropout or GELU given
``F.gelu(conv(x)).transpose(1, 2)`` in a forward); the layout of its input, when the output has the input's shape
and a module of the model made the input (a ReLU, GELU, Dropout or residual block after a Conv1d or a Linear: every
module but TorchScript ones is hooked while recording to know this), swapped where a parameter-free module gives a
view of a channels-first or time-first one with two dims swapped (a Transpose module) and its layout was told; the
layout of the latest tensor of the output's shape a module made (a function in between, such as ``F.relu`` or a
residual sum, keeps it; not for a square shape, where the first position and the channels have one size, (N, L, L)
or (N, C, H, C), since a transpose cannot be told); channels last from a module that acts on the last dim, whatever
the rank (``torch.nn`` Linear, Bilinear, Embedding, and LayerNorm or RMSNorm over one dim: ConvNeXt and Swin blocks
apply them to (N, H, W, C); a subclass that rewrites ``forward``, e.g. to normalise the channels of (N, C, H, W), is
not taken for one); channels first from a block whose output has the shape of its input, which no module made and
a torch.nn conv, pooling or norm module takes (a residual block on ``emb(x).transpose(1, 2)``); channels first
from a block without weights of its own whose submodules made only channels-first
3-d tensors in its call, the last of the output's N and channels, its input not laid out otherwise and its shape not
square (a conv block pooling with ``F.max_pool1d``, a causal conv's chomp; pooled to a square shape and not a
transposed view, it is refused: as well a copy of its transpose). Failing all these, a 3-d output is
channels last from any other module with parameters (attention, a transformer layer, an RNN) and refused from a
parameter-free one (a ReLU on a function of the model's input or on a transpose; an Upsample) or when a module made
a channels-first tensor of its square shape (a block returning ``F.relu`` of its Conv1d's (N, C, L) with C = L),
naming the layer: ``layouts=`` gives its layout; a 4-d or 5-d output is channels first unless ``layouts=`` says
otherwise.

Which of a 3-d output's first two dims holds the datapoints (its time order) is told by the rule where it
follows a module's tensors (a time-first module's output, a Linear on one, a function keeping its shape, a conv).
Where it does not (a module acting on the last dim, a default), in a model with modules that put time first (in
others only where the second dim has the count and the first is neither 1 nor a multiple of it), the batch's
count of datapoints tells it when only one of those dims has as many (a count shown by a DataLoader's
default collation or an image input (N, C, H, W), all the batch's tensors agreeing; else the N of the (T, N, C)
outputs torch documents in the pass, all agreeing): a CLIP-like model's blocks,
which permute their embeddings to (T, N, C) with a function, and their first LayerNorm are time first. When both
dims have one size (T = N) the layer keeps the order a batch told; layers told one order after a batch was read
in the other are an error naming them, and layers no batch told (every batch as many datapoints as positions,
its count shown or not) are warned of by name. ``layouts=`` says where a layer's channels are once its order is
settled, or, with ``"time_first"`` or ``"batch_first"``, settles it. A layer read datapoints first before the pass
showed its count, whose first two dims are the (T, N) of a time-first output torch documents in the pass, is an
error naming the layout to give.

Each layer's batches are gathered in a buffer of one zarr chunk and appended a whole chunk at a time (the rest
when recording ends), so no more than one chunk per layer and one batch are ever held, and no chunk is written
twice: appending batches smaller than a chunk would make zarr read, decode and rewrite the partial last chunk on
every batch. The store is written to a temporary folder and renamed into place when recording ends.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr

from ._fs import every_chunk_written, expanded
from ._stack import user_stacklevel
from .layers import (
    FC_DIMS,
    VARIABLE,
    boolean_mask,
    check_chunk_bytes,
    check_datapoint_coords,
    check_layer_paths,
    coord_values,
    datapoints_per_chunk,
    holding_pair,
    labelled_by,
)
from .options import MASK, POSITIONS_ATTR, VALUE_ROUNDING_ATTR, check_mapping
from .store import (
    WriteMode,
    check_new_layers,
    codecs_for,
    default_coords,
    open_activations,
    write_store,
)


def _no_module(path: str, module: str, named: Mapping[str, Any]) -> ValueError:
    """The error for layer ``path`` naming a module the model (its ``named`` modules) does not have."""
    return ValueError(f"layer {path!r}: the model has no module {module!r}; it has "
                      f"{', '.join(name for name in named if name) or 'none'}")


def _modules(model: Any, layers: Mapping[str, Any] | Sequence[str]) -> dict[str, Any]:
    """Store path → module, from module names (``"features.0"``) or modules themselves."""
    import torch

    named = dict(model.named_modules())
    # a layer given twice is refused (one was recorded, unsaid; also "a" and "a/" in a mapping), as the store does
    if isinstance(layers, Mapping):
        layers = dict(zip(check_layer_paths([str(path) for path in layers]), layers.values()))
    else:  # each at its module's path: a module and one inside it ("layer1", "layer1.0.conv1") would nest
        paths = [str(name).replace(".", "/") for name in layers]
        for name, path in zip(layers, paths):
            if isinstance(name, str) and name not in named:  # before its path is read: "0/0" is no module's
                raise _no_module(path, name, named)
        nested = holding_pair(paths)
        if nested is not None:
            (path, within), module = nested, dict(zip(paths, layers))
            raise ValueError(f"layers names module {module[path]!r} and module {module[within]!r} inside it, whose "
                             f"store paths would hold one another (a layer cannot hold another): give a mapping of "
                             f"store path to module, e.g. {{{path + '/out'!r}: {module[path]!r}, {within!r}: "
                             f"{module[within]!r}}}")
        layers = dict(zip(check_layer_paths(paths), layers))
    modules = {}
    for path, module in layers.items():
        if isinstance(module, str):
            if module not in named:
                raise _no_module(path, module, named)
            module = named[module]
        elif not isinstance(module, torch.nn.Module) or not any(module is own for own in named.values()):
            what = "a module that is not the model's" if isinstance(module, torch.nn.Module) else repr(module)
            raise ValueError(f"layer {path!r}: {what} is neither the name of one of the model's modules (a str, "
                             f"e.g. {next((n for n in named if n), '0')!r}) nor one of its modules")
        if type(module).__name__ in ("RecursiveScriptModule", "ScriptModule", "TopLevelTracedModule",
                                     "TracedModule"):  # torch.jit's: they take no forward hooks
            raise ValueError(f"layer {path!r} is a TorchScript module, whose outputs PyTorch gives no hook: record "
                             f"the module that calls it, or a copy of it that is not scripted")
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


Layout = Literal["channels_first", "channels_last", "time_first", "batch_first"]
LAYOUTS: tuple[Layout, ...] = ("channels_first", "channels_last", "time_first", "batch_first")
ORDERS: tuple[Layout, ...] = ("time_first", "batch_first")  # layouts that settle a 3-d output's time order
Found = Literal["channels_first", "channels_last", "time_first"]  # time first: (T, N, C), channels last
CHANNELS_FIRST_MODULES = ("GroupNorm", "SyncBatchNorm", "LocalResponseNorm")  # (N, C, *) whatever the rank
POSITIONS = {3: ("time",), 4: ("height", "width"), 5: ("depth", "height", "width")}


class _Seen:
    """What recording has seen of where tensors hold their datapoints and channels. In one forward pass: the
    tensors of 3 to 5 dims the model's modules made, with their layouts, the layout of the latest one of each shape
    and the batch's datapoints where it shows them (``datapoints``, see ``_batch_datapoints``). Across passes:
    whether any module of the model puts time first (``has_time_first``) and, for each recorded layer and each
    module, whether its 3-d outputs have their datapoints second, as a batch told it or, for a layer before one
    did, as read (``time_order``)."""

    def __init__(self, model: Any) -> None:
        from torch.utils.weak import WeakIdKeyDictionary

        self.tensors: Any = WeakIdKeyDictionary()
        self.taken: Any = WeakIdKeyDictionary()  # tensors no module made that a torch conv took channels first
        self.shapes: dict[tuple[int, ...], Found] = {}
        self.made: list[tuple[tuple[int, ...], Found]] = []  # each tensor noted in this pass: its shape and layout
        self.starts: dict[int, int] = {}  # a module (its id) → how many tensors were noted when its call began
        self.datapoints: int | None = None
        self.sequences: set[tuple[int, int]] = set()  # (T, N) of the (T, N, C) outputs torch documents, in this pass
        self.has_time_first = any(_time_first(module) for module in model.modules())
        self.orders: dict[Any, bool] = {}  # recorded layer (its path) or module → whether time first, as told
        self.read: set[str] = set()  # recorded layers read datapoints first in a batch that did not tell
        self.misread: dict[str, bool] = {}  # layer → whether time first, as told after being read the other way
        self.untold: set[str] = set()  # layers read in batches of as many datapoints as positions, never told
        self.read_oblong: set[str] = set()  # layers read untold in a batch of other datapoints than positions

    def add(self, tensor: Any, layout: Found, told: bool) -> None:
        """Note a tensor a module made, its layout and whether that tells its time order (``_layout``)."""
        self.tensors[tensor] = layout, told
        if not tensor.is_nested:
            self.shapes[tuple(tensor.shape)] = layout
            self.made.append((tuple(tensor.shape), layout))

    def enter(self, module: Any, args: tuple[Any, ...]) -> None:
        """Note that a call of ``module`` begins (a forward pre-hook): the tensors noted from now until its output
        are its submodules'. An input of 3 to 5 dims that no module made is noted in ``taken`` where a torch.nn
        conv, pooling or norm module takes it channels first (``_takes_channels_first``: a Conv1d given
        ``emb(x).transpose(1, 2)`` in a block's forward), which tells the layout of a block's output of its shape
        where nothing else does (a residual sum with it)."""
        self.starts[id(module)] = len(self.made)
        source = first_tensor(list(args))
        if source is not None and source.dim() in POSITIONS and not source.is_nested and source not in self.tensors \
                and type(module).__module__.startswith("torch.nn.") and _takes_channels_first(module, source.dim()):
            self.taken[source] = True

    def made_within(self, module: Any, rank: int) -> list[tuple[tuple[int, ...], Found]]:
        """The shapes and layouts of the tensors of ``rank`` dims that ``module``'s submodules made in its
        current call, in order."""
        start = self.starts.get(id(module))
        return [made for made in self.made[start:] if len(made[0]) == rank] if start is not None else []

    def of_shape(self, shape: tuple[int, ...]) -> Found | None:
        """The layout of the latest tensor of ``shape`` a module made; None when a transpose could hide behind it:
        channels first and last look alike when the first position and the channels have one size ((N, L, L),
        (N, C, H, C)), (T, N, C) and (N, T, C) when T = N."""
        layout = self.shapes.get(shape)
        square = shape[0] == shape[1] if layout == "time_first" else shape[1] == shape[-1]
        return None if square else layout

    def view_of(self, tensor: Any) -> Found | None:
        """The layout of a 3-d ``tensor`` that is a view, two dims swapped, of a tensor a module made whose layout
        was told (``_transposed``: ``h.transpose(1, 2)`` of a conv's output in a forward), else None."""
        if tensor.dim() != 3 or tensor.is_nested or tensor.is_contiguous():
            return None
        for known, (layout, told) in list(self.tensors.items()):
            if told and not known.is_nested and (swapped := _transposed(layout, known, tensor)) is not None:
                return swapped
        return None

    def turned_latest(self, tensor: Any) -> bool:
        """Whether the latest tensor a module made of a 3-d ``tensor``'s shape with its last two dims swapped, (N,
        C, L), is channels first and later than any of the tensor's own shape: the tensor lying in memory as that
        (N, C, L) transposed is then it, through functions (``F.gelu(conv(x)).transpose(1, 2) + pos``), not an
        older tensor of its shape (a conv encoder's first (N, 32, 64) for its second's (N, 64, 32) transposed)."""
        count, first, second = tensor.shape
        turned, own = (count, second, first), (count, first, second)
        latest = {shape: max((i for i, (made, _) in enumerate(self.made) if made == shape), default=-1)
                  for shape in (turned, own)}
        return latest[turned] > latest[own] and self.made[latest[turned]][1] == "channels_first"

    def clear(self, datapoints: int | None) -> None:
        """Forget the last pass's tensors, before a pass over a batch of ``datapoints`` (None: unknown)."""
        self.tensors.clear()
        self.taken.clear()
        self.shapes.clear()
        self.made.clear()
        self.starts.clear()
        self.datapoints = datapoints
        self.sequences.clear()

    def note_time_first(self, tensor: Any) -> None:
        """Note the (T, N) of a (T, N, C) output as torch documents it (an RNN's, attention's with
        ``batch_first=False``)."""
        self.sequences.add((int(tensor.shape[0]), int(tensor.shape[1])))

    def count(self) -> int | None:
        """The pass's datapoints: as the batch shows them, else the N of the (T, N, C) outputs torch documents,
        as long as they all agree."""
        if self.datapoints is not None:
            return self.datapoints
        counts = {count for _, count in self.sequences}
        return counts.pop() if len(counts) == 1 else None

    def misread_error(self) -> ValueError:
        """The error for the layers in ``misread``, naming each and what helps."""
        listed = ", ".join(f"{layer!r} ({'time' if first else 'datapoints'} first)"
                           for layer, first in self.misread.items())
        given = {layer: "time_first" if first else "batch_first" for layer, first in self.misread.items()}
        return ValueError(f"this batch shows the outputs of {listed}, the other way round from how an earlier batch "
                          f"was read (it had as many datapoints as positions, or the model's tensors told "
                          f"otherwise); pass layouts={given}, or record batches of another size")

    def untold_warning(self) -> str:
        """The warning for the layers in ``untold``."""
        layers = sorted(self.untold)
        return (f"no batch told which of the first two dims of {', '.join(map(repr, layers))} holds the datapoints, "
                f"in a model with modules that put time first (every batch had as many datapoints as positions, "
                f"and a batch's count shows only in a DataLoader's default stacking or in 4-d images); they were "
                f"read datapoints first: if they are (T, N, C), record them again with "
                f"layouts={dict.fromkeys(layers, 'time_first')}, or with batches of another size; "
                f"layouts={dict.fromkeys(layers, 'batch_first')} confirms the reading")

    def time_order(self, found: Found | None, told: bool, tensor: Any, key: Any) -> tuple[Found | None, bool]:
        """``found`` for a 3-d ``tensor`` of the recorded layer (a str ``key``) or module ``key``, and whether its
        time order (whether its datapoints are second) is known: told by the rule (``told``); else by the batch's
        datapoints where only one of its first two dims has as many, in a model with modules that put time first
        (in others, where the second has as many and the first is neither 1 nor a multiple of them);
        else as a batch told it for ``key`` (for a module, only when both dims have one size: a module may run on
        other tensors too). A layer told one order after a batch read it the other goes to ``misread``; one read
        in a batch of as many datapoints as positions and not told, to ``untold``."""
        n = self.count()
        first, second = int(tensor.shape[0]), int(tensor.shape[1])
        # in a model with no torch time-first module, only a (T, N, C) whose T cannot be a batch of N folded or
        # a table of one (a position embedding's (1, T, C), views folded into the batch: (N·V, T, C))
        if not told and n is not None and (first == n) != (second == n) and (
                self.has_time_first or (second == n and first != 1 and first % n)):
            found, told = "time_first" if second == n else found, True
        layer = isinstance(key, str)
        if told:
            time_first = found == "time_first"
            if layer and self.orders.get(key, False if key in self.read else time_first) != time_first:
                self.misread[key] = time_first
            self.orders[key] = time_first
            self.untold.discard(key)
            return found, True
        # not told, found is not "time_first": the rule tells every time-first reading
        if key in self.orders and (layer or tensor.shape[0] == tensor.shape[1]):
            return "time_first" if self.orders[key] else found, True
        if layer:
            self.read.add(key)
            if tensor.shape[0] != tensor.shape[1]:  # read by the rule (the latest tensors' shapes), as always
                self.read_oblong.add(key)
                self.untold.discard(key)
            elif n in (None, tensor.shape[0]) and self.has_time_first and key not in self.read_oblong:
                self.untold.add(key)  # a batch whose count is unknown (a collate_fn of its own) tells nothing either
        return found, False


def _batch_first(module: Any) -> bool | None:
    """Whether a torch sequence module (an RNN, attention or transformer) gives (N, T, C) sequences, its
    ``batch_first``, or (T, N, C); None for other modules."""
    from torch import nn

    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention, nn.Transformer)):
        return bool(module.batch_first)
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return bool(module.self_attn.batch_first)
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and len(module.layers):
        return bool(module.layers[0].self_attn.batch_first)
    return None


def _time_first(module: Any) -> bool:
    """Whether a module gives (T, N, C) sequences: a torch RNN, attention or transformer with ``batch_first=False``."""
    return _batch_first(module) is False


def _documented(module: Any, output: Any, tensor: Any) -> Found | None:
    """The layout torch documents for a 3-d ``tensor`` of a module's ``output``, if it does: a torch sequence
    module's (T, N, C) sequence, or (N, T, C) with ``batch_first`` (``_batch_first``: whatever the tensors of its
    shape before it, a conv's (N, C, L) copied to tokens); a torch RNN's final hidden or cell state (``h_n``,
    ``c_n``), which is (D · layers, N, H) whatever ``batch_first`` (its datapoints second, as in a (T, N, C)
    sequence); attention's averaged weights, (N, L, S) whatever ``batch_first``."""
    from torch import nn

    if (batch_first := _batch_first(module)) is not None and tensor is first_tensor(output):
        return "channels_last" if batch_first else "time_first"
    if isinstance(module, nn.MultiheadAttention) and isinstance(output, tuple) and len(output) > 1:
        return "channels_last" if tensor is output[1] else None
    return "time_first" if _final_state(module, output, tensor) else None


def _final_state(module: Any, output: Any, tensor: Any) -> bool:
    """Whether ``tensor`` is a torch RNN's final hidden or cell state (``h_n``, ``c_n``) in its ``output``: (D ·
    layers, N, H), whose positions are its layers and directions, never padding."""
    from torch import nn

    if not isinstance(module, nn.RNNBase) or not isinstance(output, tuple) or len(output) < 2:
        return False
    states = output[1] if isinstance(output[1], tuple) else (output[1],)
    return any(tensor is state for state in states)


def _takes_channels_first(module: Any, rank: int) -> bool:
    """Whether a module takes and gives tensors of ``rank`` dims channels first: its class ends in ``1d``, ``2d``
    or ``3d`` as they have 3, 4 or 5 dims (conv, pooling, batch norm), or it is a GroupNorm, SyncBatchNorm or
    LocalResponseNorm."""
    name = type(module).__name__
    return name.endswith(f"{rank - 2}d") or name in CHANNELS_FIRST_MODULES


def _acts_on_last_dim(module: Any) -> bool:
    """Whether a module works on the last dim of a tensor of any rank, so its output is channels last: a torch
    Linear, Bilinear, Embedding, or LayerNorm or RMSNorm over one dim, with torch's own ``forward`` (a subclass
    may rewrite it, e.g. to normalise the channels of (N, C, H, W))."""
    from torch import nn

    norms = tuple(getattr(nn, name) for name in ("LayerNorm", "RMSNorm") if hasattr(nn, name))
    for kind in (nn.Linear, nn.Bilinear, nn.Embedding, *norms):
        if isinstance(module, kind):
            return type(module).forward is kind.forward and (kind not in norms or len(module.normalized_shape) == 1)
    return False


def _layout(module: Any, inputs: Sequence[Any], tensor: Any, seen: _Seen) -> tuple[Found | None, bool]:
    """Where the channels of a module's output ``tensor`` of 3 to 5 dims are (see the module docstring), or
    "time_first" for a (T, N, C) sequence (one that ``record``'s hook noted as made by a ``_time_first`` module,
    or of its T and N); None if it cannot tell (a 4-d or 5-d output is then channels first). And whether that
    tells a 3-d tensor's time order (which of its first two dims holds the datapoints), not only where its
    channels are (a module acting on the last dim) or nothing (a default)."""
    if tensor.is_nested:  # PyTorch's nested sequences: (N, T, C) with T ragged
        return "channels_last", True
    if _takes_channels_first(module, tensor.dim()):
        return "channels_first", True
    if tensor in seen.tensors:  # returned as a submodule made it (or as the module's own hook noted it)
        return seen.tensors[tensor]
    if (viewed := seen.view_of(tensor)) is not None:  # a conv's (N, C, L) returned as h.transpose(1, 2)
        return viewed, True
    inner = seen.made_within(module, 3) if tensor.dim() == 3 else []
    source = first_tensor(list(inputs))
    lies_turned = _transposed_in_memory(tensor)
    # a transpose in this call made the output's strides (not its input's, which a residual sum keeps: x + f(x))
    turned = lies_turned and not (source is not None and _transposed_in_memory(source))
    if turned and inner and inner[-1] == ((tensor.shape[0], tensor.shape[2], tensor.shape[1]), "channels_first"):
        return "channels_last", True  # a conv block's last (N, C, L), transposed through a function: (N, L, C)
    if lies_turned and (source is None or source not in seen.tensors) \
            and next(module.parameters(), None) is None and seen.turned_latest(tensor):
        return "channels_last", True  # a Dropout, a GELU on a conv's (N, C, L) transposed through a function
    if source is not None and source in seen.tensors and not source.is_nested:
        if source.shape == tensor.shape:
            return seen.tensors[source]
        if seen.tensors[source][0] == "time_first" and source.shape[:2] == tensor.shape[:2] and tensor.dim() == 3:
            return "time_first", True  # a Linear on (T, N, C) keeps T and N
        layout, told = seen.tensors[source]
        if told and next(module.parameters(), None) is None and (swapped := _transposed(layout, source, tensor)):
            return swapped, True  # a Transpose or Rearrange module: (N, C, L) → (N, L, C), (T, N, C) → (N, T, C)
    shaped = seen.of_shape(tuple(tensor.shape))  # a function of a module's output (F.relu) keeps its shape
    if shaped == "time_first":  # (T, N, C) through a function (a residual sum): still time first
        return shaped, True
    if _acts_on_last_dim(module):  # whatever the layout of earlier tensors of its shape
        return "channels_last", False
    if shaped is not None:  # (T, N, C) with T = N has the shape of (N, T, C)
        return shaped, tensor.shape[0] != tensor.shape[1]
    if source is not None and source in seen.taken and source.shape == tensor.shape and not tensor.is_nested:
        return "channels_first", True  # a block summing its input, which its Conv1d takes, with its conv's output
    given = seen.tensors[source][0] if source is not None and source in seen.tensors else None
    if inner and all(layout == "channels_first" for _, layout in inner) and inner[-1][0][:2] == tuple(
            tensor.shape[:2]) and given in (None, "channels_first") \
            and next(module.parameters(recurse=False), None) is None:  # a conv block's (N, C, L) through a
        if tensor.shape[1] != tensor.shape[2]:  # function changing L only (F.max_pool1d, a causal chomp)
            return "channels_first", True
        if tensor.stride(1) > tensor.stride(2):  # pooled to a square (N, C, C), not a transpose's view: as
            return None, False  # well a copy of its transpose (.transpose(1, 2).contiguous()), which cannot be told
    if tensor.dim() > 3 or next(module.parameters(), None) is None:  # 4-d, 5-d: channels first by default
        return None, False
    if seen.shapes.get(tuple(tensor.shape)) == "channels_first":  # a square (N, C, C) a conv made, through F.relu:
        return None, False  # a transpose cannot be told, and the default would read its channels as positions
    return "channels_last", False


def _transposed_in_memory(tensor: Any) -> bool:
    """Whether a 3-d ``tensor`` (N, A, B), A ≠ B, lies in memory as a contiguous (N, B, A) with its last two dims
    swapped: a transpose made it (``F.relu(conv(x)).transpose(1, 2)``, plus a position embedding), not a reshape."""
    if tensor.dim() != 3 or tensor.is_nested or tensor.shape[1] == tensor.shape[2]:
        return False
    _, first, second = tensor.shape
    return tensor.stride() == (first * second, 1, first)


def _transposed(layout: Found, source: Any, tensor: Any) -> Found | None:
    """The layout of a 3-d ``tensor`` that is a view of ``source`` (of ``layout``) with two dims swapped (its
    data, its strides exchanged: not a reshape of the same shape): a channels-first (N, C, L) with its last two
    swapped is channels last, a (T, N, C) sequence with its first two is (N, T, C); else None (a channels-last
    layout may be a Linear's over positions, an MLP-Mixer's token mixing)."""
    if source.dim() != 3 or tensor.dim() != 3 or tensor.data_ptr() != source.data_ptr():
        return None
    (a, b, c), (first, second, third) = source.stride(), tensor.stride()
    if layout == "channels_first" and source.shape[1] != source.shape[2] and (first, second, third) == (a, c, b):
        return "channels_last"  # not the other way: a Linear's (N, T, C) may be a mixer's (N, D, P)
    if layout == "time_first" and source.shape[0] != source.shape[1] and (first, second, third) == (b, a, c):
        return "channels_last"
    return None


def _found(module: Any, inputs: Sequence[Any], output: Any, tensor: Any, seen: _Seen,
           key: Any) -> tuple[Found | None, bool]:
    """Where a module's output ``tensor`` (of its ``output``) of 3 to 5 dims holds its channels, or "time_first",
    and whether its time order was told: as torch documents it (``_documented``), else by the rule (``_layout``),
    a 3-d tensor's time order set where the rule does not tell it (``seen.time_order``) for the recorded layer or
    module ``key``."""
    if tensor.dim() == 3 and (documented := _documented(module, output, tensor)) is not None:
        if documented == "time_first" and not tensor.is_nested:
            seen.note_time_first(tensor)
        return documented, True
    found, told = _layout(module, inputs, tensor, seen)
    if tensor.dim() != 3 or tensor.is_nested:
        return found, told
    return seen.time_order(found, told, tensor, key)


def _channels_last(array: np.ndarray, path: str, layout: Layout, *,
                   owned: bool = False) -> tuple[np.ndarray, tuple[str, ...]]:
    """A module's output as (datapoint, *positions, channel), in memory of its own (the tensor's may change later
    in the forward pass: ``ReLU(inplace=True)``, ``h += residual``; copied unless ``owned``: made for it, as
    ``.cpu()`` of a GPU tensor is), and its dims, given where its channels are."""
    if array.ndim == 2:
        return array if owned else np.array(array), FC_DIMS
    if array.ndim not in POSITIONS:
        raise ValueError(f"layer {path!r} gives outputs of shape {tuple(array.shape)}; expected (N, C), (N, T, C), "
                         f"(N, C, L), (N, C, H, W) or (N, C, D, H, W)")
    if layout in ("channels_last", "batch_first"):
        dims = ("datapoint", *(("token",) if array.ndim == 3 else POSITIONS[array.ndim]), "channel")
        return array if owned else np.array(array), dims
    return np.array(np.moveaxis(array, 1, -1), order="C"), ("datapoint", *POSITIONS[array.ndim], "channel")


def _packed(output: Any) -> Any:
    """The ``PackedSequence`` a module returns (alone or first of a tuple, as an RNN does), else None."""
    from torch.nn.utils.rnn import PackedSequence

    for item in (output, *(output[:1] if isinstance(output, (tuple, list)) else ())):
        if isinstance(item, PackedSequence):
            return item
    return None


def _recorded(module: Any, inputs: Sequence[Any], output: Any, path: str, select: Callable[[Any], Any],
              layout: Layout | None, seen: _Seen) -> tuple[np.ndarray, tuple[str, ...], bool, float, bool]:
    """The tensor ``select`` takes of a module's output, as (datapoint, *positions, channel), its dims, whether
    it was a nested tensor (padded here to its longest sequence only), the relative rounding of its values
    where the array's dtype is finer (bfloat16's 2⁻⁷, held as float32), else 0, and whether its positions can
    hold no padding (an RNN's final states: ``_final_state``); a (T, N, C) sequence (as
    ``_found`` finds, or as ``layout`` from ``layouts=`` says) made batch first, then laid out as ``layout``
    says, else as found (4-d and 5-d: channels first by default)."""
    tensor = select(output)
    if tensor is None:
        raise ValueError(f"layer {path!r} gives a {type(output).__name__} holding no tensor; pass output= to say "
                         f"which to record")
    unpadded = _final_state(module, output, tensor)
    packed = _packed(output)
    if packed is not None and tensor is packed.data:
        raise ValueError(f"layer {path!r} gives a PackedSequence, whose rows are the steps of every sequence packed "
                         f"together, not datapoints; record it padded: pass output=lambda out: torch.nn.utils.rnn."
                         f"pad_packed_sequence(out[0], batch_first=True, total_length=T)[0] (and mask= for the "
                         f"padding), or record a module after the model's own pad_packed_sequence")
    if layout == "time_first" and (tensor.dim() != 3 or tensor.is_nested):
        raise ValueError(f"layouts[{path!r}] is 'time_first', (T, N, C), but its output is "
                         + ("a nested tensor, which PyTorch makes batch first" if tensor.is_nested else
                            f"of shape {tuple(tensor.shape)}"))
    if layout == "batch_first" and tensor.dim() != 3:
        raise ValueError(f"layouts[{path!r}] is 'batch_first', (N, T, C), but its output is of shape "
                         f"{tuple(tensor.shape)}")
    if tensor.dim() not in POSITIONS or layout in ORDERS:
        found = None
    else:  # its time order settled, a layout given says where its channels are
        found = _found(module, inputs, output, tensor, seen, path)[0]
    if "time_first" in (layout, found):  # (T, N, C) → (N, T, C); a layout given applies to that
        tensor, found, layout = tensor.transpose(0, 1), "channels_last", None if layout == "time_first" else layout
    layout = layout or found
    if layout is None and tensor.dim() == 3:
        why = (f"{type(module).__name__} has no parameters to tell by, and no module of the model made a tensor of "
               f"its shape before it (a function of the model's input, a transpose), or its shape is square, where "
               f"a transpose cannot be told" if next(module.parameters(), None) is None else
               "its shape is square, where a transpose cannot be told, and it may come from a channels-first tensor "
               "a module of the model made (a Conv1d's (N, C, L) with C = L through a function, a conv block's "
               "pooled to L = C)")
        raise ValueError(f"layer {path!r}: where the channels of its {tuple(tensor.shape)} output are is "
                         f"unknown: {why}; pass "
                         f"layouts={{{path!r}: 'channels_first'}} if the output is (N, C, L), 'channels_last' "
                         f"if (N, T, C), 'time_first' if (T, N, C)")
    if tensor.device.type == "meta":
        raise ValueError(f"layer {path!r} gives a tensor on PyTorch's meta device, which holds no values (a model "
                         f"made without its weights): load them first (model.to_empty(device='cpu') and "
                         f"load_state_dict)")
    nested = getattr(tensor, "is_nested", False)
    owned = tensor.device.type != "cpu"  # .cpu() copies it to memory of its own
    if nested:  # PyTorch's transformer fast path leaves padding out: put it back
        tensor, owned = tensor.to_padded_tensor(0.0), True
    coarser = 0.0
    if str(tensor.dtype) == "torch.bfloat16":  # numpy has no bfloat16 ("unsupported ScalarType"): float32 holds it
        import torch

        coarser = float(torch.finfo(tensor.dtype).eps)  # bfloat16's rounding (2⁻⁷), which its values keep
        tensor, owned = tensor.float(), True  # exactly (float32 with its last 16 bits cut)
    return (*_channels_last(tensor.detach().cpu().numpy(), path, layout or "channels_first", owned=owned), nested,
            coarser, unpadded)


def _shuffles(batches: Any) -> bool:
    """Whether ``batches`` is a DataLoader whose sampler, or its batch sampler's, draws the data in a random
    order (random, subset-random, weighted or shuffling distributed sampling)."""
    from torch.utils.data import DistributedSampler, RandomSampler, SubsetRandomSampler, WeightedRandomSampler

    samplers = (getattr(batches, "sampler", None), getattr(getattr(batches, "batch_sampler", None), "sampler", None))
    return any(isinstance(sampler, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler))
               or (isinstance(sampler, DistributedSampler) and sampler.shuffle) for sampler in samplers)


def _check_datapoint_counts(outputs: Mapping[str, np.ndarray], datapoints: int | None, told: Collection[str],
                            sequences: Collection[tuple[int, int]] = ()) -> None:
    """Every recorded layer's output of a batch has the batch's datapoints first; else an error naming each layer
    at odds with the batch's ``datapoints`` (None: unknown) or, failing that, with the layers whose time order was
    ``told``, and what gives its datapoints first (xarray said "conflicting sizes for dimension 'datapoint'" when
    the store was opened). When neither tells the count, every layer is named: the most may be the ones misread.
    A layer read untold (nor given a layout) that holds the count second is at odds with it too where its first
    dim is neither 1 nor a multiple of the count, or where its first two dims are the (T, N) of a time-first
    output torch documents in the pass (``sequences``: an LSTM's after the Embedding, with T = 2N); other views
    or sentence pairs folded into the batch, (kN, T, C) with T = N, and tables (1, T, C) stay as read."""
    counts = {layer: len(values) for layer, values in outputs.items()}
    # a layer alone may fold the batch (words of sentences: not the batch's count), but one read untold may not
    # hold it second: a (T, N, C) read before the pass showed its N (an Embedding before a time-first LSTM) was
    # stored with T datapoints (a layer told its order, (2N, T, C) sentence pairs folded, is as told)
    def turned(layer: str, known: int) -> bool:  # a (T, N, C) read (N, T, C), where it cannot be a fold
        values = outputs[layer]
        return values.ndim == 3 and values.shape[1] == known != len(values) and (
            (len(values) % known != 0 and len(values) != 1) or (len(values), known) in sequences)

    turned_untold = datapoints is not None and any(turned(layer, datapoints) for layer in outputs if layer not in told)
    if len(set(counts.values())) < 2 and not turned_untold:
        return
    listed = ", ".join(f"{layer!r} {count}" for layer, count in counts.items())
    known = datapoints if datapoints is not None else next((counts[layer] for layer in counts if layer in told), None)
    if known is None:
        raise ValueError(f"the layers give different numbers of datapoints for one batch ({listed}), and nothing "
                         f"tells which is right; pass layouts={{layer: 'time_first'}} for each layer that is "
                         f"(T, N, C), or output= a function giving a layer with its datapoints first")
    advice = [(f"if {layer!r} is (T, N, C) read as (N, T, C), pass layouts={{{layer!r}: 'time_first'}}"
               if turned(layer, known) else
               f"pass output= a function giving {layer!r} with its datapoints first")
              for layer, count in counts.items() if count != known]
    if len(set(counts.values())) > 1:
        said = f"the layers give different numbers of datapoints for one batch ({listed}; "
    else:  # one count, in a batch of another
        names = ", ".join(map(repr, counts))
        said = (f"layer{'s' if len(counts) > 1 else ''} {names} give{'' if len(counts) > 1 else 's'} "
                f"{next(iter(counts.values()))} datapoints for one batch (")
    raise ValueError(f"{said}the batch holds {known}); {'; '.join(advice)}")


def _collates(batches: Any) -> bool:
    """Whether ``batches`` is a DataLoader that stacks its samples along a first dim (batches of samples, by
    ``batch_size`` or a ``batch_sampler``, and the default collation)."""
    from torch.utils.data import DataLoader, default_collate

    return isinstance(batches, DataLoader) and batches.batch_sampler is not None \
        and batches.collate_fn is default_collate


def _known_datapoints(batches: Any) -> int | None:
    """How many datapoints ``batches`` holds where it says so before it runs: a DataLoader stacking ``batch_size``
    samples a batch (``_collates``) from a sampler of known length, less a last part batch it drops
    (``drop_last``); None otherwise (an iterable dataset, a batch sampler of one's own, a subclass iterating
    otherwise, e.g. over its first batches only, any other iterable)."""
    from torch.utils.data import DataLoader

    if not _collates(batches) or batches.batch_size is None or type(batches).__iter__ is not DataLoader.__iter__:
        return None
    try:
        total = len(batches.sampler)
    except (TypeError, NotImplementedError):  # an IterableDataset's sampler has no length
        return None
    return total - total % batches.batch_size if batches.drop_last else total


def _batch_datapoints(batch: Any, collated: bool) -> int | None:
    """How many datapoints a batch holds, where that shows: the first dim of its tensors (a dict's values, a tuple's
    items, or the batch itself) when they all have one and a DataLoader's default collation stacked them
    (``collated``) or one is an image (N, C, H, W); else None (a sequence model's inputs may be (T, N, …), a
    video's (T, N, C, H, W); two inputs of different sizes, K captions and N images, may feed layers of either)."""
    import torch

    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    tensors = [item for item in items if isinstance(item, torch.Tensor) and item.dim() > 0]
    sizes = {int(tensor.shape[0]) for tensor in tensors}
    if len(sizes) != 1 or not (collated or any(tensor.dim() == 4 for tensor in tensors)):
        return None
    return sizes.pop()


def attention_mask(batch: Any) -> Any:
    """A batch's attention mask: its ``"attention_mask"`` entry when the batch is a dict, else None."""
    return batch.get("attention_mask") if isinstance(batch, Mapping) else None


def _call(model: Any, batch: Any) -> Any:
    """Run the model on a batch: a dict as keyword arguments, a tuple or list by its first element (e.g. a
    ``DataLoader``'s (inputs, targets)), else the batch itself; returns the inputs (of a dict, its first image
    or volume but an ``attention_mask``, e.g. ``pixel_values`` after ``labels``, else its first value)."""
    if isinstance(batch, Mapping):
        model(**batch)
        return next((value for key, value in batch.items() if getattr(value, "ndim", 0) in (4, 5)
                     and key != "attention_mask"), next(iter(batch.values())))
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    model(inputs)
    return inputs


class _ChunkWriter:
    """Appends one layer's batches (or its mask's) to a zarr array in whole chunks only, through a buffer that grows
    as batches fill it, up to one chunk. The array is made (``create``, given its datapoints per chunk) at the
    first whole chunk, or at the end of the recording, in one chunk of the datapoints recorded where they fill
    none: ``chunks=`` far beyond a recording cost a buffer of that size (14.6 TiB, refused by numpy) and left a
    chunk that no run could read within its memory. A chunk larger than its codec takes is refused as the
    batches reach that size (``check_chunk_bytes``)."""

    def __init__(self, create: Callable[[int], Any], per_chunk: int, path: str, compressed: bool) -> None:
        self.create, self.per_chunk, self.path, self.compressed = create, per_chunk, path, compressed
        self.array: Any = None
        self.buffer: np.ndarray | None = None
        self.filled = 0

    def add(self, values: np.ndarray) -> None:
        if self.buffer is None:
            self.buffer = np.empty((0, *values.shape[1:]), dtype=values.dtype)
        if values.shape[1:] != self.buffer.shape[1:]:
            raise ValueError(f"layer {self.path!r} gave outputs of shape {tuple(values.shape)} after outputs of "
                             f"shape (N, {', '.join(map(str, self.buffer.shape[1:]))}): every batch must give a "
                             f"layer one shape past its datapoints; pad sequences to one length (a tokenizer's "
                             f"padding='max_length' with max_length=, its attention mask recorded as the padding "
                             f"mask), give images one size")
        start = 0
        while start < len(values):
            if self.filled == 0 and len(values) - start >= self.per_chunk:  # whole chunks straight from the batch
                stop = start + (len(values) - start) // self.per_chunk * self.per_chunk
                self._append(values[start:stop])
                start = stop
                continue
            taken = min(self.per_chunk - self.filled, len(values) - start)
            self._hold(self.filled + taken)
            self.buffer[self.filled : self.filled + taken] = values[start : start + taken]
            self.filled += taken
            start += taken
            if self.filled == self.per_chunk:
                self.flush()

    def _hold(self, count: int) -> None:
        """Room in the buffer for ``count`` datapoints (at most a chunk), doubling it as batches come."""
        assert self.buffer is not None
        if count <= len(self.buffer):
            return
        shape, itemsize = self.buffer.shape, self.buffer.dtype.itemsize
        check_chunk_bytes(self.path, (count, *shape[1:]), itemsize, count, self.compressed)  # as reached
        grown = np.empty((min(self.per_chunk, max(count, 2 * len(self.buffer))), *shape[1:]), dtype=self.buffer.dtype)
        grown[: self.filled] = self.buffer[: self.filled]
        self.buffer = grown

    def flush(self) -> None:
        """Append what the buffer holds: a whole chunk, or at the end of the recording the last, partial one."""
        if self.filled:
            assert self.buffer is not None
            self._append(self.buffer[: self.filled])
            self.filled = 0

    def _append(self, values: np.ndarray) -> None:
        if self.array is None:  # at the first whole chunk, or at the end: all the datapoints, in one chunk
            per_chunk = min(self.per_chunk, len(values))
            check_chunk_bytes(self.path, values.shape, values.dtype.itemsize, per_chunk, self.compressed)
            self.array = self.create(per_chunk)
        self.array.append(values, axis=0)


def _create(root: Any, path: str, shape: tuple[int, ...], dtype: np.dtype, dims: tuple[str, ...],
            compressors: tuple[Any, ...], per_chunk: int) -> Any:
    """An empty zarr array at ``path`` of ``root`` for a layer's datapoints (or its mask's), ``per_chunk`` a chunk."""
    return root.create_array(path, shape=(0, *shape), dtype=dtype, chunks=(per_chunk, *shape), compressors=compressors,
                             dimension_names=dims)


def record(model: Any, layers: Mapping[str, Any] | Sequence[str], batches: Iterable[Any],
           path: str | os.PathLike, *, datapoints: Sequence[Any] | None = None, mode: WriteMode = "w",
           output: Callable[[Any], Any] = first_tensor, mask: Callable[[Any], Any] | None = attention_mask,
           chunks: int | str = "auto", compression: str | None = "lz4", overwrite: bool = False,
           layouts: Mapping[str, Layout] | None = None, coords: Mapping[str, Any] | None = None) -> xr.DataTree:
    """Run ``model`` over ``batches`` and write the outputs of ``layers`` to a store at ``path``, in their
    dtype (bfloat16, which numpy lacks, as float32: exactly, marked with bfloat16's rounding, which the solves
    then cut as they cut float32's; ``options.VALUE_ROUNDING_ATTR``).

    Parameters
    ----------
    model
        A ``torch.nn.Module``; it is put in eval mode and run under ``torch.no_grad()`` (not inference mode,
        whose tensors a lazy module's parameters made then would stay, unfit for training), then each of its
        modules is put back in the mode it was in.
    layers
        Module names (``["features.0", "classifier.1"]``, stored as ``features/0``…) or a mapping of store
        path → module name or module. A layer cannot hold another, so a module and one inside it
        (``"layer1"`` and ``"layer1.0.conv1"``) take a mapping: ``{"layer1/out": "layer1", "layer1/0/conv1":
        "layer1.0.conv1"}``.
    batches
        Input tensors, tuples/lists whose first element is the input (e.g. a ``DataLoader``), or dicts of
        keyword arguments (``input_ids``, ``attention_mask``…). For image inputs (N, C, H, W) the layers'
        ``height``/``width`` coordinates are pixel centres in input pixels.
    path
        The store to write (a local folder), as for [`chunkcca.write_activations()`][chunkcca.write_activations].
    datapoints
        Labels of the datapoints, in order (e.g. each input's index in its dataset). Without them the store holds
        the positions 0, 1, …, marked as such, and the layers pair with others by position only (beside a layer
        labelled in another order, an error).
    mode
        "w": a new store (``overwrite`` replaces an existing one); "a": add the layers to the existing store at
        ``path`` (e.g. a second model's, recorded on the same inputs) without touching its own; a layer path
        it holds already is an error, raised before the model runs.
    output
        Which tensor of a module's output to record (default ``first_tensor``: the tensor, the first of a
        tuple, a model output's ``last_hidden_state``). A ``PackedSequence`` is refused: pad it here, e.g.
        ``lambda out: torch.nn.utils.rnn.pad_packed_sequence(out[0], batch_first=True, total_length=T)[0]``.
    mask
        The batch's padding mask (N, T), True (or 1) at real tokens, from a batch (default: a dict batch's
        ``attention_mask``; None: no masks). Recorded as the ``mask`` of every layer of T positions but an RNN's
        final states (one position per layer and direction, none of them padding); a layer of another length (a
        strided convolution, a prepended token) is recorded without one, with a warning.
    chunks, compression, overwrite
        As for [`chunkcca.write_activations()`][chunkcca.write_activations]; ``chunks`` at most the datapoints
        recorded (a layer's array is made at its first whole chunk, or at the end in one chunk of them all), a
        chunk its codec cannot take refused as the batches reach that size.
    layouts
        Store path → ``"channels_first"`` ((N, C, L), (N, C, H, W), (N, C, D, H, W)) or ``"channels_last"``
        ((N, T, C), (N, H, W, C), (N, D, H, W, C)) or ``"time_first"`` ((T, N, C), made (N, T, C)) or
        ``"batch_first"`` ((N, T, C) as made, whatever the rule and the batch's count would read) for layers
        whose layout the rule of ``chunkcca.record`` gets wrong or cannot tell (it refuses a parameter-free module,
        e.g. a ReLU, given a 3-d tensor no module made; it takes a 4-d or 5-d output it cannot tell for channels
        first; a Linear applied to a function of an RNN's (T, N, C) output, e.g. ``F.relu(out)``, looks (N, T, C)).
        A (T, N, C) output it finds (an RNN's with ``batch_first=False``, or as the batch's count shows) is made
        (N, T, C) first; the layout given then says where its channels are (``"time_first"`` and ``"batch_first"``
        settle a 3-d output's order themselves).
    coords
        Coordinates on ``datapoint`` for every recorded layer (for ``groupby=`` and ``folds=``): name → one number
        or string per datapoint, in the order of ``batches`` (e.g. ``{"label": dataset.targets}``), or a DataArray
        on ``datapoint`` labelled as ``datapoints``; with ``mode="a"``, checked against the store's coordinates of
        that name by the datapoints' labels (an order of one's own takes the values in that order). Checked before
        the model runs, their count too where ``batches`` tells it (a DataLoader: its sampler's length), else as
        the batches run past them (too many labels: once the model has run), as is ``datapoints``'s (one label
        per datapoint, no label twice: before the model runs).

    Returns
    -------
    xarray.DataTree
        The store, opened lazily; [`layer_paths()`][chunkcca.layer_paths] lists its layers in the order ``layers``
        names them (a node's ``.children`` are in the order zarr lists them).
    """
    import torch
    import zarr
    path = expanded(path)
    check_mapping("coords", coords, "coordinate name to one value per datapoint")
    check_mapping("layouts", layouts, "layer path to layout")
    modules = _modules(model, layers)
    labelled = labelled_by(check_datapoint_coords(coords), _checked_datapoints(datapoints))
    known = _known_datapoints(batches)
    if known is not None:  # the labels' count checked before the model runs, where the DataLoader tells it
        _check_labels(datapoints, labelled, known, next(iter(modules)), f"the {known} datapoints batches holds "
                      f"(its sampler's length{', less the last part batch it drops' if batches.drop_last else ''})")
    compressors = codecs_for(compression)
    datapoints_per_chunk((1,), 1, chunks)  # its check, before the model runs (it came after the first batch)
    check_new_layers(path, list(modules), mode=mode, overwrite=overwrite)
    if _shuffles(batches):
        warnings.warn("batches is a DataLoader that shuffles: the datapoints are recorded in an order that another "
                      "recording (another model, mode='a') and labels in the dataset's order (coords=, datapoints=) "
                      "do not share, so they would pair the wrong inputs; use shuffle=False", RuntimeWarning,
                      stacklevel=user_stacklevel())
    given = {str(layer).strip("/"): layout for layer, layout in (layouts or {}).items()}
    for layer, layout in given.items():
        if layer not in modules:
            raise ValueError(f"layouts names {layer!r}, which is not a recorded layer ({', '.join(modules)})")
        if layout not in LAYOUTS:
            raise ValueError(f"layouts[{layer!r}] is {layout!r}; choose from {', '.join(LAYOUTS)}")
    captured: dict[str, tuple[np.ndarray, tuple[str, ...], bool]] = {}
    seen = _Seen(model)
    collated = _collates(batches)

    def track(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        tensor = first_tensor(out)
        if tensor is not None and tensor.dim() in POSITIONS:
            layout, told = _found(module, [*args, *kwargs.values()], out, tensor, seen, module)
            if layout is not None:
                seen.add(tensor, layout, told)

    def capture(path: str, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if path in captured:  # a module used twice (shared weights): which call is the layer?
            raise ValueError(f"layer {path!r} ran more than once in one forward pass; record one call: wrap it in a "
                             f"module of its own (e.g. nn.Identity() after it) and record that")
        captured[path] = _recorded(module, [*args, *kwargs.values()], out, path, output, given.get(path), seen)

    count = {"datapoints": 0}
    image: dict[str, tuple[int, int]] = {}

    def build(tmp: Path, stored: tuple[int, int] | None) -> tuple[list[str], tuple[int, int] | None]:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        arrays: dict[str, Any] = {}
        writers: dict[str, _ChunkWriter] = {}
        rounded: dict[str, float] = {}  # layers whose values are rounded more coarsely than their dtype
        unfit_masks: set[str] = set()  # layers recorded without a mask, their first batch's not fitting them
        modes = {module: module.training for module in model.modules()}  # each restored as it was (a frozen
        model.eval()  # BatchNorm in a model in training mode stays in eval mode)
        try:
            with torch.no_grad(), every_chunk_written():
                for batch in batches:
                    captured.clear()
                    seen.clear(_batch_datapoints(batch, collated))
                    inputs = _call(model, batch)
                    if seen.misread:
                        raise seen.misread_error()
                    if getattr(inputs, "ndim", 0) in (4, 5):  # images (N, C, H, W), volumes (N, C, D, H, W)
                        image.setdefault("size", (int(inputs.shape[-2]), int(inputs.shape[-1])))
                    padding = mask(batch) if mask is not None else None
                    padding = None if padding is None else boolean_mask(padding.detach().cpu().numpy(),
                                                                        "the padding mask of a batch (mask=)")
                    _check_datapoint_counts({layer: captured[layer][0] for layer in modules if layer in captured},
                                            seen.count(), [*given, *(key for key in seen.orders
                                                                     if isinstance(key, str))], seen.sequences)
                    for path in modules:
                        if path not in captured:
                            raise ValueError(f"layer {path!r} produced no output for this batch")
                        values, dims, nested, coarser, unpadded = captured[path]
                        if coarser:
                            rounded[path] = max(rounded.get(path, 0.0), coarser)
                        if nested and padding is None:
                            raise ValueError(
                                f"layer {path!r} comes from PyTorch's fast path as a nested tensor: the batch's "
                                f"sequences are padded, but no padding mask was read from the batch (mask=, by "
                                f"default a dict batch's 'attention_mask'), so the padded positions would count as "
                                f"real tokens; pass mask= a function giving it, True at real tokens (for "
                                f"src_key_padding_mask, True at padding: mask=lambda batch: "
                                f"~batch['src_key_padding_mask'])")
                        if nested and padding is not None and values.ndim == 3 and dims[1] == "token" \
                                and values.shape[0] == padding.shape[0] and values.shape[1] < padding.shape[1]:
                            # a nested output padded to its longest sequence only: to the batch's length
                            values = np.pad(values, ((0, 0), (0, padding.shape[1] - values.shape[1]), (0, 0)))
                        # the mask of the batch's tokens: on each layer of as many positions but an RNN's final
                        # states, one per layer and direction (taken for tokens where there were as many)
                        padded = padding is not None and values.ndim == 3 and not unpadded
                        masked = padded and padding.shape == values.shape[:2]
                        if path not in writers:
                            per_chunk = datapoints_per_chunk(values.shape, values.dtype.itemsize, chunks)
                            writers[path] = _ChunkWriter(partial(
                                _create, root, f"{path}/{VARIABLE}", values.shape[1:], values.dtype, dims,
                                compressors), per_chunk, path, compression is not None)
                            if padded and not masked:
                                unfit_masks.add(path)
                                shapes = (f"{values.shape[1]} positions and the batch's mask {padding.shape[1]}"
                                          if values.shape[1] != padding.shape[1] else
                                          f"{values.shape[0]} rows and the batch's mask {padding.shape[0]}")
                                warnings.warn(f"layer {path!r} has {shapes}: it is recorded without a mask, so its "
                                              f"padded positions count as real ones (spatial='avgpool', 'last' and "
                                              f"'flatten' read them)", RuntimeWarning, stacklevel=user_stacklevel())
                            if masked:
                                writers[f"{path}/{MASK}"] = _ChunkWriter(partial(
                                    _create, root, f"{path}/{MASK}", values.shape[1:2], np.dtype(bool), dims[:2],
                                    compressors), per_chunk, path, compression is not None)
                        elif masked and f"{path}/{MASK}" not in writers and path not in unfit_masks:
                            raise ValueError(f"layer {path!r}: a batch with an attention mask of its "
                                             f"{values.shape[1]} tokens, after batches without one, whose padded "
                                             f"positions would count as real ones; give every batch its mask")
                        writers[path].add(values)
                        if f"{path}/{MASK}" in writers:
                            if not masked:
                                raise ValueError(f"layer {path!r}: a batch without an attention mask of its "
                                                 f"{values.shape[1]} tokens, after batches with one")
                            writers[f"{path}/{MASK}"].add(padding)
                    count["datapoints"] += len(next(iter(captured.values()))[0])
                    _check_labels_left(datapoints, labelled, count["datapoints"], next(iter(modules)))
        finally:
            for module, training in modes.items():
                module.training = training
        if not writers:
            raise ValueError("record got no batches")
        if not count["datapoints"]:  # no chunk filled, no array made (it said so naming the layer when opened)
            raise ValueError(f"record got batches of no datapoints: layer {next(iter(modules))!r} would be empty")
        if seen.untold:
            warnings.warn(seen.untold_warning(), RuntimeWarning, stacklevel=user_stacklevel())
        labels, extra = _check_labels(datapoints, labelled, count["datapoints"], next(iter(modules)),
                                      f"{count['datapoints']} recorded datapoints")
        extent = stored or image.get("size")
        with every_chunk_written():  # the last chunks and the labels too (a label 0 equals the fill value)
            for writer in writers.values():
                writer.flush()
            arrays.update((path, writer.array) for path, writer in writers.items() if path in modules)
            for path, coarser in rounded.items():  # the solves then cut bfloat16's rounding, not float32's
                arrays[path].attrs[VALUE_ROUNDING_ATTR] = coarser
            for path, array in arrays.items():
                _write_coords(root[path], array.shape, labels, extent, tuple(array.metadata.dimension_names),
                              compressors, extra, positions=datapoints is None)
        return list(modules), extent

    hooks: list[Any] = []
    try:  # every hook removed, also when one cannot be registered
        # every module but TorchScript ones, which take no hooks (their insides are not seen: a layout after one is
        # told by its own rule)
        for module in model.modules():
            if not isinstance(module, torch.jit.ScriptModule):
                hooks.append(module.register_forward_pre_hook(seen.enter))
                hooks.append(module.register_forward_hook(track, with_kwargs=True))
        for layer, module in modules.items():
            hooks.append(module.register_forward_hook(partial(capture, layer), with_kwargs=True))
        write_store(path, build, mode=mode, overwrite=overwrite, coords=labelled)
    finally:
        for hook in hooks:
            hook.remove()
    return open_activations(path)


def _checked_datapoints(datapoints: Sequence[Any] | None) -> np.ndarray | None:
    """``datapoints`` as a 1-d array of distinct labels, before the model runs (a repeated label was refused after
    the last batch; labels of 2 dims with a message of counts that agreed); None when not given."""
    if datapoints is None:
        return None
    labels = np.asarray(datapoints)
    if labels.ndim != 1:
        raise ValueError(f"datapoints must be one label per datapoint (1-d), got shape {labels.shape}")
    repeated = pd.Index(labels)
    if not repeated.is_unique:
        raise ValueError(f"datapoints repeats labels, e.g. {repeated[repeated.duplicated()].unique()[:5].tolist()}: "
                         f"give each datapoint its own")
    return labels


def _check_labels_left(datapoints: Sequence[Any] | None, coords: Mapping[str, xr.DataArray], count: int,
                       layer: str) -> None:
    """As the batches run: a ValueError once they have given ``layer`` more datapoints (``count``) than
    ``datapoints`` or a coordinate of ``coords`` labels, rather than after the last batch (whose check,
    ``_check_labels``, follows; and takes labels that tell no length)."""
    if datapoints is not None and hasattr(datapoints, "__len__") and len(datapoints) < count:
        raise ValueError(f"datapoints has {len(datapoints)} labels for {count} recorded datapoints so far: give one "
                         f"label per datapoint, in order")
    short = next((name for name, values in coords.items() if len(values) < count), None)
    if short is not None:
        raise ValueError(f"coords[{short!r}] has {len(coords[short])} labels and layer {layer!r} {count} datapoints "
                         f"so far: give one label per datapoint, in order")


def _check_labels(datapoints: Sequence[Any] | None, coords: Mapping[str, xr.DataArray], count: int, layer: str,
                  what: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The datapoint labels (``datapoints``, default 0 … ``count`` − 1) and the values of ``coords`` for ``count``
    datapoints (``what``: how they are counted, for the error), or a ValueError naming the one of another count."""
    labels = np.arange(count) if datapoints is None else np.asarray(datapoints)
    if labels.shape != (count,):
        raise ValueError(f"datapoints has {labels.size} labels for {what}: give one label per datapoint, in order")
    return labels, coord_values(coords, labels, layer)


def _write_coords(group: Any, shape: tuple[int, ...], labels: np.ndarray, image_size: tuple[int, int] | None,
                  dims: tuple[str, ...], compressors: tuple[Any, ...], extra: Mapping[str, np.ndarray], *,
                  positions: bool) -> None:
    """Coordinates of one recorded layer: the datapoint labels (the datapoints' ``positions``, marked so, where
    none were given: ``POSITIONS_ATTR``), ``default_coords`` (pixel centres in input-image units, the map's own
    pixels if the input is not an image) and ``extra`` ones on datapoint (named in the activations'
    ``coordinates`` attribute, as xarray writes them); checksummed as the activations are."""
    coords = {**default_coords(dict(zip(dims, shape)), image_size), "datapoint": labels}
    for name, values in {**coords, **extra}.items():
        values = np.asarray(values)
        dim = name if name in coords else "datapoint"
        if values.dtype.kind in "UO":  # variable-length strings have a stable zarr v3 spec; fixed-width do not
            group.create_array(name, shape=values.shape, dtype=str, dimension_names=(dim,),
                               compressors=compressors)[:] = values.astype(object)
        else:
            group.create_array(name, data=values, dimension_names=(dim,), compressors=compressors)
    if positions:
        group["datapoint"].attrs[POSITIONS_ATTR] = True
    if extra:
        group[VARIABLE].attrs["coordinates"] = " ".join(extra)
