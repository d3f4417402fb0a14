"""The reconlab feature store: a self-describing Zarr v3 group per (dataset split, encoder, layer, transform).

`storage/README.md` is the normative spec; plain zarr, dask and xarray read stores without this package.
"""

from storage.creation import create
from storage.format import FORMAT_VERSION, FeatureStore, open_store
from storage.layout import StoreError, StoreLayout, StoreLocked

__all__ = [
    "FORMAT_VERSION",
    "FeatureStore",
    "StoreError",
    "StoreLayout",
    "StoreLocked",
    "create",
    "open_store",
]
