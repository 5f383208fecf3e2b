"""Packaging for meddiffusers."""

import os

from setuptools import find_packages, setup

here = os.path.abspath(os.path.dirname(__file__))
with open(os.path.join(here, "README.md"), encoding="utf-8") as readme:
    long_description = readme.read()

install_requires = [
    # PyTorch is a floor only: install the build that fits your platform first.
    "torch>=2.6",
    # The loader registration touches diffusers internals, so the minor range is pinned to the tested one.
    "diffusers>=0.42,<0.43",
    "accelerate>=1.0",
    "safetensors>=0.4",
    "huggingface_hub>=1.0",
    "einops>=0.8",
    "nibabel>=5.0",
    "numpy>=1.24",
    "tqdm",
]

extras = {
    "test": ["pytest>=8", "pytest-xdist>=3", "nilearn>=0.10", "ruff>=0.6", "datasets>=3.0", "scikit-image>=0.22"],
    "training": ["datasets>=3.0", "tensorboard"],
    "xformers": ["xformers"],
    "docs": ["hf-doc-builder>=0.5"],
    # The 2.5D (MAISI) feature extractor of `meddiffusers evaluate` builds torchvision's 2D backbones.
    "evaluation": ["torchvision"],
}
extras["dev"] = sorted({dep for deps in extras.values() for dep in deps if dep not in ("xformers", "torchvision")})

setup(
    name="meddiffusers",
    version="0.1.0.dev0",
    description="Diffusion models for 3D medical imaging (CT and MRI volumes) in Hugging Face diffusers conventions.",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"meddiffusers": ["demo/*/*", "demo/*/*/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=install_requires,
    extras_require=extras,
    entry_points={"console_scripts": ["meddiffusers=meddiffusers.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
