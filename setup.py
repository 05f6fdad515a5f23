"""sferd_jax: SFERD distillation of diffusion models in JAX/Flax."""

import setuptools

setuptools.setup(
    name='sferd_jax',
    version='0.1.0',
    description='SFERD: progressive distillation with an attention-guided teacher and a semantic gradient '
                'predictor, in JAX/Flax.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['sferd_jax', 'sferd_jax.*']),
    python_requires='>=3.11',
    install_requires=[
        'jax>=0.10.2,<0.12',
        'flax>=0.12.8,<0.13',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.12.4,<0.13',
        'chex>=0.1.92,<0.2',
        'ml-collections>=1.1,<2',
        'numpy>=2.0,<3',
        'absl-py>=2.0,<3',
        'pillow>=10,<14',
        'scikit-learn>=1.5,<2',  # the embedded default dataset (digits) and the quickstart's classifier metric
        'scipy>=1.13,<2',        # FID's matrix square root
    ],
    extras_require={
        'data': ['tensorflow-datasets>=4.9.10,<5', 'importlib_resources>=7', 'array_record>=0.8.6',
                 'grain>=0.2.18,<0.3'],
        'eval': ['matplotlib>=3.8,<4'],
        'gcs': ['gcsfs>=2024.2', 'google-cloud-storage>=2.14,<4'],  # --workdir=gs://... (launch/README.md)
        'test': ['pytest>=9,<10', 'pytest-xdist>=3.8,<4'],
    },
)
