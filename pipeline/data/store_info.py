"""What a feature store says about itself, read once into one typed object (spec: storage/README.md).

Every stage reads store attributes through `StoreInfo.of(store)`, never by string keys of its own.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.datasets import sample_mismatches
from pipeline.data.images import Preprocessing
from storage import FeatureStore, StoreError, open_store
from storage.inspect import transform_tag

# What must agree between the stores a reconstructor is trained on and used on.
ENCODER_IDENTITY = (
    "backend",
    "model_id",
    "weights_id",
    "feature_layer",
    "grid_hw",
    "hidden_dim",
    "preprocessing",
    "input_transform",
)


@dataclass(frozen=True)
class StoreInfo:
    path: Path
    encoder_name: str
    encoder: dict  # the whole recorded description (name, model id, layer, grid, preprocessing, ...)
    encoder_identity: dict  # the ENCODER_IDENTITY fields, as recorded
    preprocessing: Preprocessing
    patch_size: int
    resolution: int
    dataset: dict  # name, kind, split, subset, image_list_sha256
    dataset_source: dict | None  # where the images were read from (not part of the key)
    key: dict  # the store key (`config`): what the store's folder name hashes
    transform_tag: str
    config_hash: str  # the store key's hash (its folder name)
    content_sha256: str  # digest of every data byte; '' while the store is partial
    n_encoded: int  # 0 while partial
    feature_stats: dict

    @classmethod
    def of(cls, store: FeatureStore) -> StoreInfo:
        attrs = store.attrs
        enc = attrs["encoder"]
        return cls(
            path=store.path,
            encoder_name=enc["name"],
            encoder=enc,
            encoder_identity={k: enc.get(k) for k in ENCODER_IDENTITY},
            preprocessing=Preprocessing.from_dict(enc["preprocessing"]),
            patch_size=enc["patch_size"],
            resolution=enc["resolution"],
            dataset=attrs["dataset"],
            dataset_source=attrs.get("dataset_source"),
            key=attrs["config"],
            transform_tag=transform_tag(attrs["image_transform"]),
            config_hash=attrs["config_hash"],
            content_sha256=attrs.get("content_sha256", ""),
            n_encoded=attrs.get("n_encoded", 0),
            feature_stats=attrs.get("feature_stats", {}),
        )

    @property
    def network(self) -> dict:
        """What makes stores layers of one network: the encoder identity without the layer and its grid/width."""
        layer_fields = ("feature_layer", "grid_hw", "hidden_dim")
        return {k: v for k, v in self.encoder_identity.items() if k not in layer_fields}

    @property
    def depth(self) -> int | None:
        """1-based number of the stored block (CNN: stage); 'last' (after the final norm) counts as n_layers + 1.
        None for stores written before the encoder's n_layers was recorded."""
        n, layer = self.encoder.get("n_layers"), self.encoder["feature_layer"]
        if n is None:
            return None
        return n + 1 if layer == "last" else n + layer + 1

    @property
    def digest(self) -> dict:
        """How a downstream artifact names what it read: the store's key and its content."""
        return {"config_hash": self.config_hash, "content_sha256": self.content_sha256}


def check_same_encoder(a: StoreInfo, b: StoreInfo) -> None:
    diff = [k for k in ENCODER_IDENTITY if a.encoder_identity[k] != b.encoder_identity[k]]
    if diff:
        details = "; ".join(f"{k}: {a.encoder_identity[k]!r} vs {b.encoder_identity[k]!r}" for k in diff)
        raise StoreError(f"stores {a.path.name} and {b.path.name} come from different encoders ({details})")


def open_encoded(path: Path) -> FeatureStore:
    """A complete store with at least one encoded image and finite features (what every stage after encode
    reads), or a StoreError saying which: a NaN token makes a reconstruction, a fit or a score NaN."""
    store = open_store(path)
    if not StoreInfo.of(store).n_encoded:
        raise StoreError(f"{path}: store has no encoded images")
    check_finite(store)
    return store


def check_finite(store: FeatureStore) -> None:
    """A StoreError if a complete store's recorded statistics count NaN or inf features."""
    path, info = store.path, StoreInfo.of(store)
    n_nonfinite = info.feature_stats.get("n_nonfinite", 0)
    n_inf = info.feature_stats.get("n_over_float16_max", 0) if store.layout.precision == "float16" else 0
    if n_nonfinite:
        raise StoreError(f"{path}: the encoder gave {n_nonfinite} non-finite feature values (NaN or inf, before "
                         "storing); check its weights and encode.dtype, then encode again (`reconlab run --force "
                         "encode`, or delete this store)")  # fmt: skip
    if n_inf:
        raise StoreError(f"{path}: {n_inf} feature values are above float16's range (inf in this store); encode "
                         "again with store.precision float32 or bf16_bitround")  # fmt: skip


def check_same_image_files(store: FeatureStore, records: list, root) -> None:
    """The store was made from the files `records` list now: its recorded content fingerprint still matches
    (stores made before it was recorded are not checked)."""
    recorded = store.attrs.get("image_files_sample", [])
    if changed := sample_mismatches(recorded, records):
        raise StoreError(
            f"{store.path}: made from other image files than {root} holds now under the same names ({len(changed)} "
            f"of {len(recorded)} fingerprinted files differ, e.g. {changed[0]}); to encode these images, give the "
            "dataset another `name:` (new stores beside these), or remove these stores (`reconlab run --force "
            "encode`)"
        )


def check_some_encoded(path: Path) -> None:
    """A finished store holds at least one image. One that holds none was read from a wrong images folder or a
    split of unusable files: it is removed (there is nothing in it to keep), so the corrected config encodes."""
    store = open_store(path)
    if store.attrs.get("n_encoded", 1):
        return
    reasons = Counter(f["reason"].split(":")[0] for f in store.attrs.get("failures", []))
    shutil.rmtree(path)
    raise StoreError(
        f"{path}: none of its {store.n_images} images could be used "
        f"({', '.join(f'{n} {reason}' for reason, n in reasons.most_common(3))}): check dataset.root and the "
        "split's images_dir / annotations; the empty store was removed"
    )
