"""Stage 1, config: the typed run config, quantizer settings, budgets, paths and errors; torch-free."""

from labkit.config.errors import LabkitError
from labkit.config.loading import ConfigError, load_config, resolve_config

__all__ = ["ConfigError", "LabkitError", "load_config", "resolve_config"]
