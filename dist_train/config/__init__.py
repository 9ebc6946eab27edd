"""Typed job configuration: schema and loading."""
from dist_train.config.load import describe_fields, load_config, to_dict, to_yaml
from dist_train.config.schema import ConfigError, JobConfig

__all__ = ["ConfigError", "JobConfig", "describe_fields", "load_config", "to_dict", "to_yaml"]
