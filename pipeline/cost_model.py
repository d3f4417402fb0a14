"""What a run costs before it runs: GPU-hours and disk bytes per planned artifact (`reconlab plan --estimate`).

FLOPs are counted on each model itself (torch's FlopCounterMode over a forward on the meta device: the real
architecture at the run's resolution, no weights, no GPU); time is FLOPs over the GPU's peak times its
utilisation (measured on one GPU, or assumed where the rates say so), or the host's measured CPU cost where that
is the larger (decoding and writing in the encode stage, the train loader), from configs/rates.yaml. Every row
says which of its figures are counted, measured or assumed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import EncoderSpec, ReconstructorConfig, RunConfig
from pipeline.config.rates import Rates
from pipeline.models import sae_training, token_training
from pipeline.models.reconstructor import Reconstructor
from pipeline.plan import RunPlan

MB = 1e6


@dataclass(frozen=True)
class Estimate:
    stage: str
    encoder: str
    what: str
    images: int
    compute_hours: float  # the GPU's own work: counted FLOPs at the rates' share of its peak
    host_hours: float  # what the host does alongside (decode and write, the train loader); 0: nothing
    host_ms: float  # the host's CPU milliseconds per image (per pass for training)
    disk_gb: float  # what it leaves on disk
    basis: str  # where the figures come from (the same for every row of a stage)
    path: str = ""  # the store an encode row fills (the plan table's key for it)

    @property
    def gpu_hours(self) -> float:
        """Hours the stage holds one GPU: its compute, or the host feeding it where that is slower."""
        return max(self.compute_hours, self.host_hours)

    @property
    def bound(self) -> str:
        if self.compute_hours == self.host_hours == 0:
            return ""  # filled by another row's pass (a layer of the same encoder)
        return "GPU compute" if self.compute_hours >= self.host_hours else "host"


def estimate(run: RunPlan, rates: Rates, with_operators: bool = True) -> list[Estimate]:
    """One row per planned artifact, named as `reconlab plan` names it (stage, encoder, what; encode rows also by
    store folder); the studies' caption stores (embedding SAEs) are not modelled."""
    cfg = run.cfg
    rows = [row for group in run.one_pass_groups(list(run.encode)) for row in _encode_rows(run, group, rates)]
    for name, job in run.train.items():
        spec, n = run.encode[job.train_store].encoder, run.n_images[job.train_store]
        rows.append(_train_row(cfg, name, spec, n, rates))
    for step in run.operators if with_operators else []:
        spec, n = run.encode[step.identity_store].encoder, run.n_images[step.identity_store]
        rows.append(_operators_row(cfg, spec, f"{step.pair.transform.tag} {step.pair.direction}", n, rates))
    for store in run.evaluate.values():
        rows.append(_evaluate_row(cfg, run, run.encode[store].encoder, run.n_images[store], rates))
    for stage, steps in run.studies.items():
        for step in steps:
            study, spec = getattr(cfg, stage), run.encode[step.train_store].encoder
            sizes = run.n_images[step.train_store], run.n_images[step.eval_store]
            rows += _study_rows(stage, study, spec, cfg, *sizes, rates)
    return rows


def _study_rows(stage: str, study, spec: EncoderSpec, cfg: RunConfig, n_train: int, n_eval: int,
                rates: Rates) -> list[Estimate]:  # fmt: skip
    """The study's networks (each trained `epochs` passes over the train store) and its evaluation (each network
    on the held-out images, each result seen through R)."""
    h, w = spec.grid
    width, n_tokens = _width(spec, rates), h * w
    if stage == "tokens":
        counts = [_token_network_counts(network, study, width, n_tokens)
                  for network in token_training.network_specs(study)]  # fmt: skip
        basis_networks = "token networks' FLOPs counted"
    else:  # SAEs: the encoder and decoder matmuls, 4 D L per vector (the JumpReLU kernel has no meta support)
        vectors, latents = (1 if study.inputs == "embeddings" else n_tokens), study.expansion * width
        counts = [(4 * width * latents * vectors, 2 * width * latents) for _ in sae_training.sae_specs(study)]
        basis_networks = "SAE matmuls counted by formula (4 x width x latents per vector)"
    forwards = [flops for flops, _ in counts]
    n_eval = min(study.n_eval_images or n_eval, n_eval)
    loader_ms = n_tokens * width * 2 / MB * rates.host.loader_ms_per_mb[cfg.store.precision]
    train = Estimate(
        stage, spec.name, f"networks on {study.train_split}", n_train,
        _hours(3 * n_train * study.epochs * sum(forwards), rates, "train"),
        len(forwards) * n_train * study.epochs * loader_ms / 1e3 / 3600, loader_ms,
        sum(16 * params for _, params in counts) / 1e9,  # weights, two Adam moments, final weights: 16 B each
        f"{len(forwards)} networks x {study.epochs} epochs; {basis_networks} (x3 for the backward pass); "
        f"{_gpu_basis(rates, 'train')}; host: the train loader's measured CPU rate, one pass per network",
    )  # fmt: skip
    r_flops = reconstructor_flops(cfg.train.model, spec, rates)
    evaluation = Estimate(
        stage, spec.name, f"evaluation on {study.split}", n_eval,
        _hours(n_eval * (sum(forwards) + len(forwards) * r_flops), rates, "evaluate"), 0.0, 0.0, 0.0,
        f"each network on the held-out images and its result through R (FLOPs counted); {_gpu_basis(rates, 'evaluate')}",
    )  # fmt: skip
    return [train, evaluation]


