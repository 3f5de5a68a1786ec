"""diffode_jax: maximum-likelihood training and exact likelihood of diffusion ODEs in JAX."""

from setuptools import find_packages, setup

setup(
    name="diffode_jax",
    version="0.1.0",
    description="Maximum-likelihood training and exact likelihood evaluation of diffusion "
                "ODEs (i-DODE) in JAX/Flax",
    packages=find_packages(include=["diffode_jax", "diffode_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "jaxlib>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "diffrax>=0.7",
        "tensorflow-cpu>=2.18",
        "tensorflow-datasets>=4.9.7",
        # tfds 4.9 imports it to prepare a builder defined outside tfds
        # (diffode_jax/data/imagenet32_new.py) even on Python >= 3.9, where its own
        # metadata does not require it.
        "importlib_resources>=6",
        "tensorboard>=2.18",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "numpy>=1.26",
        "scipy>=1.13",
        "pillow>=10",
        "tqdm>=4.66",
        "scikit-learn>=1.5",
        "matplotlib>=3.8",
    ],
    extras_require={"test": ["pytest>=8", "scikit-learn>=1.5"]},
)
