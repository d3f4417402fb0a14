"""What each stage makes: one small frozen type per stage, built by the plan (pipeline/plan.py) and executed by
the flows. A stage module imports these, the artifact layer, storage, models, data and science; never another
stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import (
    DatasetSpec,
    EncodeOptions,
    EncoderSpec,
    OperatorPairSpec,
    OperatorsConfig,
    SaeConfig,
    StoreOptions,
    SubsetSpec,
    TokensConfig,
    TrainConfig,
    TransformSpec,
)


@dataclass(frozen=True)
class EncodeJob:
    """One store's worth of work: a split, an encoder, a transform."""

    store_root: Path
    dataset: DatasetSpec
    split: str
    subset: SubsetSpec
    encoder: EncoderSpec
    transform: TransformSpec
    store: StoreOptions
    options: EncodeOptions


@dataclass(frozen=True)
class TrainJob:
    train_store: Path
    val_store: Path
    cfg: TrainConfig


@dataclass(frozen=True)
class OperatorJob:
    identity_store: Path  # f(x) on the held-out split
    transform_store: Path  # f(T x) on the same images
    pair: OperatorPairSpec
    checkpoint: Path  # the reconstructor used to look at the operators
    cfg: OperatorsConfig


@dataclass(frozen=True)
class EvalTarget:
    encoder_name: str
    store: Path  # held-out store of this encoder
    checkpoint: Path  # its reconstructor


@dataclass(frozen=True)
class TokensJob:
    train_store: Path  # trains the selectors and completions
    eval_store: Path  # held-out images they are evaluated on
    checkpoint: Path  # the encoder's reconstructor R, to look at completed token sets in pixels
    judge: EncoderSpec | None  # scores R's images against the originals (None: pixels only)
    cfg: TokensConfig


@dataclass(frozen=True)
class SaeJob:
    train_store: Path  # trains the SAEs
    eval_store: Path  # held-out images of every metric
    checkpoint: Path  # the encoder's reconstructor R, to see concepts and the SAE's cost in pixels
    cfg: SaeConfig
    text_train: Path | None = None  # inputs: embeddings: the caption stores of the two splits
    text_eval: Path | None = None
