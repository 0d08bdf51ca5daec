"""Configuration: the typed schema (one dataclass per section) and loading it from YAML plus overrides.

Owns: ``schema`` (sections, fields, their docs; the latency section in ``latency_schema``), ``checks`` (the range checks they run) and ``loading`` (YAML,
dotted overrides, ``--help-config``). Imports nothing of the package but :mod:`dist_hrnas.errors`; every other layer reads its
settings from here. This face re-exports the names callers use.
"""
from dist_hrnas.config.latency_schema import LatencyConfig
from dist_hrnas.config.schema import (CheckpointConfig, Config, DataConfig, DistConfig, LogConfig, ModelConfig,
                                      PruneConfig, TrainConfig)
from dist_hrnas.config.loading import build_config, describe_fields, load_config, save_config, yaml_load
from dist_hrnas.errors import ConfigError

__all__ = ["CheckpointConfig", "Config", "ConfigError", "DataConfig", "DistConfig", "LatencyConfig", "LogConfig",
           "ModelConfig", "PruneConfig", "TrainConfig", "build_config", "describe_fields", "load_config",
           "save_config", "yaml_load"]
