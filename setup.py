"""galaxygen: sweeps of generative models of galaxy images on SLURM clusters."""

from setuptools import find_packages, setup

setup(
    name="galaxygen",
    version="0.1.0",
    description="HPC batch sweep toolkit for generative models of galaxy images",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["galaxygen", "galaxygen.*", "sweeps", "sweeps.*", "analysis", "analysis.*"]),
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "ray[tune]>=2.43",
        "submitit>=1.5",
        "pyarrow>=14",
        "pandas>=2.0",
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
        "galsim>=2.5",
        "statmorph>=0.7",
        "photutils>=1.9",
        "scikit-image>=0.21",
        "pillow>=10",
        "h5py>=3.8",
        "tqdm>=4.60",
        "pyyaml>=6",
        "diffusers==0.42.1",
    ],
    extras_require={
        "test": ["pytest>=7", "duckdb>=0.9", "ruff>=0.4"],
        "dev": ["pytest>=7", "duckdb>=0.9", "ruff>=0.4", "line_profiler", "py-spy"],
    },
    entry_points={
        "console_scripts": [
            "galaxygen-data=galaxygen.data.__main__:main",
            "galaxygen-train=galaxygen.train:main",
            "galaxygen-sample=galaxygen.sample:main",
            "galaxygen-evaluate=galaxygen.evaluate.__main__:main",
            "galaxygen-sweep=sweeps.launch:main",
            "galaxygen-figures=analysis.figures:main",
            "galaxygen-compare=analysis.compare:main",
        ]
    },
)