def _token_network_counts(network, study, width: int, n_tokens: int) -> tuple[float, int]:
    """(forward FLOPs of one image, parameters) of a token study network, built on the meta device."""
    with torch.device("meta"):
        model = token_training.build(network, study, width, n_tokens)
        tokens = torch.empty(1, n_tokens, width)
        with FlopCounterMode(display=False) as counter:
            if network.method == "learned":
                model.keep_logits(tokens)
            model.complete(tokens, torch.empty(1, n_tokens))
    return float(counter.get_total_flops()), sum(p.numel() for p in model.parameters())


def _utilisation(rates: Rates, stage: str, step_flops: float) -> float:
    """The stage's share of the peak for steps of `step_flops`: a GPU is fuller the more work a step holds (the
    reconstructor at the paper's batch 10 reached 0.058 of an H200 at 224 px and 0.113 at 512)."""
    points = rates.gpu.utilisation_by_step_tflop.get(stage)
    if not points:
        return rates.gpu.utilisation[stage]
    tflops, shares = zip(*sorted(points.items()), strict=True)
    return float(np.interp(np.log(step_flops / 1e12), np.log(tflops), shares))


def _hours(flops: float, rates: Rates, stage: str, utilisation: float | None = None) -> float:
    share = utilisation or rates.gpu.utilisation[stage]
    return flops / (rates.gpu.peak_tflops * 1e12 * share) / 3600


def _gpu_basis(rates: Rates, stage: str) -> str:
    peak = f"{rates.gpu.name} {rates.gpu.peak_tflops:g} TFLOP/s"
    if rates.gpu.utilisation_by_step_tflop.get(stage):
        return f"{peak} x the share measured for a step of that much work (GPU utilisation below, by step)"
    return f"{peak} x {rates.gpu.utilisation[stage]:g} (GPU utilisation below)"


def _width(spec: EncoderSpec, rates: Rates) -> int:
    return spec.hidden_dim or encoder_width(spec, rates)


def _encode_rows(run: RunPlan, group: list, rates: Rates) -> list[Estimate]:
    """One forward pass over the split fills every store of `group` (an encoder's layers): its GPU and host time
    are on the first store's row, each store's bytes on its own."""
    job, n = run.encode[group[0]], run.n_images[group[0]]
    spec, store = job.encoder, job.store
    h, w = spec.grid
    pixels = spec.resolution**2 * 3 * rates.stored_bytes.pixels if store.store_pixels else 0
    # the other layers' stores hard-link the first one's pixel files: no bytes, no writing
    stored_mb = [(h * w * _width(run.encode[p].encoder, rates) * 2 * rates.stored_bytes.features[store.precision]
                  + (pixels if k == 0 else 0)) / MB for k, p in enumerate(group)]  # fmt: skip
    write_ms = rates.host.write_ms_per_mb[store.precision] * sum(stored_mb)
    cpu_ms = rates.host.decode_resize_ms[job.options.jpeg_draft] + write_ms
    basis = (f"FLOPs counted; {_gpu_basis(rates, 'encode')}; host: decode, resize, compress and write at the "
             f"measured CPU rates on {rates.host.cpu_cores} cores; bytes: measured ratios ({store.precision}); "
             "the layers of one encoder share one pass (its time on the first layer's row)")  # fmt: skip
    first = (_hours(n * encoder_flops(spec, rates), rates, "encode"), n * cpu_ms / 1e3 / rates.host.cpu_cores / 3600,
             cpu_ms)  # fmt: skip
    return [
        Estimate("encode", run.encode[p].encoder.name, f"{job.split} {job.transform.tag}", n,
                 *(first if k == 0 else (0.0, 0.0, 0.0)), n * mb * MB / 1e9, basis, str(p))
        for k, (p, mb) in enumerate(zip(group, stored_mb, strict=True))
    ]  # fmt: skip


