"""Config files: YAML -> frozen config models, with errors that name the file, the field and what is allowed;
encoder specs found by name under configs/encoders/."""

from __future__ import annotations

import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config import ConfigError, EncoderEntry, EncoderSpec, RunConfig

# The shipped configs: top-level configs/ in a checkout, linked as pipeline/configs so a wheel carries them.
REPO_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


M = TypeVar("M", bound=BaseModel)

# Quote at most this much of an offending value: an alias-bomb YAML must not become a 100 MB message.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 120
_SHORT.maxlist = _SHORT.maxdict = 6
_SHORT.maxlevel = 1
_MAX_PROBLEMS = 6


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (the second would silently win)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _union_members_merged(errors: list[dict], model: type[BaseModel]) -> list[dict]:
    """A value no member of a plain union accepts gives one error per member, under a tag such as
    `literal['last']` or `constrained-int`: one error per field, its messages joined ("'last' or less than 0")."""
    merged: dict[tuple, dict] = {}
    for e in errors:
        loc = e["loc"]
        is_member = len(loc) > 1 and isinstance(loc[-1], str) and _is_union_field(model, loc[:-1])
        key = loc[:-1] if is_member else loc
        if key in merged and is_member:
            merged[key]["msg"] += " or " + e["msg"].removeprefix("Input should be ")
        else:
            merged[key] = {**e, "loc": key}
    return list(merged.values())


def _is_union_field(model: type[BaseModel], loc: tuple) -> bool:
    """Whether the value at `loc` (a field, or an item of a list field) is typed as a union of two or more types,
    whose errors come one per member under the member's tag, not an optional model (`sae: SaeConfig | None`, whose
    errors name its own fields) nor a dict."""
    *path, name = loc
    items = 0
    while isinstance(name, int) and path:  # an item of a list field
        *path, name = path
        items += 1
    parent = _model_at(model, tuple(path))
    field = parent.model_fields.get(name) if parent is not None and isinstance(name, str) else None
    annotation = _plain(field.annotation if field is not None else None)
    for _ in range(items):  # list[X] -> X
        annotation = _plain((typing.get_args(annotation) or (None,))[0])
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _plain(annotation):
    """An annotation without Annotated[...] and without `| None` (a union only where two types remain)."""
    while True:
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(members) == 1:
            annotation = members[0]
            continue
        return annotation


def _format_validation_error(path: Path, err: ValidationError, model: type[BaseModel]) -> str:
    errors = _union_members_merged(err.errors(), model)
    lines = [f"{path}: invalid {model.__name__} ({len(errors)} problem(s)):"]
    for e in errors[:_MAX_PROBLEMS]:
        field = ".".join(str(p) for p in e["loc"] if not _is_union_tag(p)) or "<top level>"
        detail = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = _model_at(model, e["loc"][:-1])
            if parent is not None:
                detail += f"; allowed fields here: {', '.join(parent.model_fields)}"
        given = e.get("input")
        shown = "" if isinstance(given, dict) or e["type"] == "missing" else f" (got {_SHORT.repr(given)})"
        lines.append(f"  - field `{field}`: {detail}{shown}")
    if len(errors) > _MAX_PROBLEMS:
        lines.append(f"  ... and {len(errors) - _MAX_PROBLEMS} more")
    return "\n".join(lines)


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and part.startswith(
        "<"
    )  # the tag of a discriminated union's form (EncoderItem)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The nested model class at a validation-error location, to list its allowed keys."""
    candidates: list[type[BaseModel]] = [model]
    for part in loc:
        if isinstance(part, int):
            continue
        if _is_union_tag(part):  # the form the item was validated as: "<EncoderSpec>"
            candidates = [c for c in candidates if f"<{c.__name__}>" == part]
            continue
        fields = [c.model_fields[part] for c in candidates if part in c.model_fields]
        if not fields:
            return None
        candidates = _models_in(fields[0].annotation)
    return candidates[0] if len(candidates) == 1 else None


def _models_in(annotation) -> list[type[BaseModel]]:
    """The model classes an annotation holds, through lists, unions and Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def load_model(path: str | Path, model: type[M], overrides: dict[str, Any] | None = None) -> M:
    """Parse a YAML file into `model`; raise ConfigError naming the file and field on any problem."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a config file; give the YAML file's path")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: not valid YAML{line}: {' '.join(str(problem).split())[:300]}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top level, got {type(data).__name__}")
    data.update(overrides or {})
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(path, e, model)) from None


