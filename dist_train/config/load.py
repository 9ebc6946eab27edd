"""Build a job config: built-in defaults, then a YAML preset, then ``key=value`` overrides.

Every problem surfaces as a :class:`ConfigError` that names the dotted key, so the CLI can exit 2
with one readable paragraph before any process group starts.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import typing
import os
import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dist_train.config.schema import ConfigError, JobConfig

# Keys users may write that are not valid Python field names.
ALIASES = {"checkpoint.async": "checkpoint.async_save"}


def _rename_aliases(tree: Any, prefix: str = "") -> Any:
    """Rewrite aliased keys (``checkpoint.async``) inside a nested mapping from YAML."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        new_key = ALIASES.get(dotted, dotted).rsplit(".", 1)[-1]
        out[new_key] = _rename_aliases(value, dotted + ".")
    return out


def _parse_override(item: str) -> Tuple[str, str]:
    if "=" not in item or item.startswith("="):
        raise ConfigError(item, "overrides are written key=value, e.g. train.max_steps=200")
    key, value = item.split("=", 1)
    key = key.strip().lstrip("+")
    return ALIASES.get(key, key), value


def _one_line(text: str, limit: int = 300) -> str:
    """An error text as one line (YAML errors span several), cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _explain(exc: OmegaConfBaseException, fallback_key: str = "config") -> ConfigError:
    """Turn an OmegaConf error into a ConfigError naming the full dotted key."""
    key = getattr(exc, "full_key", None) or fallback_key
    msg = str(exc).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        return ConfigError(key, "unknown key (see `python -m dist_train --help` for every key)")
    return ConfigError(key, _one_line(msg))


def _find_config_error(exc: BaseException) -> Optional[ConfigError]:
    while exc is not None:
        if isinstance(exc, ConfigError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@functools.lru_cache(maxsize=None)
def _defaults(cls: type) -> Any:
    return cls()


@functools.lru_cache(maxsize=None)
def _sections(cls: type) -> Dict[str, Optional[type]]:
    """Field name -> the dataclass type of that field (a section), or None for a plain value."""
    instance = cls()
    return {f.name: type(getattr(instance, f.name)) if dataclasses.is_dataclass(getattr(instance, f.name)) else None
            for f in dataclasses.fields(cls)}


@functools.lru_cache(maxsize=None)
def _text_fields(cls: type) -> frozenset:
    """The names of ``cls``'s fields that hold text (``str`` or ``Optional[str]``)."""
    hints = typing.get_type_hints(cls)
    return frozenset(name for name, hint in hints.items() if hint is str or hint == Optional[str])


def _text_leaf(key: str) -> bool:
    """Whether the dotted ``key`` names a text field of the schema."""
    cls: Optional[type] = JobConfig
    *path, leaf = key.split(".")
    for part in path:
        cls = _sections(cls).get(part) if cls is not None else None
    return cls is not None and leaf in _text_fields(cls)


def _guess(key: str, prefix: str, fields: List[str]) -> List[str]:
    """The dotted keys an unknown ``prefix + key`` was probably meant to be: the same name in
    another section (``train.batch_size`` -> ``data.batch_size``, ``max_steps`` -> ``train.
    max_steps``), else the look-alikes in its own section, else look-alike leaves anywhere."""
    leaves = [row[0] for row in describe_fields()]
    elsewhere = [k for k in leaves if k.rsplit(".", 1)[-1] == key and not k.startswith(prefix + key)]
    if elsewhere:
        return elsewhere[:2]
    scored = sorted(((difflib.SequenceMatcher(None, key, k).ratio(), k) for k in fields), reverse=True)
    close = [prefix + k for score, k in scored if score >= 0.6 and score >= scored[0][0] - 0.05][:2]
    if close:
        return close
    names = {k.rsplit(".", 1)[-1]: k for k in reversed(leaves)}
    return [names[k] for k in difflib.get_close_matches(key, list(names), n=1, cutoff=0.8)]


