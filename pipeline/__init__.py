"""reconlab stage logic: configs, encoders, datasets and the stages, importable without Prefect."""

__version__ = "0.1.0"