def encoder_search_dirs(config_path: Path | None) -> list[Path]:
    dirs = [config_path.parent / "encoders"] if config_path else []
    # configs/ and the packaged pipeline/configs are one folder in a checkout: look there once.
    unique: dict[Path, Path] = {}
    for d in [*dirs, REPO_CONFIG_DIR / "encoders"]:
        unique.setdefault(d.resolve(), d)
    return list(unique.values())


def resolve_encoder(
    ref: str | EncoderSpec, config_path: Path | None = None, field: str = "encoders"
) -> EncoderSpec:
    """An encoder given by name (looked up in configs/encoders/), by YAML path, or inline."""
    if isinstance(ref, EncoderSpec):
        return ref
    as_path = Path(ref)
    where = config_path or "the command line"
    if as_path.suffix in (".yaml", ".yml"):  # a file: its stem is the encoder's name, as in configs/encoders/
        if not as_path.is_file():
            raise ConfigError(f"{where}: field `{field}`: encoder file {as_path} not found")
        spec = load_model(as_path, EncoderSpec)
        if spec.name != as_path.stem:  # stores are named by it: two names for one spec encoded it twice
            raise ConfigError(f"{as_path}: field `name` is '{spec.name}' but the file is named '{as_path.stem}'; "
                              "an encoder's name is its file's name")  # fmt: skip
        return spec
    tried = []
    for d in encoder_search_dirs(config_path):
        candidate = d / f"{ref}.yaml"
        tried.append(str(candidate))
        if candidate.is_file():
            spec = load_model(candidate, EncoderSpec)
            if spec.name != ref:
                raise ConfigError(f"{candidate}: field `name` is '{spec.name}' but the file is named '{ref}'")
            return spec
    known = sorted({p.stem for d in encoder_search_dirs(config_path) if d.is_dir() for p in d.glob("*.yaml")})
    raise ConfigError(
        f"{where}: field `{field}`: unknown encoder '{ref}' (looked for {', '.join(tried)}); "
        f"known: {', '.join(known)}"
    )


def spec_file(name: str, config_path: Path | None, refs: list = ()) -> str:
    """Where the spec of encoder `name` (a layer's: NAME.L-2) is written: the YAML path an `encoders:` entry of
    `refs` gives, its file in the encoder folders, or the run config."""
    paths = [getattr(r, "encoder", r) for r in refs]
    given = [Path(r) for r in paths if isinstance(r, str) and r.endswith((".yaml", ".yml"))]
    for candidate in [
        *(p for p in given if p.stem in (name, name.split(".")[0])),
        *(d / f"{n}.yaml" for n in (name, name.split(".")[0]) for d in encoder_search_dirs(config_path)),
    ]:
        if candidate.is_file():
            return str(candidate)
    return str(config_path or "the command line")


def resolve_entry(
    ref: str | EncoderSpec | EncoderEntry, config_path: Path | None = None, field: str = "encoders"
) -> list[EncoderSpec]:
    """The specs one `encoders:` entry stands for: one, or one per requested layer; a model given by id gets
    its spec from the model's own config (pipeline/models/model_ids.py)."""
    if isinstance(ref, str) and ref.startswith(("timm:", "hf:")):
        ref = EncoderEntry(encoder=ref)
    if not isinstance(ref, EncoderEntry):
        return [resolve_encoder(ref, config_path, field)]
    from pipeline.models import model_ids

    base = None if ref.by_id else resolve_encoder(ref.encoder, config_path, field)
    try:
        return model_ids.layer_specs(base or model_ids.spec_from_id(ref), ref)
    except ConfigError as e:
        raise ConfigError(f"{config_path or 'the command line'}: field `{field}`: {e}") from None


def load_run_config(path: str | Path) -> RunConfig:
    cfg = load_model(path, RunConfig)
    names: dict[str, EncoderSpec] = {}
    for ref in cfg.encoders:  # fail at load time, not when the stage reaches this encoder
        for spec in resolve_entry(ref, Path(path)):
            # the same encoder twice (listed again, or as the layer another entry reads) is one encoder
            if names.setdefault(spec.name, spec) != spec:
                raise ConfigError(
                    f"{path}: field `encoders`: two entries are named '{spec.name}'; give one a `name:`"
                )
    return cfg
