"""chunkcca: CCA-family similarity of neural-network representations, streamed from stores larger than memory."""

from .measures import cca, cca_from_moments
from .moments import Moments
from .pairs import compute_moments
from .store import layer_paths, open_activations, write_activations

__all__ = [
    "Moments",
    "cca",
    "cca_from_moments",
    "compute_moments",
    "layer_paths",
    "open_activations",
    "write_activations",
]

__version__ = "0.1.0"
