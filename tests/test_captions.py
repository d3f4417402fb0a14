"""The text-encode stage on a tiny random CLIP (both towers) with a tokenizer trained here on the demo captions,
saved with save_pretrained and loaded back through the real code path; nothing is mocked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import EncodeOptions, EncoderSpec, SubsetSpec


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, demo_root) -> EncoderSpec:
    import json

    from pipeline.models import _torchvision_shim

    _torchvision_shim.install()  # before transformers imports torchvision
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_clip")
    captions = [a["caption"] for split in ("train", "val")
                for a in json.loads((demo_root / "annotations" / f"captions_{split}.json").read_text())["annotations"]]  # fmt: skip
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(
        captions, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    )
    PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)  # fmt: skip
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "pad_token_id": 0, "bos_token_id": 2,
                     "eos_token_id": 3},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return EncoderSpec(name="tiny-clip-test", backend="transformers", model_id="tiny-random-clip", resolution=32,
                       patch_size=8, preprocessing_source="hf_image_processor", weights=str(folder), keep_head=True)  # fmt: skip


def test_captions_are_embedded_in_the_space_of_the_image_embeddings_and_found_again(
    tiny_clip, demo_dataset, tmp_path
):
    from pipeline.config import StoreOptions, TransformSpec
    from pipeline.models import text_towers
    from pipeline.stages import captions, encode
    from pipeline.stages.encode import EncodeJob
    from storage import open_store

    job = captions.CaptionJob(
        tmp_path, demo_dataset, "val", SubsetSpec(max_images=5), tiny_clip, batch_size=3
    )
    result = captions.run(job)
    embeddings, image_ids, texts = captions.read(result.path)
    assert result.n_captions == len(texts) == len(embeddings) == len(image_ids) >= 5
    expected = text_towers.load(tiny_clip).embed(texts[:4])
    np.testing.assert_allclose(embeddings[:4], expected, rtol=1e-4, atol=1e-6)
    assert captions.run(job).already_complete
    image_job = EncodeJob(tmp_path, demo_dataset, "val", SubsetSpec(max_images=5), tiny_clip, TransformSpec(),
                          StoreOptions(shard_images=4), EncodeOptions(batch_size=4, num_workers=0, embeddings=True))  # fmt: skip
    store = open_store(encode.run(image_job, progress=False).store_path)
    assert store.embeddings().shape[1] == embeddings.shape[1] == 16  # one projected space
    assert set(image_ids) == set(store.image_ids())  # every caption describes an image of the store


def test_a_model_without_a_tokenizer_fails_before_any_work_saying_where_it_looked(
    tiny_clip, demo_dataset, tmp_path
):
    import shutil

    from pipeline.models.weights import WeightsNotFoundError
    from pipeline.stages import captions

    bare = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_clip.weights, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    spec = tiny_clip.model_copy(update={"weights": str(bare)})
    with pytest.raises(WeightsNotFoundError, match="no tokenizer files"):
        captions.run(captions.CaptionJob(tmp_path, demo_dataset, "val", SubsetSpec(max_images=2), spec))
