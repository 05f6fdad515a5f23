"""Diffusion maths: pure functions of arrays, no Flax state and no config objects."""
