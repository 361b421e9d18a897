"""Every error class of the harness, in one place: each carries a message a user can act on.

The harness catches these by class to decide what a failure means: a HarnessError before training is a bad
config or environment (no row, exit 2); RunFailed means the run's row is written and says why; RunBusy and
SweepStopping are not failures of the job at all (another process owns the run, or the sweep is stopping).
"""


class HarnessError(Exception):
    """Base class: bad input or an environment that cannot run the request. The message says how to fix it."""


class ConfigError(HarnessError, ValueError):
    """A config value is wrong; the message names the key, the value and what is allowed."""


class DataError(HarnessError, FileNotFoundError):
    """A task or split is missing; the message lists the files that were looked for."""


class HubUnavailable(HarnessError, ConnectionError):
    """The Hugging Face hub is unreachable and the resource is not cached; the message names local overrides."""


class MissingExtra(HarnessError, ImportError):
    """An optional part was asked for (e.g. logger=wandb) but its package is not installed; the message names
    the extra that installs it."""


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


class SourceUnavailable(HarnessError):
    """The run named by init_from has no ok row, or saved no adapter: this run cannot start from it."""


class ReportError(HarnessError):
    """The rows cannot make a report (none found, mixed configs, ...); the message says how to fix it."""


# ---- sweeps: what became of a job (harness/sweep/, hydra_plugins/harness_sweeper) -------------------------
class RunBusy(HarnessError):
    """Another process holds this run's lock: it is running the same config right now."""


class RunFailed(HarnessError):
    """The run ended with a status other than ok; its row (with status and error) is written."""


class SweepStopping(HarnessError):
    """This worker was told to stop (SIGTERM/SIGINT): it starts no further run."""


class SweepsFailed(HarnessError):
    """Some runs of the sweep did not end ok (each has its row and is listed in the summary above)."""


def require(condition: bool, key: str, value, allowed: str) -> None:
    """Raise a ConfigError naming `key` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")
