"""``python -m relay_diffusion`` (and ``torchrun -m relay_diffusion``) runs the ``rdm`` CLI."""

from relay_diffusion.cli import main

if __name__ == "__main__":
    main()
