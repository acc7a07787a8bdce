from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="sphere-ar-hf",
    version="0.1.0",
    description="SphereAR (hyperspherical-latent autoregressive image generation) for transformers and diffusers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"sphere_ar_hf": ["data/*.json", "pretrained/*/*.json", "pretrained/*/*/*.json",
                                   "pretrained/*/*/*.safetensors"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.6",  # sampling, eager and fast, ran on 2.6-2.14 (README, Install)
        "transformers>=5.0",
        "diffusers>=0.35",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "huggingface-hub>=1.0",
        "numpy>=1.24",
        "pillow>=9.0",
        "jinja2>=3.0",
        "tqdm>=4.60",
    ],
    extras_require={
        # training: datasets for data, lpips (+ torchvision, its backbone) for the S-VAE's perceptual loss
        "train": ["datasets>=3.0", "lpips>=0.1.4", "torchvision", "tensorboard>=2.10", "scikit-learn>=1.3",
                  "peft>=0.17"],
        "demo": ["gradio>=6.31,<7"],
        # evaluation: torch-fidelity's TF-ported InceptionV3 (brings scipy, torchvision); scikit-learn: digits features
        "eval": ["torch-fidelity>=0.3", "scikit-learn>=1.3"],
        "test": ["pytest>=8", "matplotlib>=3.7",
                 "ruff>=0.6", "datasets>=3.0", "lpips>=0.1.4", "torchvision", "tensorboard>=2.10",
                 "scikit-learn>=1.3", "peft>=0.17", "gradio>=6.31,<7", "gradio_client>=2.0", "playwright>=1.50",
                 "httpx", "torch-fidelity>=0.3", "spaces>=0.40"],
    },
    entry_points={"console_scripts": ["sphere-ar=sphere_ar_hf.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
