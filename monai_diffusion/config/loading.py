"""YAML -> typed :class:`Config`: overrides, schema errors and cross-field rules, all reported at once."""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from monai_diffusion.config.rules import check_rules
from monai_diffusion.config.schema import Config


class ConfigError(ValueError):
    """Every problem found in a config, one per line, each with its dotted key path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the config:\n{listing}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and YAML-parsed value.

    Raises:
        ValueError: when there is no ``=`` or the key is empty.
    """
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. autoencoder.downsample_factors=[4,2]")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        raise ValueError(f"--set {text!r}: empty key in {key!r}")
    return keys, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each ``a.b=value`` override in the raw (pre-validation) config dict."""
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for key in keys[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[keys[-1]] = value
    return raw


def _section_model(path: tuple) -> type[BaseModel] | None:
    """The schema class that owns the mapping at ``path`` (for "did you mean" on unknown keys)."""
    model: type[BaseModel] = Config
    parts = list(path)
    while parts:
        field = model.model_fields.get(str(parts.pop(0)))
        if field is None:
            return None
        annotation = field.annotation
        if typing.get_origin(annotation) is dict and parts:
            # A mapping of sections (data.intensity_by_class.<name>): the next part is a name of the user's.
            parts.pop(0)
            annotation = typing.get_args(annotation)[1]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return None
    return model


# pydantic's names of union branches in an error location: whole words, or a type with brackets (``list[int]``).
_UNION_TAGS = {"int", "float", "bool", "str", "none", "path", "constrained-int", "constrained-float"}
_UNION_TAG_PREFIXES = ("literal[", "list[", "dict[", "function-", "nullable[")


def _key_path(loc: tuple) -> tuple:
    """Drop pydantic's union-branch tags (``int``, ``list[int]``...) from an error location; config keys stay
    (``intensity`` is a key, not the tag ``int``)."""
    def is_tag(part) -> bool:
        text = str(part).lower()
        return text in _UNION_TAGS or text.startswith(_UNION_TAG_PREFIXES)

    return tuple(p for p in loc if isinstance(p, int) or not is_tag(p))


def _describe(error: dict) -> str:
    loc = _key_path(tuple(error["loc"]))
    dotted = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        owner = _section_model(loc[:-1])
        hint = ""
        if owner is not None:
            close = difflib.get_close_matches(str(loc[-1]), list(owner.model_fields), n=1, cutoff=0.6)
            hint = f" (did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?)" if close else ""
            if not close:
                hint = f" (known keys here: {', '.join(owner.model_fields)})"
        return f"{dotted}: unknown key{hint}"
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{dotted}: {error['msg']}{shown}"


def _merge_union(lines: list[str]) -> str:
    """One line for a value that matched none of a union's branches: 'key: A, or B, or C (got x)'."""
    key = lines[0].split(": ", 1)[0]
    reasons = []
    got = ""
    for line in lines:
        reason = line.split(": ", 1)[1]
        if " (got " in reason:
            reason, got = reason.split(" (got ", 1)
            got = " (got " + got
        if reason not in reasons:
            reasons.append(reason)
    return f"{key}: {', or '.join(reasons)}{got}"


def config_from_dict(raw: dict, source: str = "<config>", to_run: bool = False) -> Config:
    """Validate a raw mapping against the schema, then the cross-field rules.

    Args:
        raw: the mapping (a YAML file's, or a checkpoint's stored config).
        source: where it comes from, named in the errors.
        to_run: the config is about to run: the rules a run needs apply too (see
            :func:`~monai_diffusion.config.rules.check_rules`); a stored config need not meet them.

    Raises:
        ConfigError: listing every schema error, or else every broken cross-field rule.
    """
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"the top level must be a mapping of sections, got {type(raw).__name__}"])
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        # Pydantic reports one entry per failing union branch; keep one line per key path.
        problems: dict[tuple, list[str]] = {}
        for error in exc.errors():
            problems.setdefault(_key_path(tuple(error["loc"])), []).append(_describe(error))
        merged = [lines[0] if len(lines) == 1 else _merge_union(lines) for lines in problems.values()]
        raise ConfigError(source, merged + _rules_without(raw, list(problems), to_run)) from None
    problems = check_rules(config, to_run)
    if problems:
        raise ConfigError(source, problems)
    return config


def _rules_without(raw: dict, bad_paths: list[tuple], to_run: bool) -> list[str]:
    """Cross-field problems of the config with its schema-invalid keys dropped (so all errors come at once).

    Rules that mention a dropped key are left out: they would judge a default the user never wrote.
    """
    pruned = copy.deepcopy(raw)
    for path in bad_paths:
        node = pruned
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
        elif isinstance(node, list) and isinstance(path[-1], int) and len(path) > 1:
            _drop(pruned, path[:-1])
    try:
        config = Config.model_validate(pruned)
    except ValidationError:
        return []
    dropped = {".".join(str(p) for p in path if not isinstance(p, int)) for path in bad_paths}
    return [p for p in check_rules(config, to_run) if not any(key and key in p for key in dropped)]


def _drop(raw: dict, path: tuple) -> None:
    node = raw
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, to_run: bool = True) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), apply ``--set`` overrides, validate it (the
    commands read their config here). ``to_run``: the rules a run of every stage needs apply too (``validate`` and
    train-autoencoder); the commands that only use a trained autoencoder (train-ldm, train-controlnet, sample) pass
    False, since a discriminator too deep for the volume never trains there.

    Raises:
        ConfigError: the file is missing or not YAML, an override is malformed, or the config is invalid.
    """
    source = str(path) if path is not None else "<defaults>"
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(source, [f"config file not found: {path}"])
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(source, [f"not valid YAML: {exc}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"the top level must be a mapping of sections, got {type(raw).__name__}"])
    try:
        raw = apply_overrides(raw, overrides or [])
    except ValueError as exc:
        raise ConfigError(source, [str(exc)]) from None
    return config_from_dict(raw, source, to_run=to_run)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (paths as strings) so a run can be repeated exactly."""
    data = config.model_dump(mode="json")
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
