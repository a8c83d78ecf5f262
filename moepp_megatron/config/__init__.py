"""One typed config tree for everything: schema (dataclasses) and YAML loader."""

from moepp_megatron.config.loader import from_dict, load_config, resolved_config_yaml, to_dict, to_yaml
from moepp_megatron.config.schema import (
    DataConfig,
    DataSource,
    MoEConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
)

__all__ = [
    "DataConfig",
    "DataSource",
    "MoEConfig",
    "ModelConfig",
    "ParallelConfig",
    "RunConfig",
    "from_dict",
    "load_config",
    "resolved_config_yaml",
    "to_dict",
    "to_yaml",
]
