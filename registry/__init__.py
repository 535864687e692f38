"""Helpers over MLflow's model registry: register with lineage, move aliases, load versions."""

from registry.model_versions import (
    CANDIDATE_ALIAS,
    CHAMPION_ALIAS,
    DEFAULT_MODEL_NAME,
    LoadedVersion,
    get_alias_version,
    load_version,
    log_and_register,
    set_alias,
)

__all__ = [
    "CANDIDATE_ALIAS",
    "CHAMPION_ALIAS",
    "DEFAULT_MODEL_NAME",
    "LoadedVersion",
    "get_alias_version",
    "load_version",
    "log_and_register",
    "set_alias",
]
