"""Config loading fails at once, naming the file, the field and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, EncoderSpec
from pipeline.config_files import REPO_CONFIG_DIR, load_model, load_run_config


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_shipped_encoder_spec_loads_and_names_itself():
    paths = sorted((REPO_CONFIG_DIR / "encoders").glob("*.yaml"))
    assert len(paths) >= 19
    for path in paths:
        assert load_model(path, EncoderSpec).name == path.stem


def test_the_paper_table_is_covered_by_encoder_specs():
    names = {p.stem for p in (REPO_CONFIG_DIR / "encoders").glob("*.yaml")}
    for res in (224, 256, 384, 512):
        assert {f"siglip-b16-{res}", f"siglip2-b16-{res}"} <= names
    assert {
        "clip-b16-openai",
        "clip-b16-laion",
        "clip-b16-metaclip",
        "clip-b16-dfn",
        "eva02-clip-b16",
    } <= names
    assert {"sam-vit-b", "dinov2-b14", "internvit-300m-v1.5", "internvit-300m-v2.5"} <= names


def test_shipped_run_configs_load():
    for name in ("demo.yaml", "coco.yaml"):
        load_run_config(REPO_CONFIG_DIR / name)


def test_an_unknown_key_names_the_file_the_field_and_the_allowed_keys(tmp_path, write_run_config):
    data = yaml.safe_load(write_run_config().read_text())
    data["store"]["shard_size"] = 8
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    message = str(err.value)
    assert str(path) in message and "store.shard_size" in message and "shard_images" in message


def test_a_bad_value_names_the_field_and_the_allowed_values(tmp_path, write_run_config):
    data = yaml.safe_load(write_run_config().read_text())
    data["store"]["precision"] = "float8"
    with pytest.raises(ConfigError, match=r"store\.precision.*'float16'.*got 'float8'"):
        load_run_config(_write(tmp_path, data))


@pytest.mark.parametrize(
    ("section", "field", "value", "expected"),
    [
        ("subset", "seed", -1, r"`subset\.seed`: Input should be greater than or equal to 0 \(got -1\)"),
        ("train", "seed", -1, r"`train\.seed`: Input should be greater than or equal to 0"),
        ("evaluate", "seed", -3, r"`evaluate\.seed`: Input should be greater than or equal to 0"),
        ("train", "betas", [2, 0.9], r"`train\.betas\.0`: Input should be less than 1 \(got 2\)"),
    ],
)
def test_seeds_and_adams_betas_out_of_range_fail_at_load_time(
    tmp_path, write_run_config, section, field, value, expected
):
    """NumPy refuses a negative seed and Adam a beta outside [0, 1): found after the work had run."""
    data = yaml.safe_load(write_run_config().read_text())
    data.setdefault(section, {})[field] = value
    with pytest.raises(ConfigError, match=expected):
        load_run_config(_write(tmp_path, data))


def test_an_unknown_encoder_fails_at_load_time_listing_known_ones(tmp_path, write_run_config):
    data = yaml.safe_load(write_run_config().read_text())
    data["encoders"] = ["tiny-vit-65"]
    with pytest.raises(ConfigError, match="unknown encoder 'tiny-vit-65'.*tiny-vit-64"):
        load_run_config(_write(tmp_path, data))


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"encoder": "tiny-vit-64", "layers": [-1, -1]}, r"`encoders\.0`: Value error, layers \[-1, -1\] repeat"),
        ({"encoder": "tiny-vit-64", "every": 0}, r"`encoders\.0\.every`: Input should be greater than 0"),
        ({"encoder": "tiny-vit-64", "layerz": [-1]}, r"`encoders\.0\.layerz`: Extra .*allowed fields here: encoder,"),
        ({"name": "x", "backend": "timm", "model_id": "m", "resolution": 64, "patch_size": 16, "colour": 3},
         r"`encoders\.0\.colour`: Extra .*allowed fields here: name, backend"),
        (3, r"`encoders\.0`: an encoder is a name, a spec mapping, or a mapping \{encoder: NAME"),
    ],
)  # fmt: skip
def test_a_mistake_in_an_encoder_entry_is_reported_against_its_own_form_alone(
    tmp_path, write_run_config, entry, expected
):
    data = yaml.safe_load(write_run_config().read_text())
    data["encoders"] = [entry]
    with pytest.raises(ConfigError, match=expected) as err:
        load_run_config(_write(tmp_path, data))
    assert "<" not in str(err.value).split("\n", 1)[1].replace("<top level>", "")  # no union tags shown
    assert "encoders.0.str" not in str(err.value)  # nor the other forms' complaints


def test_a_resolution_that_is_not_a_multiple_of_the_patch_fails_with_a_fix(tmp_path):
    spec = yaml.safe_load((REPO_CONFIG_DIR / "encoders" / "tiny-vit-64.yaml").read_text())
    spec["resolution"] = 70
    with pytest.raises(ConfigError, match="not a multiple of patch_size 16; use e.g. 64"):
        load_model(_write(tmp_path, spec), EncoderSpec)


def test_a_positive_feature_layer_is_refused(tmp_path):
    spec = yaml.safe_load((REPO_CONFIG_DIR / "encoders" / "tiny-vit-64.yaml").read_text())
    spec["feature_layer"] = 3
    # one line for the field, not one per member of its type's union (`feature_layer.literal['last']`, ...)
    with pytest.raises(
        ConfigError,
        match=r"\(1 problem\(s\)\):\n  - field `feature_layer`: Input should be 'last' or less than 0 \(got 3\)$",
    ):
        load_model(_write(tmp_path, spec), EncoderSpec)


def test_an_encoder_file_is_named_after_its_encoder_and_a_missing_one_is_named_as_given(tmp_path):
    from pipeline.config_files import resolve_encoder

    spec = yaml.safe_load((REPO_CONFIG_DIR / "encoders" / "tiny-vit-64.yaml").read_text())
    other = tmp_path / "my-vit.yaml"
    other.write_text(
        yaml.safe_dump(spec)
    )  # name: tiny-vit-64, in my-vit.yaml: two store folders for one spec
    with pytest.raises(ConfigError, match="field `name` is 'tiny-vit-64' but the file is named 'my-vit'"):
        resolve_encoder(str(other), tmp_path / "run.yaml")
    (tmp_path / "tiny-vit-64.yaml").write_text(yaml.safe_dump(spec))
    assert resolve_encoder(str(tmp_path / "tiny-vit-64.yaml")).name == "tiny-vit-64"
    # it looked for "nonexistent.yaml.yaml" in the encoder folders
    with pytest.raises(
        ConfigError, match=r"run.yaml: field `encoders`: encoder file .*/nonexistent.yaml not found$"
    ):
        resolve_encoder(str(tmp_path / "nonexistent.yaml"), tmp_path / "run.yaml")


def test_yaml_syntax_errors_and_missing_files_name_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("store_root: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_run_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "nope.yaml")


def test_configs_are_frozen():
    spec = load_model(REPO_CONFIG_DIR / "encoders" / "tiny-vit-64.yaml", EncoderSpec)
    with pytest.raises(Exception, match="frozen"):
        spec.resolution = 32


def test_errors_inside_an_optional_section_keep_their_fields_and_a_list_items_union_is_one_line(tmp_path):
    data = yaml.safe_load((REPO_CONFIG_DIR / "demo.yaml").read_text())
    data["sae"] |= {
        "expansion": 0,
        "dead_window": 0,
        "encoders": [],
    }  # `sae: SaeConfig | None`: no union tags
    data["encoders"].append({"encoder": "tiny-vit-64", "layers": [-1, 3]})  # list[Layer], Layer a union
    with pytest.raises(ConfigError) as err:
        load_run_config(_write(tmp_path, data))
    lines = str(err.value).splitlines()[1:]
    assert lines == [
        f"  - field `encoders.{len(data['encoders']) - 1}.layers.1`: Input should be 'last' or less than 0 (got 3)",
        "  - field `sae.encoders`: List should have at least 1 item after validation, not 0 (got [])",
        "  - field `sae.expansion`: Input should be greater than or equal to 1 (got 0)",
        "  - field `sae.dead_window`: Input should be greater than 0 (got 0)",
    ], lines
