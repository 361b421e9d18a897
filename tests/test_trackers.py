"""logger=tensorboard|mlflow|wandb, read back through each tracker's own reader; and harness.load_rows.

The tracker tests skip when the tracker's package is missing (`pip install -e ".[trackers]"`; CI installs it).
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

import harness
from harness import rows, run_keys, trackers
from harness.atomic import atomic_write_parquet
from harness.errors import DataError, MissingExtra
from harness.run import run

from conftest import CONF_DIR, REPO

# Six steps, a training log every 2 and an evaluation every 3: loss at 2, 4, 6; metrics at 3, 6.
TRACKED = ["train.max_steps=6", "train.log_every_steps=2", "train.eval_every_steps=3"]
DIVERGING = ["train.lr=1e12", "train.max_grad_norm=null", "train.max_steps=8", "variant=full"]


def history_of(cfg, row) -> pd.DataFrame:
    return pd.read_parquet(rows.artifacts_dir(cfg.results_dir, cfg.sweep_name, row["run_key"]) / "history.parquet")


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> str | None:
    """One SQLite store for the session's MLflow runs (creating its tables takes MLflow seconds); None without
    mlflow."""
    if not installed("mlflow"):
        return None
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def without_wandb_login(env: pytest.MonkeyPatch, folder: Path) -> None:
    """A machine where W&B has no credentials and no mode set: what CI and a fresh install look like."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        env.delenv(name, raising=False)
    (folder / "netrc").write_text("")
    env.setenv("NETRC", str(folder / "netrc"))


def compose_tiny(root: Path, data_dir: Path, *overrides: str):
    """As the make_cfg fixture composes, for a fixture that outlives one test."""
    base = ["model=tiny_roberta", "task=rte", f"data.dir={data_dir}", f"results_dir={root / 'results'}",
            f"data.cache_dir={root.parent / 'harness-cache'}", "train.batch_size=8", "train.eval_batch_size=16",
            "device=cpu"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=base + list(overrides))


# ---- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("choice,expected", [
    (None, []), ("logger=none", []), ("logger=tensorboard", ["tensorboard"]),
    ("logger=[tensorboard,mlflow]", ["tensorboard", "mlflow"]),
    ("logger=[wandb,tensorboard,mlflow]", ["tensorboard", "mlflow", "wandb"]),
])
def test_logger_takes_one_tracker_or_several_and_never_changes_the_run_key(choice, expected):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        plain = compose(config_name="config")
        cfg = compose(config_name="config", overrides=[choice] if choice else [])
    assert trackers.requested(cfg) == expected
    assert run_keys.run_key(cfg) == run_keys.run_key(plain)


def test_logger_files_start_with_a_command():
    for path in sorted((REPO / "conf" / "logger").glob("*.yaml")):
        assert path.read_text().startswith("# python -m harness logger="), path


