"""Command-line tools beside the main CLI (python -m sferd_jax.tools.<name>)."""
