"""Diagnostics of a trained classifier: the Fourier (frequency-domain) analysis of SPEC section 6."""

from .fourier import frequency_deviations, gaussian_filter, gaussian_filter_dense_ref
from .tracking import FourierTracker, embedding_module, neighbourhood_size, plot_fourier

__all__ = [
    "FourierTracker",
    "embedding_module",
    "frequency_deviations",
    "gaussian_filter",
    "gaussian_filter_dense_ref",
    "neighbourhood_size",
    "plot_fourier",
]
