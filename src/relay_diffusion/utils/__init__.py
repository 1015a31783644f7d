"""Small shared helpers: crash-safe file writing, image conversion and grids, torchrun process groups."""
