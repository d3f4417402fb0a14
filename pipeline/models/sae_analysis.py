"""What the SAE stage measures on held-out vectors, for both kinds of SAE: the Pareto rows (R², L0, dead and dense
latents), the PCA baseline, stability across seeds and image:text mixes, and, for embedding SAEs of one
vision-language model, concept energy per modality, modality scores and the Bridge Score with its top bridges
(arXiv:2504.11695)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.config import SaeConfig
from pipeline.data import caption_store
from pipeline.models import sae_training
from pipeline.science import sae as science
from storage import FeatureStore


def pareto_rows(models: dict, fidelity: dict, dense_frequency: float) -> list[dict]:
    return [{"model": s.name, "variant": s.kind, "sparsity": s.sparsity, "seed": s.seed, "text_share": s.text_share,
             "n_latents": m.n_latents, "r2": fidelity[s].r2, "l0": fidelity[s].l0,
             "dead_latents": int((fidelity[s].fired == 0).sum()),
             "dense_latents": int((fidelity[s].firing_frequency() > dense_frequency).sum())}
            for s, m in models.items()]  # fmt: skip


@torch.no_grad()
def pca_rows(sae, train_chunks, eval_chunks, ks: list[int]) -> list[dict]:
    """The linear baseline: PCA fitted on training vectors (normalised as the SAEs' inputs) with k components, R² on
    the same held-out vectors (`eval_chunks()`: a fresh iterator of raw arrays), for each k."""

    def normalised(chunk):
        x = torch.from_numpy(np.asarray(chunk, np.float32)).to(sae.input_mean.device)
        return sae.normalise(x.reshape(-1, x.shape[-1]))[0].cpu().numpy()

    moments = None
    for chunk in train_chunks:
        x = normalised(chunk)
        moments = moments or science.Moments.empty(x.shape[1])
        moments.update(x)
    mean, components = moments.principal_axes()
    ks = [k for k in ks if k <= len(components)]
    fidelity = {k: science.Fidelity() for k in ks}
    for chunk in eval_chunks():
        x = normalised(chunk)
        for k in ks:
            fidelity[k].update(x, science.pca_reconstruct(x, mean, components, k))
    return [{"model": f"pca-{k}", "variant": "pca", "sparsity": k, "seed": None, "text_share": None, "n_latents": k,
             "r2": fidelity[k].r2, "l0": float(k), "dead_latents": 0, "dense_latents": k} for k in ks]  # fmt: skip


@torch.no_grad()
def stability(models: dict, main, energy: np.ndarray) -> dict:
    """The primary setting's other seeds (and image:text mixes) matched to its first run: mean matched cosine,
    overall and by concept energy."""
    first = models[main].decoder.detach().cpu().numpy()
    rows, by_energy = [], []
    for spec, sae in models.items():
        if (spec.kind, spec.sparsity) == (main.kind, main.sparsity) and spec != main:
            matched, _ = science.match_dictionaries(first, sae.decoder.detach().cpu().numpy())
            across = "seeds" if spec.text_share == main.text_share else "image:text mixes"
            rows.append({"a": main.name, "b": spec.name, "across": across, "mean matched cosine": float(matched.mean()),
                         "share above 0.9": float((matched > 0.9).mean())})  # fmt: skip
            by_energy += [{"b": spec.name, **r} for r in science.stability_by_energy(matched, energy)]
    columns = ["a", "b", "across", "mean matched cosine", "share above 0.9"]  # header-only CSVs when one run
    by_energy_columns = ["b", "energy bin", "n_concepts", "mean matched cosine"]
    return {
        "pairs": pd.DataFrame(rows, columns=columns),
        "by_energy": pd.DataFrame(by_energy, columns=by_energy_columns),
    }


@torch.no_grad()
def _codes(sae, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(normalised inputs, their reconstructions, codes) of raw vectors."""
    x_n, _ = sae.normalise(torch.from_numpy(np.asarray(vectors, np.float32)))
    codes = sae.activate(sae.pre_activations(x_n))
    return x_n.numpy(), sae.decode(codes).numpy(), codes.numpy()


def evaluate_embeddings(cfg: SaeConfig, train: FeatureStore, held_out: FeatureStore, rows: np.ndarray, saes: dict,
                        text_train: Path, text_eval: Path) -> dict:  # fmt: skip
    """Embedding SAEs on the held-out images' embeddings and their captions' embeddings."""
    models = {spec: sae_training.load(path, "cpu")[0] for spec, path in saes.items()}  # small: CPU is enough
    main = sae_training.primary(cfg)
    image_ids = held_out.image_ids()[rows]
    images = held_out.embeddings(rows)
    captions = caption_store.read(text_eval)
    held = np.isin(captions.image_ids, image_ids)
    texts, text_image_ids = captions.embeddings[held], captions.image_ids[held]
    text_strings = [t for t, keep in zip(captions.texts, held, strict=True) if keep]
    fidelity = {spec: science.Fidelity() for spec in models}
    per_modality = []
    for spec, sae in models.items():
        for modality, vectors in (("image", images), ("text", texts)):
            x_n, x_hat, codes = _codes(sae, vectors)
            fidelity[spec].update(x_n, x_hat, codes)
            alone = science.Fidelity()
            alone.update(x_n, x_hat, codes)
            per_modality.append({"model": spec.name, "modality": modality, "n_vectors": len(vectors),
                                 "r2": alone.r2, "l0": alone.l0})  # fmt: skip
    table = pareto_rows(models, fidelity, cfg.dense_frequency)
    train_captions = caption_store.read(text_train)
    train_chunks = [train.embeddings(np.flatnonzero(train.valid())[:4096]), train_captions.embeddings[:4096]]
    table += pca_rows(models[main], train_chunks, lambda: [images, texts],
                      sorted({max(1, round(r["l0"])) for r in table}))  # fmt: skip
    _, _, z_img = _codes(models[main], images)
    _, _, z_txt = _codes(models[main], texts)
    energy_img, energy_txt = science.energy(z_img), science.energy(z_txt)
    modality = science.modality_score(energy_img, energy_txt)
    position = {int(i): n for n, i in enumerate(image_ids)}
    pair_img = z_img[[position[int(i)] for i in text_image_ids]]  # each caption with its own image
    decoder = models[main].decoder.detach().numpy()
    unit = decoder / np.linalg.norm(decoder, axis=1, keepdims=True)
    bridges = science.bridge_scores(pair_img, z_txt, decoder)
    listed = []
    for a, b, score in science.top_bridges(bridges, cfg.n_bridges):
        top_images = np.argsort(z_img[:, a])[::-1][:3]
        top_captions = np.argsort(z_txt[:, b])[::-1][:2]
        listed.append({"image concept": a, "text concept": b, "bridge score": score,
                       "modality of a": float(modality[a]), "modality of b": float(modality[b]),
                       "cos(d_a, d_b)": float(unit[a] @ unit[b]),
                       "images where a fires most": ", ".join(str(int(image_ids[i])) for i in top_images),
                       "captions where b fires most": " | ".join(text_strings[i] for i in top_captions),
                       "_image_rows": [int(rows[i]) for i in top_images]})  # fmt: skip
    energy = (energy_img * len(images) + energy_txt * len(texts)) / (len(images) + len(texts))
    firing = fidelity[main].firing_frequency()
    return {"pareto": pd.DataFrame(table), "per_modality": pd.DataFrame(per_modality),
            "stability": stability(models, main, energy), "energy": energy, "firing": firing,
            "primary": main.name, "modality": modality, "bridges": listed,
            "bridge_images": [held_out.pixels(np.array(b["_image_rows"])) for b in listed]
            if held_out.layout.store_pixels else [],
            "unimodal_share": float(np.nanmean((modality < 0.1) | (modality > 0.9)))}  # fmt: skip
