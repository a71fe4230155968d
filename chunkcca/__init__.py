"""chunkcca: CCA-family similarity of neural-network representations, streamed from stores larger than memory."""

from .measures import (
    cca,
    cca_from_moments,
    cka,
    cka_from_moments,
    procrustes,
    procrustes_from_moments,
    pwcca,
    pwcca_from_moments,
    shape_metric,
    shape_metric_from_moments,
    svcca,
    svcca_from_moments,
)
from .moments import Moments
from .pairs import compute_moments
from .store import layer_paths, open_activations, write_activations
from .sweep import similarity

__all__ = [
    "Moments",
    "cca",
    "cca_from_moments",
    "cka",
    "cka_from_moments",
    "compute_moments",
    "layer_paths",
    "open_activations",
    "procrustes",
    "procrustes_from_moments",
    "pwcca",
    "pwcca_from_moments",
    "shape_metric",
    "shape_metric_from_moments",
    "similarity",
    "svcca",
    "svcca_from_moments",
    "write_activations",
]

__version__ = "0.1.0"
