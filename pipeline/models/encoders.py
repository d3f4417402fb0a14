"""One loader for every frozen encoder: `load(spec)` returns an Encoder that turns images into patch grids.

timm and transformers models go through the same object; preprocessing is read from the model's own config
(timm `pretrained_cfg`, the HF image processor) and recorded, never re-typed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from pipeline.config import ConfigError, EncoderSpec, Layer
from pipeline.data.images import Preprocessing
from pipeline.models import _torchvision_shim, loaders
from pipeline.models.model_ids import check_architecture
from pipeline.models.weights import (
    WeightsMismatchError,
    WeightsNotFoundError,
    weights_mismatch,
)


class _StopForward(Exception):
    pass


@dataclass
class Encoder:
    """A loaded frozen encoder. `encode` returns patch tokens only, as a [B, H, W, D] grid."""

    spec: EncoderSpec
    model: torch.nn.Module
    preprocessing: Preprocessing
    weights_id: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    compute_dtype: torch.dtype = torch.float32
    n_prefix_tokens: int = -1  # set by the first forward pass (probe at load time)
    hidden_dim: int = -1

    @property
    def grid(self) -> tuple[int, int]:
        return self.spec.grid

    def at_layer(self, spec: EncoderSpec) -> Encoder:
        """The same loaded model read at another feature layer (`spec` differs from this one's only there)."""
        if spec == self.spec:
            return self
        view = replace(self, spec=spec, n_prefix_tokens=-1, hidden_dim=-1)
        _probe(view)
        return view

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> normalised float tensor [3, S, S]."""
        pixels = torch.from_numpy(self.preprocessing.to_pixels(image.convert("RGB")))
        return self.normalize(pixels[None])[0].cpu()

    def seen(self, pixels_nhwc_uint8: torch.Tensor) -> torch.Tensor:
        """The pixels this encoder sees: the spec's input_transform applied (the stored targets stay intact)."""
        transform = self.spec.input_transform
        if transform is None:
            return pixels_nhwc_uint8
        from pipeline.data.images import apply_transform

        return torch.from_numpy(
            np.stack([apply_transform(im, transform) for im in pixels_nhwc_uint8.numpy()])
        )

    def normalize(self, pixels_nhwc_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] -> normalised float32 [B, 3, S, S] on the encoder's device."""
        pixels = pixels_nhwc_uint8.to(self.device, non_blocking=True)
        return self.preprocessing.normalize(pixels)

    @torch.inference_mode()
    def encode(self, pixels_nchw: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, S, S] -> float32 patch features [B, H, W, D] (prefix tokens dropped)."""
        x = pixels_nchw.to(self.device, non_blocking=True)
        autocast = self.compute_dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=autocast):
            tokens = self._tokens(x)
        return self._to_grid(tokens.float())

    @torch.inference_mode()
    def embed(self, pixels_nchw: torch.Tensor) -> torch.Tensor:
        """Normalised images -> pooled image embeddings [B, E] (with the projection head if kept), float32."""
        x = pixels_nchw.to(self.device, non_blocking=True)
        autocast = self.compute_dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=autocast):
            if self.spec.backend == "timm":
                out = self.model(x)
            elif hasattr(self.model, "get_image_features"):
                out = self.model.get_image_features(pixel_values=x)
                out = getattr(out, "pooler_output", out)
            else:
                out = self.model(pixel_values=x).pooler_output
        return out.float()

    @torch.inference_mode()
    def embedding_dim(self) -> int:
        """Width of `embed`'s pooled embeddings (one probe forward pass)."""
        size = self.preprocessing.crop_size
        return int(self.embed(torch.zeros(1, 3, size, size)).shape[-1])

    @torch.inference_mode()
    def encode_layers(self, pixels_nchw: torch.Tensor, layers: list[Layer]) -> list[torch.Tensor]:
        """One forward pass, the patch grids [B, H, W, D] of several layers (float32), in the order asked; each
        equals `encode` of a spec with that feature_layer."""
        x = pixels_nchw.to(self.device, non_blocking=True)
        autocast = self.compute_dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=autocast):
            tokens = self._tokens_at(x, layers)
        return [self._to_grid(t.float()) for t in tokens]

    def _vision_kwargs(self, vision) -> dict:
        if getattr(vision.config, "image_size", self.spec.resolution) != self.spec.resolution:
            return {"interpolate_pos_encoding": True}
        return {}

    @property
    def is_cnn(self) -> bool:
        return self.spec.backend == "timm" and not hasattr(self.model, "blocks")

    def _layers(self) -> list:
        """The blocks (ViT) or stages (CNN) that negative feature layers count back through."""
        if self.is_cnn:
            return list(self.model.feature_info)
        if self.spec.backend == "transformers":
            return list(_hf_blocks(getattr(self.model, "vision_model", self.model)))
        return list(self.model.blocks)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self._tokens_at(x, [self.spec.feature_layer])[0]

    def _tokens_at(self, x: torch.Tensor, layers: list[Layer]) -> list[torch.Tensor]:
        """Raw outputs of `layers` ('last' = the model's final features), in the order asked: forward hooks keep
        only those blocks' outputs, and the pass stops after the deepest one unless 'last' is among them."""
        if self.is_cnn:
            stages = [layer for layer in layers if layer != "last"]
            if "last" not in layers:
                maps = self.model.forward_intermediates(x, indices=stages, intermediates_only=True)
            else:
                final, maps = self.model.forward_intermediates(x, indices=stages or [-1], norm=False)
            n = len(
                self.model.feature_info
            )  # timm returns the maps shallowest first, whatever the order asked
            by_stage = dict(zip(sorted(set(stages), key=lambda layer: n + layer), maps, strict=False))
            maps = [final if layer == "last" else by_stage[layer] for layer in layers]
            return [m.permute(0, 2, 3, 1) for m in maps]  # NCHW -> the [B, H, W, D] grid
        if self.spec.backend == "transformers":
            vision = getattr(self.model, "vision_model", self.model)
            run = lambda: vision(pixel_values=x, **self._vision_kwargs(vision)).last_hidden_state  # noqa: E731
            blocks = _hf_blocks(vision)
        else:
            run, blocks = lambda: self.model.forward_features(x), self.model.blocks  # noqa: E731
        wanted = {len(blocks) + layer for layer in layers if layer != "last"}
        captured: dict[int, torch.Tensor] = {}
        stop_after = None if "last" in layers else max(wanted)

        def grab(index: int):
            def hook(_module, _inputs, output):
                captured[index] = output[0] if isinstance(output, tuple) else output
                if index == stop_after:
                    raise _StopForward  # later blocks, the final norm and the head are not needed

            return hook

        hooks = [blocks[i].register_forward_hook(grab(i)) for i in sorted(wanted)]
        final = None
        try:
            final = run()
        except _StopForward:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        return [final if layer == "last" else captured[len(blocks) + layer] for layer in layers]

    def _to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        if tokens.ndim == 4:  # CNN maps and timm SAM-style blocks are [B, H, W, D]; necks give [B, D, H, W]
            return tokens if self.is_cnn or tokens.shape[1:3] == (h, w) else tokens.permute(0, 2, 3, 1)
        n_prefix = tokens.shape[1] - h * w
        if n_prefix < 0:
            raise RuntimeError(
                f"encoder '{self.spec.name}' returned {tokens.shape[1]} tokens, fewer than the {h}x{w} grid implied "
                f"by resolution {self.spec.resolution} / patch {self.spec.patch_size}"
            )
        return tokens[:, n_prefix:].reshape(tokens.shape[0], h, w, tokens.shape[-1])

    def describe(self) -> dict:
        return {
            "name": self.spec.name,
            "backend": self.spec.backend,
            "model_id": self.spec.model_id,
            "weights": self.spec.weights,
            "weights_id": self.weights_id,
            "family": "cnn" if self.is_cnn else "vit",
            "n_layers": len(self._layers()),
            "feature_layer": self.spec.feature_layer,
            "resolution": self.spec.resolution,
            "patch_size": self.spec.patch_size,
            "grid_hw": list(self.grid),
            "hidden_dim": self.hidden_dim,
            "n_prefix_tokens_dropped": self.n_prefix_tokens,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "preprocessing": self.preprocessing.to_dict(),
            "input_transform": self.spec.input_transform.tag if self.spec.input_transform else None,
        }


