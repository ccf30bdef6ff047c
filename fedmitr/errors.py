"""The errors a user can fix. Each message says what was wrong and what is allowed.

The CLI prints them as one line and exits 2; the app shows them as they are. Anything else that
escapes a run is a bug and is reported as one.
"""

from __future__ import annotations

import re


class ConfigError(ValueError):
    """An invalid configuration value."""


class SettingError(ConfigError):
    """A refused value of one user setting (a knob of :mod:`fedmitr.knobs`), knowing which one.

    ``str()`` is the library's message; :meth:`named` says it with the setting as a front end's user
    wrote it: the command line's ``--keep must be in (0, 1] (got 1.5)``, not the config field's name.
    """

    def __init__(self, setting: str, problem: str | None, message: str):
        super().__init__(setting, problem, message)  # all in args, so that the error pickles
        self.setting = setting  # the knob's name, e.g. "keep"
        self.problem = problem  # what follows the setting's name in the message, None if it does not start with it
        self.message = message

    def __str__(self) -> str:
        return self.message

    def named(self, spelling: str) -> str:
        """The message about ``spelling`` (e.g. "--keep"): "--keep must be ...", or "--methods: unknown ..."."""
        return f"{spelling} {self.problem}" if self.problem else f"{spelling}: {self.message}"


class DatasetUnavailable(RuntimeError):
    """A dataset could not be loaded (offline, unknown id, unexpected columns)."""


class ModelUnavailable(RuntimeError):
    """Pretrained weights could not be loaded (offline, unknown name)."""


class HubError(RuntimeError):
    """The Hugging Face Hub cannot be used for what was asked (offline, no token, refused push)."""


USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DatasetUnavailable, ModelUnavailable, HubError)


# Hugging Face user access tokens ("hf_" + 30+ letters and digits); shorter runs are masked too, so
# that a pasted token is never repeated back, even cut.
_CREDENTIAL = re.compile(r"hf_[A-Za-z0-9]{4,}")


def redact(text: str) -> str:
    """``text`` with anything that looks like a Hub token masked: safe to show and to log."""
    return _CREDENTIAL.sub("hf_***", text)


def excerpt(value: object, limit: int = 40) -> str:
    """A short, safe rendering of a user's value for an error message.

    The value's ``repr``, cut to ``limit`` characters, with credentials masked: an error message
    names what was wrong without repeating whatever was typed (a token in the wrong box, a page
    of text) into the browser or a log.
    """
    text = redact(value if isinstance(value, str) else repr(value))
    if len(text) > limit:
        text = text[:limit] + "…"
    return repr(text) if isinstance(value, str) else text
