"""Triton kernels of resfuse (installed as ``resfuse.kernels``).

Each module holds ``@triton.jit`` kernels and the launcher that computes
their strides, flags and grid. Validation and dispatch live in
``resfuse.ops``; nothing here is imported unless Triton is.
"""
