from setuptools import find_packages, setup

setup(
    name="blip2-engine",
    version="0.1.0",
    description="Finetuning engine for BLIP-2 / InstructBLIP vision-language models on DeepSpeed",
    packages=find_packages(include=["engine", "engine.*"]),
    python_requires=">=3.10",
    # torch is deliberately unpinned here: the set-up script installs the exact
    # torch/torchvision pair first, and this range must be satisfied by it.
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "deepspeed>=0.15",
        "transformers>=5.0",
        "accelerate>=0.34",
        "peft>=0.13",
        "timm>=1.0",
        "tokenizers>=0.20",
        "safetensors",
        "pycocoevalcap",
        "tensorboard",
        "pyyaml",
        "tqdm",
        "pillow",
        "numpy",
        "scipy",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "matplotlib"],  # tests/test_run_logs.py runs tools/plot_run.py
        "quant": ["bitsandbytes>=0.43"],
        "plots": ["matplotlib"],
    },
)