def _hf_blocks(vision) -> torch.nn.ModuleList:
    """The transformer layers of a transformers vision model, whose outputs are its hidden_states[1:]."""
    encoder = getattr(vision, "encoder", None)
    for name in ("layers", "layer"):
        blocks = getattr(encoder, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            return blocks
    raise ValueError(
        f"{type(vision).__name__}: no encoder.layers / encoder.layer list of transformer layers to read features from"
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' is set (encode.device, train.device, tokens.device, sae.device or --device) but torch "
            f"sees no CUDA device here (torch {torch.__version__}, "
            f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'a CPU build'}); set it to auto or cpu, or "
            "install a CUDA build of torch (README, 'GPU users')"
        )
    return torch.device(device)


def resolve_compute_dtype(compute_dtype: str, device: torch.device) -> torch.dtype:
    if compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, compute_dtype)


def load(
    spec: EncoderSpec, device: str = "auto", compute_dtype: str = "auto", geometry: str = "short_side_crop"
) -> Encoder:
    """Build the encoder of `spec` with its weights; fails before any work if the weights are absent.

    geometry: 'short_side_crop' (the same field of view for every encoder) or 'native' (the model's own eval
    transform); see Preprocessing."""
    _torchvision_shim.install()
    torch_device = resolve_device(device)
    check_architecture(spec)
    try:
        if spec.backend == "timm":
            model, preprocessing, weights_id = loaders.load_timm(spec)
        else:
            model, preprocessing, weights_id = loaders.load_transformers(spec)
    except Exception as e:  # timm, transformers and safetensors fail in many ways on a file of another model
        if spec.weights == "random" or isinstance(
            e, (WeightsNotFoundError, WeightsMismatchError, ConfigError)
        ):
            raise
        raise weights_mismatch(spec, e) from e
    model.eval().requires_grad_(False).to(torch_device)
    encoder = Encoder(
        spec=spec,
        model=model,
        preprocessing=preprocessing.with_geometry(geometry),
        weights_id=weights_id,
        device=torch_device,
        compute_dtype=resolve_compute_dtype(compute_dtype, torch_device),
    )
    _probe(encoder)
    return encoder


