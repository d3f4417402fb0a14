"""The default reconstructor is the paper's released architecture: weight counts and shapes from the released
code (FusionBrainLab/feature_analysis, training/model.py), and its transformer layer computes what transformers'
CLIP encoder layer with QuickGELU computes."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ReconstructorConfig
from pipeline.models.reconstructor import Reconstructor


def _matrix_weights(module: nn.Module) -> int:
    return sum(
        m.weight.numel()
        for m in module.modules()
        if isinstance(m, nn.Linear | nn.Conv2d | nn.ConvTranspose2d)
    )


def test_released_architecture_for_vit_b16_at_224_has_the_released_weight_counts_and_shapes():
    model = Reconstructor(ReconstructorConfig(), 768, (14, 14), 16, 224)
    # Counted by hand from the released code: 4 CLIP layers of 4*768^2 + 2*768*3072; the decoder's four
    # ConvTranspose2d(k4) 768->384->192->96->48, six residual blocks (3x3 convs), and the 3x3 RGB conv.
    assert _matrix_weights(model.blocks) == 28_311_552
    assert _matrix_weights(model.decoder) + _matrix_weights(model.to_rgb) == 9_876_240
    assert _matrix_weights(model) == 38_187_792
    ups = [m for m in model.decoder.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [tuple(m.weight.shape) for m in ups] == [
        (768, 384, 4, 4),
        (384, 192, 4, 4),
        (192, 96, 4, 4),
        (96, 48, 4, 4),
    ]
    assert all(m.stride == (2, 2) and m.padding == (1, 1) for m in ups)
    n_res = [sum(1 for m in stage if m.__class__.__name__ == "ResidualConvBlock") for stage in model.decoder]
    assert n_res == [1, 1, 1, 3]
    assert tuple(model.to_rgb.weight.shape) == (3, 48, 3, 3)
    assert model.cls.shape == (1, 1, 768) and model.pos is None
    assert all(len(b.self_attn.q_proj.weight) == 768 and b.fc1.out_features == 3072 for b in model.blocks)
    assert model(torch.randn(1, 14, 14, 768)).shape == (1, 3, 224, 224)


def test_class_token_is_drawn_from_a_standard_normal_not_zeros():
    torch.manual_seed(0)
    cls = Reconstructor(ReconstructorConfig(depth=0), 768, (2, 2), 2, 4).cls.detach().flatten()
    assert 0.9 < cls.std().item() < 1.1 and abs(cls.mean().item()) < 0.1


def test_transformer_layer_equals_transformers_clip_encoder_layer_with_quick_gelu():
    from pipeline.models import _torchvision_shim

    _torchvision_shim.install()  # transformers imports torchvision ops (platform notes)
    from transformers import CLIPVisionConfig
    from transformers.models.clip import modeling_clip as clip

    torch.manual_seed(0)
    width = 128
    model = Reconstructor(ReconstructorConfig(depth=1), width, (3, 3), 2, 6).eval()
    ours = model.blocks[0]
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_attention_heads=2,
                              hidden_act="quick_gelu", attention_dropout=0.0, layer_norm_eps=1e-6)  # fmt: skip
    config._attn_implementation = "eager"
    reference = clip.CLIPEncoderLayer(config).eval()
    missing = reference.load_state_dict(
        {k.replace("fc1", "mlp.fc1").replace("fc2", "mlp.fc2"): v for k, v in ours.state_dict().items()}
    )
    assert not missing.missing_keys and not missing.unexpected_keys
    x = torch.randn(2, 10, width)
    with torch.no_grad():
        ref_out = reference(x, None)
        ref_out = ref_out[0] if isinstance(ref_out, tuple) else ref_out
        torch.testing.assert_close(ours(x), ref_out, atol=1e-5, rtol=1e-5)


def test_layer_norms_use_the_released_eps_and_older_checkpoints_keep_the_one_they_were_trained_with():
    from pipeline.models.checkpoints import _meta_model

    model = Reconstructor(ReconstructorConfig(depth=1), 64, (2, 2), 2, 4)
    assert {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}  # SiglipVisionConfig's
    geometry = {**ReconstructorConfig(depth=1).model_dump(mode="json"), "in_dim": 64, "grid_hw": [2, 2],
                "patch_size": 2, "out_size": 4}  # fmt: skip
    del geometry["layer_norm_eps"]
    old = _meta_model({"_json_path": "old.json", "model": geometry})
    assert {m.eps for m in old.modules() if isinstance(m, nn.LayerNorm)} == {1e-5}


def test_patch_tokens_leave_the_last_layer_without_a_final_layer_norm():
    torch.manual_seed(0)
    model = Reconstructor(ReconstructorConfig(depth=1), 64, (2, 2), 2, 4).eval()
    assert not any(isinstance(m, nn.LayerNorm) for m in model.decoder.modules())
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert norms == ["pre_norm", "blocks.0.layer_norm1", "blocks.0.layer_norm2"]


def test_output_ignores_each_tokens_norm():
    # Per-token L2 normalisation (paper): scaling every token by its own positive factor changes nothing.
    torch.manual_seed(0)
    model = Reconstructor(ReconstructorConfig(depth=1), 32, (2, 2), 4, 8).eval()
    feats = torch.randn(2, 2, 2, 32)
    scales = torch.rand(2, 2, 2, 1) * 50 + 0.01
    with torch.no_grad():
        torch.testing.assert_close(model(feats), model(feats * scales), atol=1e-5, rtol=1e-5)


def test_lighter_upsampling_option_keeps_the_output_size_with_a_quarter_of_the_upconv_weights():
    light = Reconstructor(ReconstructorConfig(upsample_kernel=2), 768, (14, 14), 16, 224)
    ups = [m for m in light.decoder.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert sum(m.weight.numel() for m in ups) == (768 * 384 + 384 * 192 + 192 * 96 + 96 * 48) * 4
    assert light(torch.randn(1, 14, 14, 768)).shape == (1, 3, 224, 224)


def test_a_patch_size_that_is_not_a_power_of_two_gives_the_encoders_resolution():
    model = Reconstructor(ReconstructorConfig(depth=1, last_stage_res_blocks=1), 64, (3, 3), 14, 42)
    assert model(torch.randn(1, 3, 3, 64)).shape == (1, 3, 42, 42)
    assert model.decoded_size == 48  # 3 tokens x 2^4, resized to 42


def test_positional_embedding_and_width_options_change_the_model():
    base = Reconstructor(ReconstructorConfig(), 128, (4, 4), 16, 64)
    options = Reconstructor(
        ReconstructorConfig(positional_embedding="learned", width_multiplier=0.5, depth=2),
        128,
        (4, 4),
        16,
        64,
    )
    assert base.pos is None and options.pos is not None and options.pos.shape == (1, 16, 64)
    assert len(options.blocks) == 2 and options(torch.randn(2, 4, 4, 128)).shape == (2, 3, 64, 64)
