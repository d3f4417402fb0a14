"""Typed, frozen run configs loaded from YAML: `base` (frozen models, the Runtime marker, names, hashing),
`inputs` (what a feature store is made of), `stages` (training, operators, evaluation, orchestration), `tokens` (the token utility stage), `run`
(a whole run). Import from here.

Every model forbids unknown keys; `pipeline.config_files` loads them from YAML and turns a bad file into an
error naming the file, the dotted field path, what is allowed and what was given, before any work starts.
"""

from pipeline.config.base import RUNTIME, ConfigError, Frozen, Name, Runtime, canonical_json, config_hash
from pipeline.config.inputs import (
    Compressor,
    DatasetSpec,
    EncodeOptions,
    EncoderEntry,
    EncoderSpec,
    Layer,
    Precision,
    SplitSpec,
    StoreOptions,
    SubsetSpec,
    TransformSpec,
)
from pipeline.config.run import RunConfig
from pipeline.config.sae import SaeConfig
from pipeline.config.stages import (
    ComparisonSpec,
    EvaluateConfig,
    OperatorPairSpec,
    OperatorsConfig,
    OrchestrationConfig,
    ReconstructorConfig,
    TrainConfig,
)
from pipeline.config.tokens import TokenNetworkConfig, TokensConfig

__all__ = [
    "RUNTIME", "ComparisonSpec", "Compressor", "ConfigError", "DatasetSpec", "EncodeOptions", "EncoderEntry", "EncoderSpec", "Layer",
    "EvaluateConfig", "Frozen", "Name", "OperatorPairSpec", "OperatorsConfig", "OrchestrationConfig", "Precision",
    "ReconstructorConfig", "RunConfig", "Runtime", "SaeConfig", "SplitSpec", "StoreOptions", "SubsetSpec", "TokenNetworkConfig", "TokensConfig", "TrainConfig",
    "TransformSpec", "canonical_json", "config_hash",
]  # fmt: skip
