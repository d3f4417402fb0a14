"""A whole run config: one dataset, its encoders and transforms, and every stage's settings."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from pipeline.config.base import Frozen, Name, Runtime
from pipeline.config.inputs import (
    DatasetSpec,
    EncodeOptions,
    EncoderItem,
    StoreOptions,
    SubsetSpec,
    TransformSpec,
)
from pipeline.config.sae import SaeConfig
from pipeline.config.stages import EvaluateConfig, OperatorsConfig, OrchestrationConfig, TrainConfig
from pipeline.config.tokens import TokensConfig


class RunConfig(Frozen):
    """A reconlab run: which images, which encoders, where the stores go, how to encode."""

    store_root: Path = Runtime(
        Path("runs/stores"), description="Folder holding content-addressed feature stores."
    )
    dataset: DatasetSpec
    splits: list[Name] = Field(
        default_factory=lambda: ["train", "val"],
        description="Splits every encoder's stores cover; the later stages add the stores they read (train's "
        "train_split and val_split, evaluate's and operators' split, the operators' transformed copies): "
        "`reconlab plan` lists each.",
    )
    subset: SubsetSpec = SubsetSpec()
    encoders: list[EncoderItem] = Field(
        min_length=1,
        description="Encoder names (configs/encoders/NAME.yaml), YAML paths, 'timm:<id>' / 'hf:<repo>' model ids, "
        "inline specs, or entries {encoder: ..., layers: [...]} (several layers, or a model id with options).",
    )
    transforms: list[TransformSpec] = Field(default_factory=lambda: [TransformSpec()])
    store: StoreOptions = StoreOptions()
    encode: EncodeOptions = EncodeOptions()
    train: TrainConfig = TrainConfig()
    operators: OperatorsConfig = OperatorsConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    sae: SaeConfig | None = Field(
        None, description="The SAE stage (sparse autoencoders); absent: the run has none."
    )
    tokens: TokensConfig | None = Field(
        None, description="The token utility stage (learned token selection); absent: the run has none."
    )

    @model_validator(mode="after")
    def _identity_transform(self) -> RunConfig:
        if TransformSpec() not in self.transforms:
            raise ValueError(
                "transforms must include {name: identity}: training and evaluation use f(x) itself"
            )
        return self
