"""Relay generation: stage configs and presets, stages, the pipeline, image files and ``generate_images``."""