def _check_shape(tree: Dict[Any, Any], cls: type = JobConfig, prefix: str = "") -> Dict[str, Any]:
    """Check the nesting of a YAML preset or an override against the schema, so that an unknown
    key or a section given a plain value is named with the keys that would fit. An empty section
    (``train:`` with every key commented out, which YAML reads as null) counts as no change.
    Returns the tree with such empty sections dropped."""
    fields = _sections(cls)
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in fields:
            where = f"{prefix[:-1]} has the keys" if prefix else "the sections are"
            close = _guess(key, prefix, list(fields)) if isinstance(key, str) else []
            guess = f"did you mean {' or '.join(close)}? " if close else ""
            raise ConfigError(_one_line(dotted, 80), f"unknown key; {guess}{where} {', '.join(fields)}")
        section = fields[key]
        if section is None:
            default = getattr(_defaults(cls), key)
            if key in _text_fields(cls) and isinstance(value, (bool, int, float)):
                # YAML 1.1 reads 0x10 as 16, 010 as 8, 1:30 as 90, yes/on as true: a run name or an
                # experiment that silently became another text. (An override keeps the text it was given.)
                raise ConfigError(dotted, f"is text, but YAML read the {type(value).__name__} {value!r} here: "
                                          "quote the value (e.g. name: '0x10')")
            if isinstance(default, dict) and value is not None and not isinstance(value, dict):
                raise ConfigError(dotted, f"must be a mapping of key: value; got the {type(value).__name__} "
                                          f"{_one_line(repr(value), 60)}")
            if isinstance(default, list) and value is not None and not isinstance(value, list):
                raise ConfigError(dotted, f"must be a list, e.g. [a, b]; got the {type(value).__name__} "
                                          f"{_one_line(repr(value), 60)}")
            out[key] = value
        elif value is None:
            continue
        elif not isinstance(value, dict):
            raise ConfigError(dotted, f"is a section: give it a mapping of its keys ({', '.join(_sections(section))}), "
                                      f"not the {type(value).__name__} {_one_line(repr(value), 60)}")
        else:
            out[key] = _check_shape(value, section, dotted + ".")
    return out


MISSING = "???"  # OmegaConf's "no value yet": a preset's way of saying "give this one"


def _missing_leaves(layers: Sequence[Dict[str, Any]]) -> List[str]:
    """The schema keys that the last layer (preset, then overrides in order) to set them left at
    ``???``. OmegaConf's merge keeps the old value under a ``???`` (a default would silently stand
    in for a value the preset asks the user for)."""
    missing: Dict[str, None] = {}

    def walk(tree: Dict[str, Any], cls: type, prefix: str) -> None:
        fields = _sections(cls)
        for key, value in tree.items():
            dotted = f"{prefix}{key}"
            if fields.get(key) is not None and isinstance(value, dict):
                walk(value, fields[key], dotted + ".")
            elif value == MISSING:
                missing[dotted] = None
            else:
                missing.pop(dotted, None)
                for leaf in [k for k in missing if k.startswith(dotted + ".")]:
                    missing.pop(leaf)  # (a whole mapping given: its keys' ??? go with it)

    for layer in layers:
        walk(layer, JobConfig, "")
    return list(missing)


def _check_text_lists(job: Any, prefix: str = "") -> None:
    """Every item of a list-of-text key is text: OmegaConf lets ``[a, [b]]`` or ``[{x: 1}]`` into a
    ``List[str]``, which then fails deep inside the run (a glob pattern that is a list)."""
    hints = typing.get_type_hints(type(job))
    for f in dataclasses.fields(job):
        value = getattr(job, f.name)
        if dataclasses.is_dataclass(value):
            _check_text_lists(value, f"{prefix}{f.name}.")
        elif hints.get(f.name) == List[str] and value is not None:
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise ConfigError(f"{prefix}{f.name}[{i}]", f"must be text; got the {type(item).__name__} "
                                      f"{_one_line(repr(item), 60)} (a list of text is written [a, b])")


