"""Relay Diffusion Models (Teng et al., ICLR 2024) in PyTorch.

Modules, in the direction imports flow:
``rng`` / ``forward`` (block DCT, blur, block noise) -> ``layers`` -> ``networks`` -> ``precond``
-> (``losses``, ``samplers``) -> pipeline / training -> ``cli``.
"""

__version__ = "0.1.0"