def _train_row(cfg: RunConfig, name: str, spec: EncoderSpec, n: int, rates: Rates) -> Estimate:
    epochs, precision = cfg.train.epochs, cfg.store.precision
    h, w = spec.grid
    feature_mb, pixel_mb = h * w * _width(spec, rates) * 2 / MB, spec.resolution**2 * 3 / MB
    loader_ms = (
        feature_mb * rates.host.loader_ms_per_mb[precision]
        + pixel_mb * rates.host.loader_ms_per_mb["float16"]
    )
    params = reconstructor_params(cfg.train.model, spec, rates)
    # torch.compile's own rate where the rates have one
    stage = "train_compiled" if cfg.train.compile and "train_compiled" in rates.gpu.utilisation else "train"
    image_flops = 3 * reconstructor_flops(cfg.train.model, spec, rates)  # x3: the backward pass
    utilisation = _utilisation(rates, stage, cfg.train.batch_size * image_flops)
    return Estimate(
        "train", name, cfg.train.train_split, n,
        _hours(n * epochs * image_flops, rates, stage, utilisation),
        n * epochs * loader_ms / 1e3 / 3600, loader_ms,
        params * 4 * (3 + 1) / 1e9,  # the latest epoch checkpoint (weights, two Adam moments) + final weights
        f"{epochs} epochs; FLOPs counted (x3 for the backward pass); {_gpu_basis(rates, stage)}, "
        f"{cfg.train.batch_size} images a step; host: the train "
        f"loader at its measured CPU rate ({precision}); disk: the last epoch checkpoint and the final weights",
    )  # fmt: skip


def _operators_row(cfg: RunConfig, spec: EncoderSpec, tag: str, n: int, rates: Rates) -> Estimate:
    n_eval = min(cfg.operators.n_eval_images or n, n)
    flops = 2 * n_eval * reconstructor_flops(cfg.train.model, spec, rates)  # R of T(f(x)) and of f(T(x))
    fits = 3 * _width(spec, rates) ** 2 * 8  # a D x D float64 matrix per fit
    return Estimate("operators", spec.name, tag, n, _hours(flops, rates, "evaluate"), 0.0, 0.0, fits / 1e9,
                    "FLOPs counted (reconstructions of the test pairs); the fits run on the CPU in seconds")  # fmt: skip


def _evaluate_row(cfg: RunConfig, run: RunPlan, spec: EncoderSpec, n: int, rates: Rates) -> Estimate:
    judges = sum(encoder_flops(j, rates) for j in run.judges) * len(cfg.evaluate.judge_modes) * 2  # image + R
    flops = n * (reconstructor_flops(cfg.train.model, spec, rates) + judges)
    return Estimate("evaluate", spec.name, f"scores on {cfg.evaluate.split}", n, _hours(flops, rates, "evaluate"),
                    0.0, 0.0, n * 200 / 1e9,  # a few scores per image
                    f"FLOPs counted (R + {len(run.judges)} judges x {len(cfg.evaluate.judge_modes)} modes); "
                    f"{_gpu_basis(rates, 'evaluate')}")  # fmt: skip


@functools.cache
def _timm_trunk(model_id: str, resolution: int) -> tuple[float, int]:
    """(forward FLOPs of one image through the trunk, output width) of a timm architecture, on the meta device."""
    from pipeline.models import _torchvision_shim

    _torchvision_shim.install()
    import timm

    with torch.device("meta"):
        try:
            model = timm.create_model(model_id, pretrained=False, img_size=resolution)
        except TypeError:  # CNNs take any size and no img_size
            model = timm.create_model(model_id, pretrained=False)
        with FlopCounterMode(display=False) as counter:
            model.forward_features(torch.empty(1, 3, resolution, resolution))
    return float(counter.get_total_flops()), int(model.num_features)


def _architecture(spec: EncoderSpec, rates: Rates) -> str:
    if spec.backend == "timm":
        return spec.model_id
    if spec.model_id in rates.flop_twins:
        return rates.flop_twins[spec.model_id]
    raise ValueError(
        f"encoder '{spec.name}': cannot count the FLOPs of {spec.backend} model {spec.model_id}; add a timm "
        "architecture of the same depth, width and patch under flop_twins in the rates file"
    )


def encoder_flops(spec: EncoderSpec, rates: Rates) -> float:
    return _timm_trunk(_architecture(spec, rates), spec.resolution)[0]


def encoder_width(spec: EncoderSpec, rates: Rates) -> int:
    return _timm_trunk(_architecture(spec, rates), spec.resolution)[1]


@functools.cache
def _reconstructor_counts(
    cfg_json: str, width: int, grid: tuple[int, int], patch: int, size: int
) -> tuple[float, int]:
    """(forward FLOPs of one image, parameters) of the reconstructor, built on the meta device."""
    with torch.device("meta"):
        model = Reconstructor(ReconstructorConfig.model_validate_json(cfg_json), width, grid, patch, size)
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, *grid, width))
    return float(counter.get_total_flops()), sum(p.numel() for p in model.parameters())


def _counts(cfg: ReconstructorConfig, spec: EncoderSpec, rates: Rates) -> tuple[float, int]:
    return _reconstructor_counts(cfg.model_dump_json(), _width(spec, rates), spec.grid, spec.patch_size,
                                 spec.resolution)  # fmt: skip


def reconstructor_flops(cfg: ReconstructorConfig, spec: EncoderSpec, rates: Rates) -> float:
    return _counts(cfg, spec, rates)[0]


def reconstructor_params(cfg: ReconstructorConfig, spec: EncoderSpec, rates: Rates) -> int:
    return _counts(cfg, spec, rates)[1]
