"""sferd_jax: SFERD distillation of diffusion models in JAX/Flax. The metadata is in pyproject.toml; this shim says
where the packages are: sferd_jax/, and configs/ shipped inside it as sferd_jax/configs (so `sferd --config=<name>`
finds them in an installed package too)."""

import setuptools

setuptools.setup(
    packages=setuptools.find_packages(include=['sferd_jax', 'sferd_jax.*']) + ['sferd_jax.configs'],
    package_dir={'sferd_jax.configs': 'configs'},
)
