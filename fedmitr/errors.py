"""The errors a user can fix. Each message says what was wrong and what is allowed.

The CLI prints them as one line and exits 2; the app shows them as they are. Anything else that
escapes a run is a bug and is reported as one.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid configuration value."""


class DatasetUnavailable(RuntimeError):
    """A dataset could not be loaded (offline, unknown id, unexpected columns)."""


class ModelUnavailable(RuntimeError):
    """Pretrained weights could not be loaded (offline, unknown name)."""


USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DatasetUnavailable, ModelUnavailable)
