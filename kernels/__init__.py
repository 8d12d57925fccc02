"""Triton ``@triton.jit`` kernels of eplb_triton, installed as ``eplb_triton.kernels``.

Only kernel code lives here; launchers, block-size choices and torch references are in
``eplb_triton.layout``.
"""
