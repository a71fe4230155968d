"""chunkcca: CCA-family similarity of neural-network representations, streamed from stores larger than memory.

The public names load on first use (PEP 562): ``import chunkcca`` takes milliseconds, and the ``chunkcca`` command
loads Dask, xarray and zarr where a Ctrl-C is answered in one line (``chunkcca.cli``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import cca, cka, compare, compute_moments, procrustes, pwcca, shape_metric, similarity, svcca
    from .layers import layer_paths
    from .measures import (
        MEASURES,
        cca_from_moments,
        cka_from_moments,
        procrustes_from_moments,
        pwcca_from_moments,
        shape_metric_from_moments,
        svcca_from_moments,
    )
    from .moments import Moments
    from .options import SolveOptions, StreamOptions
    from .store import (
        check_result_path,
        describe_store,
        leftover_writes,
        open_activations,
        save_result,
        write_activations,
    )

#: Each public name → the module that defines it.
_HOMES: dict[str, str] = {
    **dict.fromkeys(("cca", "cka", "compare", "compute_moments", "procrustes", "pwcca", "shape_metric",
                     "similarity", "svcca"), "api"),
    "layer_paths": "layers",
    **dict.fromkeys(("MEASURES", "cca_from_moments", "cka_from_moments", "procrustes_from_moments",
                     "pwcca_from_moments", "shape_metric_from_moments", "svcca_from_moments"), "measures"),
    "Moments": "moments",
    **dict.fromkeys(("SolveOptions", "StreamOptions"), "options"),
    **dict.fromkeys(("check_result_path", "describe_store", "leftover_writes", "open_activations", "save_result",
                     "write_activations"), "store"),
}

__all__ = [
    "MEASURES",
    "Moments",
    "SolveOptions",
    "StreamOptions",
    "cca",
    "cca_from_moments",
    "check_result_path",
    "cka",
    "cka_from_moments",
    "compare",
    "compute_moments",
    "describe_store",
    "layer_paths",
    "leftover_writes",
    "open_activations",
    "procrustes",
    "procrustes_from_moments",
    "pwcca",
    "pwcca_from_moments",
    "save_result",
    "shape_metric",
    "shape_metric_from_moments",
    "similarity",
    "svcca",
    "svcca_from_moments",
    "write_activations",
]

__version__ = "0.1.0"


#: The package's modules, each loaded as an attribute when first asked for (``chunkcca.measures``).
_SUBMODULES = ("api", "blas", "checkpoint", "cli", "cluster", "compat", "datasets", "demo", "engine", "ingest",
               "integrity", "layers", "measures", "minibatch", "moments", "options", "passes", "plot", "progress",
               "record", "report", "rows", "store", "tiles", "whitening")

if not TYPE_CHECKING:  # type checkers read the imports above; a module __getattr__ would make any name pass

    def __getattr__(name: str) -> Any:
        """A public name or module, imported the first time it is asked for."""
        if name in _SUBMODULES:
            return importlib.import_module(f".{name}", __name__)
        if name not in _HOMES:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*__all__, *_SUBMODULES, *(name for name in globals() if name.startswith("__"))})