def _read_preset(config_file: str) -> Dict[str, Any]:
    """The YAML preset as a nested dict, or a ConfigError naming --config and the reason."""
    if os.path.isdir(config_file):
        raise ConfigError("--config", f"{config_file} is a directory; give the path of a YAML file")
    if not os.path.isfile(config_file):  # a FIFO or device would block or never end: refused unread
        what = "not a regular file" if os.path.exists(config_file) else "no such file"
        raise ConfigError("--config", f"{what}: {config_file}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(config_file))
    except Exception as exc:  # YAML syntax errors, bad encodings, alias bombs ... come in many types
        raise ConfigError("--config", f"cannot parse {config_file}: {_one_line(exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("--config", f"{config_file} must hold a mapping of sections, not a {type(raw).__name__}")
    return _check_shape(_rename_aliases(raw))


def _read_override(item: str) -> Tuple[str, Dict[str, Any]]:
    """One ``key=value`` override as ``(key, nested dict)``; the value is read as YAML."""
    key, value = _parse_override(item)
    try:
        tree = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={value}"]))
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"cannot read the value {value!r} as YAML: {_one_line(exc, 160)}") from None
    except OmegaConfBaseException as exc:
        raise _explain(exc, key) from None
    except Exception as exc:  # OmegaConf's key-path parser fails on some keys with plain errors ("[=1": IndexError)
        raise ConfigError(key, f"not a key path OmegaConf can read ({type(exc).__name__}: {_one_line(exc, 120)}); "
                          "keys are dotted names such as train.max_steps") from None
    if _text_leaf(key) and value.strip() not in ("", "null", "~", "Null", "NULL"):
        # A text key takes the text as given: YAML would read 0x10 as 16, 010 as 8, on as true.
        node = tree
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        if not isinstance(node[leaf], str):
            node[leaf] = value
    return key, _check_shape(tree)


def _combine(trees: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The overrides' trees merged in order (later keys win, sections merge), as one tree; None
    where one override replaces a section or mapping that another sets keys of (or the other way
    round): those are merged one at a time, exactly as written."""
    out: Dict[str, Any] = {}

    def into(dst: Dict[str, Any], src: Dict[str, Any]) -> bool:
        for key, value in src.items():
            old = dst.get(key)
            if isinstance(value, dict) and isinstance(old, dict):
                if not into(old, value):
                    return False
            elif key in dst and (isinstance(value, dict) or isinstance(old, dict)):
                return False
            else:
                dst[key] = copy.deepcopy(value)
        return True

    return out if all(into(out, tree) for tree in trees) else None


def load_config(config_file: Union[str, Mapping, None] = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Defaults <- YAML preset (a file, or a mapping of sections) <- dotlist overrides, validated;
    returns typed dataclasses."""
    cfg: DictConfig = OmegaConf.structured(JobConfig)
    if isinstance(overrides, str):
        raise ConfigError("overrides", "must be a list of key=value strings, not one string")
    key = "config"
    preset: Dict[str, Any] = {}
    try:
        if isinstance(config_file, Mapping):
            preset = _check_shape(_rename_aliases(dict(config_file)))
            cfg = OmegaConf.merge(cfg, OmegaConf.create(preset))
        elif config_file:
            key = "--config"
            preset = _read_preset(config_file)
            cfg = OmegaConf.merge(cfg, OmegaConf.create(preset))
        read = [_read_override(item) for item in overrides]
        missing = _missing_leaves([preset, *(tree for _, tree in read)])
        if missing:
            raise ConfigError(missing[0], f"is {MISSING}, a value the config leaves for you to give"
                              + (f" (so are {', '.join(missing[1:])})" if missing[1:] else ""))
        combined = _combine([tree for _, tree in read])
        try:  # all overrides in one merge: each merge copies the whole config (~10 ms apiece)
            merged = None if combined is None else OmegaConf.merge(cfg, OmegaConf.create(combined))
        except OmegaConfBaseException:
            merged = None  # one of them is wrong: merged one at a time below, to name it
        if merged is None:
            for key, tree in read:
                cfg = OmegaConf.merge(cfg, OmegaConf.create(tree))
        else:
            cfg = merged
        key = "config"
        job = OmegaConf.to_object(cfg)  # runs every section's __post_init__ on the merged values
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        found = _find_config_error(exc)
        raise (found or _explain(exc, key)) from None
    _check_text_lists(job)
    if not job.run.dir:
        job.run.dir = os.path.join("runs", job.run.name)
    return job


def to_yaml(job: JobConfig) -> str:
    """The resolved config as YAML (what ``config.yaml`` and ``--print-config`` show).

    The same text as ``OmegaConf.to_yaml(OmegaConf.structured(job))``, whose dumper quotes every
    string OmegaConf would read back as something else (``"1e-3"``, ``"true"``), without building
    an OmegaConf tree first: 30 ms of each job's start on rank 0, now about 2.

    A string holding ``${`` (a literal: interpolations are resolved by now) is written escaped
    (``\\${``), so that the file loads back to the same value instead of an interpolation.
    """
    tree = _escape_interpolations(dataclasses.asdict(job))
    try:
        from omegaconf._utils import get_omega_conf_dumper
    except ImportError:  # (a private helper: an OmegaConf without it takes the slow way)
        return OmegaConf.to_yaml(OmegaConf.create(tree))
    return yaml.dump(tree, Dumper=get_omega_conf_dumper(), default_flow_style=False, allow_unicode=True,
                     sort_keys=False)


_INTERPOLATION = re.compile(r"(\\*)\$\{")


def _escape_interpolations(value: Any) -> Any:
    """``value`` with every ``${`` in its strings escaped as OmegaConf reads it back literally (the
    backslashes right before one doubled, then ``\\${``)."""
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda m: m.group(1) * 2 + "\\${", value) if "${" in value else value
    if isinstance(value, dict):
        return {k: _escape_interpolations(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_escape_interpolations(v) for v in value)
    return value


def to_dict(job: JobConfig) -> dict:
    """The resolved config as plain nested dicts and lists (meta.json, MLflow params)."""
    return dataclasses.asdict(job)


def flatten(tree: dict, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """Yield ``(dotted.key, value)`` for every leaf of a nested dict."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def describe_fields(cls: type = JobConfig, prefix: str = "") -> List[Tuple[str, Any, str]]:
    """``(dotted key, default, help)`` for every leaf field, for ``--help``."""
    rows: List[Tuple[str, Any, str]] = []
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe_fields(type(value), f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", value, f.metadata.get("help", "")))
    return rows
