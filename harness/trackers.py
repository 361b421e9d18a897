"""Each run also shown where people watch training: TensorBoard, MLflow, Weights & Biases (`logger=...`).

One harness run is one tracked run in each chosen tracker, named by its run_key and grouped by sweep (a
TensorBoard folder per sweep, an MLflow experiment, a W&B group). Sent: the resolved config as parameters; the
training loss, each parameter group's learning rate and the throughput every `train.log_every_steps`; every
evaluation's metrics; and at the end the row's headline numbers and its status (a failed, diverged, oom or
interrupted run closes its tracked run as failed or killed, with the harness status beside it). The ids of the
tracked runs go in the row (`tracker_run_ids`), so each can be found from the other.

Every process opens its own tracked runs and keeps nothing between runs, so joblib workers and submitit jobs each
log their own. The trackers are optional extras; asking for one that is not installed stops the run at its start.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import logging
import math
import netrc
import numbers
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from harness import rows
from harness.errors import ConfigError, MissingExtra

log = logging.getLogger(__name__)

# The row's numbers sent at the end as final/<column> (those that exist and are numbers), plus every
# *_padding_ratio column.
HEADLINE_COLUMNS = ("score_best", "score_last", "best_step", "steps", "trainable_params", "trainable_params_no_head",
                    "train_samples_per_s", "train_tokens_per_s", "eval_samples_per_s", "train_seconds",
                    "cuda_peak_allocated_bytes", "cuda_peak_reserved_bytes", "cpu_peak_rss_bytes")


@dataclass(frozen=True)
class RunIdentity:
    """What every tracker needs to know about the harness run it tracks."""

    key: str
    sweep: str
    sweep_dir: Path        # <results_dir>/<sweep>
    artifacts: Path        # <results_dir>/<sweep>/runs/<key>: the run's own folder
    config: dict[str, Any]  # the resolved config
    title: str             # task=... variant=... for people


class Tracker:
    """One tracked run in one tracker: opened with the run, sent metrics by step, closed with the run's status."""

    name: ClassVar[str]      # the key under `logger` and the extra that installs it
    module: ClassVar[str]    # what must import for it to work
    run_id: str

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self, status: str, error: str | None, final: dict[str, float], step: int) -> None:
        raise NotImplementedError


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The nested config as {"train.lr": 0.0005, ...}; lists and nulls as JSON text, since trackers take scalars."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


# ---- TensorBoard ---------------------------------------------------------------------------------------
class TensorBoardTracker(Tracker):
    """Event files in the run's folder (`tb/`), so `tensorboard --logdir results/<sweep>/runs` shows the sweep.

    The config goes in as HParams (the HParams tab compares runs) and as text; the status as the HParams session's
    end status (success or failure) and as text (the harness's own word for it, and the error)."""

    name = "tensorboard"
    module = "torch.utils.tensorboard"

    def __init__(self, settings: DictConfig, run: RunIdentity):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        folder = run.artifacts / "tb" if settings.dir is None else Path(settings.dir) / run.sweep / run.key
        shutil.rmtree(folder, ignore_errors=True)  # an earlier attempt's curves must not pass for this one's
        self.writer = SummaryWriter(log_dir=str(folder), flush_secs=settings.flush_secs)
        self.run_id = str(folder)
        _, session_start, _ = hparams(flat_params(run.config), {})
        self.writer.file_writer.add_summary(session_start)
        self.writer.add_text("run", f"{run.title}, run_key {run.key}, sweep {run.sweep}", 0)
        self.writer.add_text("config", "```\n" + json.dumps(run.config, indent=2, default=str) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def close(self, status: str, error: str | None, final: dict[str, float], step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.plugins.hparams.api_pb2 import Status
        from tensorboard.plugins.hparams.metadata import PLUGIN_DATA_VERSION, PLUGIN_NAME, SESSION_END_INFO_TAG
        from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo

        self.log(final, step)
        self.writer.add_text("status", status + (f": {error}" if error else ""), step)
        end = SessionEndInfo(status=Status.Value("STATUS_SUCCESS" if status == "ok" else "STATUS_FAILURE"),
                             end_time_secs=time.time())
        content = HParamsPluginData(session_end_info=end, version=PLUGIN_DATA_VERSION).SerializeToString()
        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=content))
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=SESSION_END_INFO_TAG, metadata=metadata)]))
        self.writer.close()


