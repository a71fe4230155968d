"""chunkcca: CCA-family similarity of neural-network representations, streamed from stores larger than memory."""

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
from .store import describe_store, leftover_writes, open_activations, save_result, write_activations

__all__ = [
    "MEASURES",
    "Moments",
    "SolveOptions",
    "StreamOptions",
    "cca",
    "cca_from_moments",
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
