"""Triton kernels of muscle_fast (installed as ``muscle_fast.kernels``).

Kernels here know nothing of nn.Module or transformers: they take tensors and
return tensors. Import this package lazily: ``TRITON_INTERPRET`` must be set
before triton is first imported for the CPU interpreter to take effect.
"""