# ---- MLflow --------------------------------------------------------------------------------------------
MLFLOW_STATUS = {"ok": "FINISHED", "interrupted": "KILLED"}  # failed, diverged, oom: FAILED


def mlflow_location(settings: DictConfig, run: RunIdentity) -> tuple[str, Path | None]:
    """(tracking URI, the local store's folder or None): logger.mlflow.tracking_uri, which defaults to
    MLFLOW_TRACKING_URI, else a SQLite store in <results_dir>/<sweep>/mlruns/ (MLflow 3 refuses new file stores)."""
    if settings.tracking_uri:
        return str(settings.tracking_uri), None
    store = (run.sweep_dir / "mlruns").resolve()
    return f"sqlite:///{store / 'mlflow.db'}", store


@contextlib.contextmanager
def store_lock(store: Path | None):
    """Processes starting together (joblib workers, submitit jobs) create the SQLite store's tables and the
    sweep's experiment one at a time; otherwise two of them race to create the same tables."""
    if store is None:
        yield
        return
    store.mkdir(parents=True, exist_ok=True)
    with open(store / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class MlflowTracker(Tracker):
    """A run in the sweep's experiment, through MlflowClient (no process-global active run, so runs in one
    process never mix)."""

    name = "mlflow"
    module = "mlflow"

    def __init__(self, settings: DictConfig, run: RunIdentity):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri, store = mlflow_location(settings, run)
        experiment_name = settings.experiment or run.sweep
        with store_lock(store):
            self.client = MlflowClient(tracking_uri=uri)
            experiment = self.client.get_experiment_by_name(experiment_name)
            if experiment is None:
                try:
                    experiment_id = self.client.create_experiment(
                        experiment_name, artifact_location=(store / "artifacts").as_uri() if store else None)
                except MlflowException:  # another process (on a shared server) created it first
                    experiment_id = self.client.get_experiment_by_name(experiment_name).experiment_id
            else:
                experiment_id = experiment.experiment_id
        tags = {"harness.run_key": run.key, "harness.sweep": run.sweep, "harness.run": run.title}
        self.run_id = self.client.create_run(experiment_id, run_name=run.key, tags=tags).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flat_params(run.config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, status: str, error: str | None, final: dict[str, float], step: int) -> None:
        self.log(final, step)
        self.client.set_tag(self.run_id, "harness.status", status)
        if error:
            self.client.set_tag(self.run_id, "harness.error", error[:5000])
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))


