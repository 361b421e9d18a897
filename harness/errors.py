"""Errors that carry a message a user can act on."""


class HarnessError(Exception):
    """Base class: bad input or an environment that cannot run the request. The message says how to fix it."""


class ConfigError(HarnessError, ValueError):
    """A config value is wrong; the message names the key, the value and what is allowed."""


class DataError(HarnessError, FileNotFoundError):
    """A task or split is missing; the message lists the files that were looked for."""


class HubUnavailable(HarnessError, ConnectionError):
    """The Hugging Face hub is unreachable and the resource is not cached; the message names local overrides."""


class Diverged(HarnessError, FloatingPointError):
    """The training loss became NaN or infinite."""


class NoScore(HarnessError):
    """Training finished with finite outputs, but a score is undefined (NaN): a correlation of constant predictions."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived during a run. A KeyboardInterrupt, not an Exception, so that no library's
    `except Exception` swallows it (tqdm's did, when the signal landed while a progress bar was starting)."""

    def __init__(self, message: str, signum: int = 15):
        super().__init__(message)
        self.signum = signum  # a stopped process exits with 128 + signum, as the shell reports a signal


def require(condition: bool, key: str, value, allowed: str) -> None:
    """Raise a ConfigError naming `key` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")
