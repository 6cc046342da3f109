from pathlib import Path

from setuptools import setup

setup(
    name="rho-fused",
    version="0.1.0",
    description="Fused Triton kernels for the Rho-1 Selective Language Modeling loss",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["rho_fused", "rho_fused.backends", "rho_fused.kernels"],
    package_dir={"rho_fused": "rho_fused", "rho_fused.kernels": "kernels"},
    install_requires=[
        # The kernels need Triton 3.2 (torch 2.6 brings it). CI tests Triton 3.2.0, 3.6.0 (the GPU
        # machine's) and the main venv's, under the interpreter and compiled offline for sm_80/sm_90;
        # the only torch it can install is 2.13.
        "torch>=2.6",
        "triton>=3.2; platform_system == 'Linux'",
        "transformers>=4.46",
        "datasets>=2.19",
        "accelerate>=1.1",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "trl>=1.16", "peft>=0.21", "tensorboard"],
        "demo": ["champ-dataset", "matplotlib"],
        "bench": ["pytest-benchmark", "matplotlib", "cut-cross-entropy"],
        # rho_fused.trl (SelectiveSFTTrainer) and `rho-fused train --report-to tensorboard`
        "trl": ["trl>=1.16", "peft>=0.21"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["rho-fused=rho_fused.cli:main"]},
)
