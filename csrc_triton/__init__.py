"""Triton kernels of muscle_fast: kernels and their launchers, tensors in, tensors out.

Kernels here know nothing of nn.Module, transformers or backends (``muscle_fast.ops`` dispatches
to them). Import the op modules lazily: ``TRITON_INTERPRET`` must be set before triton is first
imported for the CPU interpreter to take effect. ``_common`` and ``configs`` import no triton.
"""
