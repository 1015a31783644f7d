"""Relay Diffusion Models (Teng et al., ICLR 2024) in PyTorch.

Sub-packages, in the direction imports flow:
``core`` (block DCT, blur, block noise, samplers, losses, per-seed generators) -> ``networks`` (layers,
U-Nets, preconditioning) -> ``checkpoints`` (snapshots, reference import) -> ``data`` / ``generation`` /
``training`` / ``metrics`` -> ``cli``. ``utils`` holds file, image and process-group helpers used by all.
"""

__version__ = "0.1.0"
