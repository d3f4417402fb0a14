"""reconlab stage logic: configs, encoders, datasets and the stages, importable without Prefect."""

from pipeline import cpus  # noqa: F401  first: reads this process's CPUs before anything loads torch

__version__ = "0.1.0"
