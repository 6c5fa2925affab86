"""Diagnostics of a trained classifier: the Fourier (frequency-domain) analysis of SPEC section 6."""

from .fourier import frequency_deviations, gaussian_filter, gaussian_filter_dense_ref

__all__ = ["frequency_deviations", "gaussian_filter", "gaussian_filter_dense_ref"]
