"""The mathematics of relay diffusion as pure functions of tensors and generators.

``blur``      block DCT, the blur operator, block noise and the blur time schedule (docs/math.md §2-4, 6c)
``process``   :class:`BlurProcess`, the stage-2 forward process as one typed config
``rng``       one generator per seed (§8)
``samplers``  EDM's stage-1 samplers and the relay blur sampler (§6)
``losses``    EDM, VP, VE and blur losses (§5)
``toy``       the exact denoiser of Gaussian data, for tests and ``rdm smoke``
"""