def _probe(encoder: Encoder) -> None:
    """One forward on a blank image: learn D and the prefix count, and check them against the spec."""
    spec = encoder.spec
    blank = torch.zeros(1, spec.resolution, spec.resolution, 3, dtype=torch.uint8)
    with torch.inference_mode():
        tokens = encoder._tokens(encoder.normalize(blank))
    h, w = spec.grid
    if tokens.ndim == 4 and encoder.is_cnn and tokens.shape[1:3] != (h, w):
        raise ConfigError(  # the spec's YAML, found at load time
            f"encoder '{spec.name}': layer {spec.feature_layer} gives a {tokens.shape[1]}x{tokens.shape[2]} feature "
            f"map at resolution {spec.resolution}, not the {h}x{w} grid of patch_size {spec.patch_size}; set "
            f"patch_size to that stage's stride ({spec.resolution // tokens.shape[1]}) and a resolution it divides"
        )
    encoder.n_prefix_tokens = 0 if tokens.ndim == 4 else tokens.shape[1] - h * w
    encoder.hidden_dim = (
        tokens.shape[-1] if tokens.ndim == 3 or tokens.shape[1:3] == (h, w) else tokens.shape[1]
    )
    if spec.n_prefix_tokens is not None and spec.n_prefix_tokens != encoder.n_prefix_tokens:
        raise ConfigError(  # the spec's YAML, found at load time
            f"encoder '{spec.name}': spec says n_prefix_tokens={spec.n_prefix_tokens} but the model returns "
            f"{encoder.n_prefix_tokens} tokens before its {h}x{w} patch grid; fix n_prefix_tokens in its YAML"
        )
    if spec.hidden_dim is not None and spec.hidden_dim != encoder.hidden_dim:
        raise ConfigError(  # the spec's YAML, found at load time
            f"encoder '{spec.name}': spec says hidden_dim={spec.hidden_dim} but the model's features have "
            f"D={encoder.hidden_dim}; fix hidden_dim in its YAML"
        )
