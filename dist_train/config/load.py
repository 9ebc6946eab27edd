"""Build a job config: built-in defaults, then a YAML preset, then ``key=value`` overrides.

Every problem surfaces as a :class:`ConfigError` that names the dotted key, so the CLI can exit 2
with one readable paragraph before any process group starts.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

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


def _explain(exc: OmegaConfBaseException) -> ConfigError:
    """Turn an OmegaConf error into a ConfigError naming the full dotted key."""
    key = getattr(exc, "full_key", None) or "config"
    msg = str(exc).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        return ConfigError(key, "unknown key (see `python -m dist_train --help` for every key)")
    return ConfigError(key, msg)


def _find_config_error(exc: BaseException) -> Optional[ConfigError]:
    while exc is not None:
        if isinstance(exc, ConfigError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def load_config(config_file: Union[str, Mapping, None] = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Defaults <- YAML preset (a file, or a mapping of sections) <- dotlist overrides, validated;
    returns typed dataclasses."""
    cfg: DictConfig = OmegaConf.structured(JobConfig)
    if isinstance(overrides, str):
        raise ConfigError("overrides", "must be a list of key=value strings, not one string")
    try:
        if isinstance(config_file, Mapping):
            cfg = OmegaConf.merge(cfg, OmegaConf.create(_rename_aliases(dict(config_file))))
        elif config_file:
            if not os.path.isfile(config_file):
                raise ConfigError("--config", f"no such file: {config_file}")
            try:
                raw = OmegaConf.to_container(OmegaConf.load(config_file))
            except Exception as exc:  # YAML syntax errors come in many types
                raise ConfigError("--config", f"cannot parse {config_file}: {exc}") from None
            if raw is None:
                raw = {}
            if not isinstance(raw, dict):
                raise ConfigError("--config", f"{config_file} must hold a mapping of sections")
            cfg = OmegaConf.merge(cfg, OmegaConf.create(_rename_aliases(raw)))
        for item in overrides:
            key, value = _parse_override(item)
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
        job = OmegaConf.to_object(cfg)  # runs every section's __post_init__ on the merged values
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        found = _find_config_error(exc)
        raise (found or _explain(exc)) from None
    if not job.run.dir:
        job.run.dir = os.path.join("runs", job.run.name)
    return job


def to_yaml(job: JobConfig) -> str:
    """The resolved config as YAML (what ``config.yaml`` and ``--print-config`` show)."""
    return OmegaConf.to_yaml(OmegaConf.structured(job))


def to_dict(job: JobConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(job))


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