# ---- Weights & Biases ----------------------------------------------------------------------------------
def wandb_credentials() -> bool:
    """Whether W&B can log in without asking: WANDB_API_KEY, an identity token file, or `wandb login`'s netrc."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker(Tracker):
    """A run in the W&B project, grouped by sweep. Offline (files under the run's folder, for `wandb sync`) unless
    W&B has credentials or WANDB_MODE/logger.wandb.mode says otherwise: a run never waits on a login prompt."""

    name = "wandb"
    module = "wandb"

    def __init__(self, settings: DictConfig, run: RunIdentity):
        import wandb

        mode = settings.mode or ("online" if wandb_credentials() else "offline")
        folder = Path(settings.dir) if settings.dir else run.artifacts
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=settings.project, entity=settings.entity, group=run.sweep, name=run.key,
                              notes=run.title, config=run.config, dir=str(folder), mode=mode, reinit="create_new",
                              settings=wandb.Settings(console="off", quiet=True))  # the harness log has the output
        self.run_id = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, status: str, error: str | None, final: dict[str, float], step: int) -> None:
        self.run.summary.update({**final, "status": status, "error": error})
        self.run.finish(exit_code=0 if status == "ok" else 1)


TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoardTracker, MlflowTracker, WandbTracker)}


# ---- the fan-out the run and the loop talk to -----------------------------------------------------------
def requested(cfg: DictConfig) -> list[str]:
    """The trackers `logger=` chose, in a fixed order."""
    chosen = cfg.get("logger") or {}
    unknown = set(chosen) - set(TRACKERS)
    if unknown:
        raise ConfigError(f"logger.{sorted(unknown)[0]} is not a tracker: choose from {sorted(TRACKERS)} "
                          "(logger=tensorboard, or several: logger=[tensorboard,mlflow])")
    return [name for name in TRACKERS if name in chosen]


def check_installed(cfg: DictConfig) -> None:
    """Stop before anything runs when a chosen tracker's package is missing, naming the extra that installs it."""
    for name in requested(cfg):
        try:
            importlib.import_module(TRACKERS[name].module)
        except ImportError as err:
            raise MissingExtra(
                f"logger={name} needs the {name} package, which is not installed here ({err}). Install it with "
                f"`pip install -e '.[{name}]'` (or '.[trackers]' for TensorBoard, MLflow and W&B), "
                f"or leave {name} out of logger=") from err


class Trackers:
    """The trackers of one run (none when logger=none): the training loop and run() send to all of them at once."""

    def __init__(self, trackers: list[Tracker] | None = None):
        self.trackers = trackers or []
        self.last_step = 0
        self.window_start = (0, 0, 0.0)  # samples, tokens, training seconds at the previous training log

    @classmethod
    def start(cls, cfg: DictConfig, key: str, title: str) -> Trackers:
        """Open one tracked run per chosen tracker; if one fails to open, close those already open as failed."""
        names = requested(cfg)
        if not names:
            return cls()
        run = RunIdentity(key=key, sweep=cfg.sweep_name, sweep_dir=Path(cfg.results_dir) / cfg.sweep_name,
                          artifacts=rows.artifacts_dir(cfg.results_dir, cfg.sweep_name, key),
                          config=OmegaConf.to_container(cfg, resolve=True), title=title)
        opened = cls()
        try:
            for name in names:
                opened.trackers.append(TRACKERS[name](cfg.logger[name], run))
                log.info("run %s is tracked in %s as %s", key, name, opened.trackers[-1].run_id)
        except BaseException as err:
            status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            opened.close({"status": status, "error": f"{type(err).__name__}: {err}"})
            raise
        return opened

    def run_ids(self) -> str | None:
        """{tracker: its run's id} as JSON for the row's tracker_run_ids column; None without trackers."""
        return json.dumps({t.name: t.run_id for t in self.trackers}) if self.trackers else None

    def log_train(self, step: int, loss: float, param_groups: list[dict], samples: int, tokens: int,
                  seconds: float) -> None:
        """The training log line's numbers: mean loss since the last evaluation, each group's learning rate, and
        the throughput since the previous training log (evaluation time excluded)."""
        if not self.trackers:
            return
        metrics = {"train/loss": loss}
        for i, group in enumerate(param_groups):
            name = group.get("name", str(i))
            metrics[f"train/lr/{name}" if f"train/lr/{name}" not in metrics else f"train/lr/{name}_{i}"] = group["lr"]
        last_samples, last_tokens, last_seconds = self.window_start
        if seconds > last_seconds:
            metrics["train/samples_per_s"] = (samples - last_samples) / (seconds - last_seconds)
            metrics["train/tokens_per_s"] = (tokens - last_tokens) / (seconds - last_seconds)
        self.window_start = (samples, tokens, seconds)
        self.send(metrics, step)

    def log_eval(self, step: int, epoch: float, metrics_by_setting: dict[str | None, dict[str, float]]) -> None:
        """One evaluation: eval/<metric> for the model as trained, eval/<setting>/<metric> for other settings
        (DyLoRA's ranks)."""
        if not self.trackers:
            return
        metrics = {"eval/epoch": epoch}
        for setting, values in metrics_by_setting.items():
            prefix = "eval/" if setting is None else f"eval/{setting}/"
            metrics.update({prefix + k: v for k, v in values.items()})
        self.send(metrics, step)

    def send(self, metrics: dict[str, Any], step: int) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if is_number(v)}
        self.last_step = max(self.last_step, step)
        for tracker in self.trackers:
            tracker.log(numbers, step)

    def close(self, row: dict[str, Any]) -> None:
        """End every tracked run with the row's status and headline numbers. A tracker that fails here is logged,
        not raised: the row is written already and stays the record."""
        columns = [*HEADLINE_COLUMNS, *sorted(c for c in row if c.endswith("_padding_ratio"))]
        final = {f"final/{c}": float(row[c]) for c in columns if is_number(row.get(c))}
        for tracker in self.trackers:
            try:
                tracker.close(row["status"], row.get("error"), final, self.last_step)
            except Exception:  # noqa: BLE001 - see the docstring
                log.exception("run %s: could not close its %s run %s", row.get("run_key"), tracker.name,
                              tracker.run_id)
        self.trackers = []


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