def test_a_missing_tracker_stops_the_run_at_its_start_naming_the_extra(make_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where it is not installed
    cfg = make_cfg("logger=wandb")  # alone: the other trackers need not be installed either
    with pytest.raises(MissingExtra, match=r"logger=wandb needs the wandb package.*pip install -e '\.\[wandb\]'"):
        run(cfg)
    assert not rows.runs_dir(cfg.results_dir, cfg.sweep_name).exists(), "stopped before writing anything"


def test_the_default_mlflow_store_is_in_the_sweep_folder_unless_mlflow_tracking_uri_says_otherwise(
        make_cfg, monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_cfg("logger=mlflow", "sweep_name=glue")
    identity = trackers.RunIdentity("k", "glue", Path(cfg.results_dir) / "glue", tmp_path, {}, "")
    uri, store = trackers.mlflow_location(cfg.logger.mlflow, identity)
    assert store == (tmp_path / "results" / "glue" / "mlruns").resolve() and uri == f"sqlite:///{store}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    cfg = make_cfg("logger=mlflow", "sweep_name=glue")
    assert trackers.mlflow_location(cfg.logger.mlflow, identity) == ("http://mlflow.example:5000", None)


def test_wandb_is_offline_without_credentials_and_online_with_an_api_key(monkeypatch, tmp_path):
    without_wandb_login(monkeypatch, tmp_path)
    assert not trackers.wandb_credentials()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert trackers.wandb_credentials()


# ---- one run, all installed trackers: read back through each one's own reader ----------------------------
def installed(*names: str) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is not None]


@pytest.fixture(scope="module")
def tracked_ok(tmp_path_factory, tiny_data_dir, mlflow_store):
    """(cfg, row) of one tiny run logged to every installed tracker: W&B without credentials, MLflow in the
    session's store through MLFLOW_TRACKING_URI."""
    chosen = installed("tensorboard", "mlflow", "wandb")
    if not chosen:
        pytest.skip("no tracker installed (pip install -e '.[trackers]')")
    with pytest.MonkeyPatch.context() as env:
        without_wandb_login(env, tmp_path_factory.mktemp("netrc"))
        if mlflow_store:
            env.setenv("MLFLOW_TRACKING_URI", mlflow_store)
        cfg = compose_tiny(tmp_path_factory.mktemp("tracked"), tiny_data_dir, f"logger=[{','.join(chosen)}]",
                           "sweep_name=tracked_ok", *TRACKED)
        row = run(cfg)
    assert row["status"] == "ok", row["error"]
    return cfg, row


def tensorboard_events(folder: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(folder)
    events.Reload()
    hparams = {tag: HParamsPluginData.FromString(content)
               for tag, content in events.PluginTagToContent("hparams").items()}
    return events, hparams


def scalars(events, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in events.Scalars(tag)}


def text(events, tag: str) -> str:
    return events.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def test_tensorboard_shows_the_loss_curve_learning_rates_throughput_and_each_evaluation(tracked_ok):
    pytest.importorskip("tensorboard")
    cfg, row = tracked_ok
    folder = json.loads(row["tracker_run_ids"])["tensorboard"]
    assert Path(folder) == rows.artifacts_dir(cfg.results_dir, cfg.sweep_name, row["run_key"]) / "tb"
    events, hparams = tensorboard_events(folder)
    assert sorted(scalars(events, "train/loss")) == [2, 4, 6]
    assert set(scalars(events, "train/lr/decay")) == set(scalars(events, "train/lr/no_decay")) == {2, 4, 6}
    assert all(v > 0 for v in scalars(events, "train/samples_per_s").values())
    history = history_of(cfg, row)
    accuracy = scalars(events, "eval/accuracy")
    assert sorted(accuracy) == [3, 6] == list(history.step)
    assert [accuracy[s] for s in history.step] == pytest.approx(list(history.accuracy))
    assert scalars(events, "final/score_best")[6] == pytest.approx(row["score_best"])
    start = hparams["_hparams_/session_start_info"].session_start_info.hparams
    assert start["train.lr"].number_value == cfg.train.lr and start["task.name"].string_value == "rte"
    assert hparams["_hparams_/session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS
    assert text(events, "status") == "ok"


def test_mlflow_records_the_config_metric_histories_and_a_finished_status(tracked_ok, mlflow_store):
    from mlflow.tracking import MlflowClient

    cfg, row = tracked_ok
    client = MlflowClient(tracking_uri=mlflow_store)
    tracked = client.get_run(json.loads(row["tracker_run_ids"])["mlflow"])
    assert client.get_experiment(tracked.info.experiment_id).name == "tracked_ok"
    assert tracked.info.run_name == row["run_key"] and tracked.info.status == "FINISHED"
    assert tracked.data.params["train.lr"] == str(cfg.train.lr) and tracked.data.params["variant.name"] == "lora"
    assert tracked.data.tags["harness.status"] == "ok"
    loss = client.get_metric_history(tracked.info.run_id, "train/loss")
    assert sorted(m.step for m in loss) == [2, 4, 6]
    history = history_of(cfg, row)
    accuracy = {m.step: m.value for m in client.get_metric_history(tracked.info.run_id, "eval/accuracy")}
    assert sorted(accuracy) == [3, 6] == list(history.step)
    assert [accuracy[s] for s in history.step] == pytest.approx(list(history.accuracy))
    assert tracked.data.metrics["final/score_best"] == pytest.approx(row["score_best"])
    assert tracked.data.metrics["final/trainable_params"] == row["trainable_params"]


def wandb_records(run_dir: Path, wait_s: float = 60) -> list:
    """The records of a W&B offline run file (run-<id>.wandb), parsed with wandb's own Record message, once the
    run's exit record is there (wandb's core process writes the file's end just after run.finish() returns).

    The file is wandb's transaction log: a 7-byte header (':W&B', magic, version), then LevelDB-log chunks (7-byte
    header: crc, length, type FULL/FIRST/MIDDLE/LAST) in 32 KiB blocks. wandb 0.31 reads it only in its Go core
    (`wandb sync`); without a server, this file is where everything logged lives."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + wait_s
    while True:
        data = next(run_dir.glob("run-*.wandb")).read_bytes()
        assert data[:4] == b":W&B"
        records, pending, position, block = [], b"", 7, 32768
        while position + 7 <= len(data):
            if block - position % block < 7:  # a block's tail too short for a chunk header is padding
                position += block - position % block
                continue
            _, length, kind = struct.unpack("<IHB", data[position:position + 7])
            chunk = data[position + 7:position + 7 + length]
            position += 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                records.append(wandb_internal_pb2.Record.FromString(pending))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_run(row) -> list:
    """The records of the row's W&B run, from its offline folder under the run's folder."""
    run_id = json.loads(row["tracker_run_ids"])["wandb"]
    artifacts = rows.artifacts_dir(json.loads(row["config_json"])["results_dir"], row["sweep"], row["run_key"])
    return wandb_records(next(artifacts.glob(f"wandb/offline-run-*-{run_id}")))


def wandb_history(records) -> dict[int, dict[str, float]]:
    """{step: {key: value}}; W&B merges what is logged at one step into one history line."""
    lines: dict[int, dict[str, float]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            lines.setdefault(record.history.step.num, {}).update(items)
    return lines


def wandb_summary(records) -> dict:
    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in record.summary.update})
    return summary


def wandb_exit_code(records) -> int:
    return next(r.exit for r in records if r.WhichOneof("record_type") == "exit").exit_code


def test_wandb_runs_offline_in_the_run_folder_with_config_history_and_summary(tracked_ok):
    pytest.importorskip("wandb")
    cfg, row = tracked_ok
    records = wandb_run(row)
    started = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert started.project == "harness" and started.run_group == "tracked_ok" and started.display_name == row["run_key"]
    config = {u.key: json.loads(u.value_json) for u in started.config.update}
    assert config["train"]["lr"] == cfg.train.lr and config["variant"]["name"] == "lora"
    lines = wandb_history(records)
    assert sorted(s for s, line in lines.items() if "train/loss" in line) == [2, 4, 6]
    history = history_of(cfg, row)
    assert [lines[s]["eval/accuracy"] for s in history.step] == pytest.approx(list(history.accuracy))
    summary = wandb_summary(records)
    assert summary["status"] == "ok" and summary["final/score_best"] == pytest.approx(row["score_best"])
    assert wandb_exit_code(records) == 0


# ---- a run that does not end ok ----------------------------------------------------------------------
def test_a_diverged_run_closes_each_tracked_run_with_its_status(make_cfg, mlflow_store, monkeypatch, tmp_path):
    chosen = installed("tensorboard", "mlflow", "wandb")
    if not chosen:
        pytest.skip("no tracker installed (pip install -e '.[trackers]')")
    without_wandb_login(monkeypatch, tmp_path)
    if mlflow_store:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    cfg = make_cfg(f"logger=[{','.join(chosen)}]", "sweep_name=tracked_diverged", *DIVERGING)
    row = run(cfg)
    assert row["status"] == "diverged"
    ids = json.loads(row["tracker_run_ids"])
    assert sorted(ids) == sorted(chosen)
    if "tensorboard" in ids:
        events, hparams = tensorboard_events(ids["tensorboard"])
        assert hparams["_hparams_/session_end_info"].session_end_info.status == 2  # STATUS_FAILURE
        assert text(events, "status").startswith("diverged: loss became")
    if "mlflow" in ids:
        from mlflow.tracking import MlflowClient

        tracked = MlflowClient(tracking_uri=mlflow_store).get_run(ids["mlflow"])
        assert tracked.info.status == "FAILED" and tracked.data.tags["harness.status"] == "diverged"
        assert tracked.data.tags["harness.error"] == row["error"]
    if "wandb" in ids:
        records = wandb_run(row)
        assert wandb_summary(records)["status"] == "diverged" and wandb_exit_code(records) == 1


def test_an_interrupted_run_is_a_killed_mlflow_run(make_cfg, mlflow_store, monkeypatch):
    if not mlflow_store:
        pytest.skip("mlflow is not installed")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    cfg = make_cfg("logger=mlflow", "sweep_name=tracked_interrupted")
    opened = trackers.Trackers.start(cfg, run_keys.run_key(cfg), "rte")
    run_id = json.loads(opened.run_ids())["mlflow"]
    opened.close({"run_key": run_keys.run_key(cfg), "status": "interrupted", "error": "Interrupted: received SIGTERM"})
    tracked = MlflowClient(tracking_uri=mlflow_store).get_run(run_id)
    assert tracked.info.status == "KILLED" and tracked.data.tags["harness.status"] == "interrupted"


@pytest.mark.slow
def test_joblib_workers_each_log_their_own_tracked_runs_into_one_store(harness_cli, monkeypatch):
    """Two workers start at once: each opens its own tracked runs, and they create the sweep's SQLite store and
    MLflow experiment together without a clash."""
    chosen = installed("tensorboard", "mlflow", "wandb")
    if not chosen:
        pytest.skip("no tracker installed (pip install -e '.[trackers]')")
    for name in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    done = harness_cli("task=rte,stsb", "variant=lora", "variant.r=4", "hydra/launcher=joblib",
                       "hydra.launcher.n_jobs=2", f"logger=[{','.join(chosen)}]")
    assert done.returncode == 0, done.stderr
    found = harness.load_rows(harness_cli.results / "smoke")
    assert len(found) == 2 and (found.status == "ok").all()
    ids = [json.loads(i) for i in found.tracker_run_ids]
    for name in chosen:
        assert len({i[name] for i in ids}) == 2, f"each run has its own {name} run"
    if "tensorboard" in chosen:
        for i, key in zip(ids, found.run_key):
            events, _ = tensorboard_events(i["tensorboard"])
            assert key in i["tensorboard"] and sorted(scalars(events, "eval/epoch")) == [4]
    if "mlflow" in chosen:
        from mlflow.tracking import MlflowClient

        store = (harness_cli.results / "smoke" / "mlruns").resolve()
        client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
        tracked = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
        assert sorted(r.info.run_name for r in tracked) == sorted(found.run_key)
        assert {r.info.status for r in tracked} == {"FINISHED"}
    if "wandb" in chosen:
        for _, row in found.iterrows():
            assert wandb_exit_code(wandb_run(row)) == 0


# ---- load_rows ---------------------------------------------------------------------------------------
def test_load_rows_gives_every_row_as_one_frame_with_config_and_history_on_request(make_cfg):
    ok = run(make_cfg("train.max_steps=6", "train.eval_every_steps=3", "save_adapter=false"))
    failed = run(make_cfg(*DIVERGING))  # a row without history
    folder = Path(make_cfg().results_dir) / "default"
    everything = harness.load_rows(folder)
    assert sorted(everything.status) == ["diverged", "ok"] and list(everything.columns) == [*rows.COLUMNS, "artifacts"]
    assert set(everything.artifacts) == {str(folder / "runs" / r["run_key"]) for r in (ok, failed)}
    assert str(everything["rank"].dtype) == "Int64" and str(everything["steps"].dtype) == "Int64"
    assert list(harness.load_rows(folder.parent, ok_only=True).run_key) == [ok["run_key"]]
    flat = harness.load_rows(folder, flatten_config=True).set_index("run_key")
    assert flat.loc[ok["run_key"], "config.train.max_steps"] == 6 and flat.loc[failed["run_key"], "config.variant.name"] == "full"
    assert flat.loc[ok["run_key"], "config.variant.targets"] == ["query", "value"]
    long = harness.load_rows(folder, with_history=True)
    assert list(long[long.run_key == ok["run_key"]].step) == [3, 6]
    assert long[long.run_key == failed["run_key"]].step.isna().all() and len(long) == 3


def test_a_run_key_in_two_sweeps_reads_each_sweeps_own_history(make_cfg):
    """run_key leaves sweep_name out, so one key can sit in two sweeps (two machines, two sittings): each row's
    history and artifacts must be its own folder's, whichever folder is listed first."""
    first = run(make_cfg("train.max_steps=2", "save_adapter=false", "sweep_name=host_a"))
    second = run(make_cfg("train.max_steps=2", "save_adapter=false", "sweep_name=host_b"))
    assert first["run_key"] == second["run_key"]
    results = Path(make_cfg().results_dir)
    history_b = results / "host_b" / "runs" / second["run_key"] / "history.parquet"
    pd.read_parquet(history_b).assign(train_loss=123.0).to_parquet(history_b)  # host_b's run trained otherwise
    long = harness.load_rows(results / "host_a", results / "host_b", with_history=True)
    assert long.groupby("sweep").train_loss.first().to_dict()["host_b"] == 123.0
    assert long.groupby("sweep").train_loss.first().to_dict()["host_a"] != 123.0
    from harness import report
    loaded = report.load(results / "host_a", results / "host_b").set_index("sweep")
    assert loaded.loc["host_b", "artifacts"] == str(results / "host_b" / "runs" / second["run_key"])


def test_load_rows_reads_the_committed_results_and_names_a_missing_folder():
    committed = harness.load_rows(REPO / "results", ok_only=True, flatten_config=True)
    assert len(committed) > 100 and (committed.status == "ok").all()
    assert (committed["config.train.lr"] == committed["lr"]).all()
    with pytest.raises(DataError, match="results folder 'results/nope' does not exist"):
        harness.load_rows("results/nope")


def test_rows_written_before_a_column_was_added_read_beside_new_ones(tmp_path):
    new = {"run_key": "new", "sweep": "s", "status": "ok", "tracker_run_ids": '{"mlflow": "abc"}'}
    rows.write_row(tmp_path, "s", new)
    old = rows.make_row({"run_key": "old", "sweep": "s", "status": "ok"}).drop(columns=["tracker_run_ids"])
    old_schema = rows.SCHEMA.remove(rows.SCHEMA.get_field_index("tracker_run_ids"))
    atomic_write_parquet(old, rows.row_path(tmp_path, "s", "old"), old_schema)
    table = rows.read_rows(tmp_path / "s").set_index("run_key")
    assert table.loc["new", "tracker_run_ids"] == '{"mlflow": "abc"}' and pd.isna(table.loc["old", "tracker_run_ids"])


def test_default_installs_leave_the_trackers_out_and_each_has_its_extra():
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = {re.split(r"[<>=!~\[ ;]", d)[0].lower() for d in project["dependencies"]}
    assert required.isdisjoint({"tensorboard", "mlflow", "mlflow-skinny", "wandb"})
    extras = project["optional-dependencies"]
    assert all(extras[name] for name in trackers.TRACKERS)
    assert extras["trackers"] == [f"harness[{','.join(trackers.TRACKERS)}]"]
