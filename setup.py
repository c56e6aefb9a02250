"""Build and install vespo-megatron; the C++ packer is built with pybind11 (numpy buffers, no torch headers)."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "vespo_megatron._packer",
        ["csrc/packer.cpp"],
        depends=["csrc/packer_layout.hpp", "csrc/packer_parallel.hpp", "csrc/packer_samples.hpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(
    name="vespo-megatron",
    version="0.1.0",
    description="VESPO off-policy RL, MoE routing replay and checkpoint conversion on Megatron-Core",
    packages=find_packages(include=["vespo_megatron", "vespo_megatron.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16,<0.17",
        "numpy",
        "psutil",  # megatron-core's dist_checkpointing needs it but does not declare it
        "safetensors",
        "transformers>=5.0",
        "tqdm",
        "matplotlib",
        "requests",
        "datasets",  # prompt datasets: jsonl, parquet, save_to_disk directories
        "math-verify",  # the math reward: answer extraction and equivalence
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "hypothesis", "tensorboard"],
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["vespo-megatron=vespo_megatron.cli:main"]},
)
