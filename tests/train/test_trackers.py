"""train.report_to: the run's hyperparameters, curves and sample captions reach accelerate's trackers
(TensorBoard, W&B in offline mode, MLflow with a real local SQLite tracking store), and a resumed run
continues the same tracker run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medcap.config.loader import ConfigError
from medcap.config.run import load_run_config, read_run_config
from medcap.config.train import TrainConfig
from medcap.train.recipe import fit
from tests.fixtures import (  # noqa: F401 - one_thread is a fixture
    make_prepared,
    one_thread,
    skip_missing,
    tiny_overrides,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("prep"), n_train=8, n_valid=4, seed=5)


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_tensorboard_gets_curves_hyperparameters_and_samples(prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = load_run_config(
        None, tiny_overrides(prepared, run, max_steps=4, eval_every=2, report_to="tensorboard,csv")
    )
    fit(cfg)
    scalars = _scalars(run / "tensorboard")
    assert [s for s, _ in scalars["valid/loss"]] == [2, 4]
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    # The same numbers as log.csv (the report's source).
    rows = [r.split(",") for r in (run / "log.csv").read_text().splitlines()[1:]]
    valid = [(int(r[0]), float(r[3])) for r in rows if r[2] == "valid"]
    assert [round(v, 4) for _, v in scalars["valid/loss"]] == [round(v, 4) for _, v in valid]
    hparams = list((run / "tensorboard").rglob("hparams.yml"))
    assert hparams and "train.lr: 0.003" in hparams[0].read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts = []
    for events in (run / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent), size_guidance={"tensors": 0})
        acc.Reload()
        texts += [t for t in acc.Tags()["tensors"] if t.startswith("samples")]
    assert texts, "the sample captions reach TensorBoard as text"


def test_wandb_offline_run_gets_config_history_and_a_samples_table_and_resumes(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        import wandb  # noqa: F401 - only whether it is installed
    except ImportError:
        skip_missing("wandb is not installed (pip install -e '.[test]' brings it, extra 'track')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    base = tiny_overrides(prepared, run, max_steps=2, eval_every=2, report_to="wandb,csv")
    fit(load_run_config(None, base))
    ids = json.loads((run / "trackers.json").read_text())
    (offline,) = list((run / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
    # Train longer on the same run: the same W&B run id, a second offline segment of it.
    fit(load_run_config(None, [*base, "--train.max_steps", "4", "--train.resume", "true"]))
    assert json.loads((run / "trackers.json").read_text()) == ids
    segments = list((run / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
    assert len(segments) == 2 and offline in segments
    wandb_files = [p for seg in segments for p in seg.rglob("*.wandb")]
    assert wandb_files and all(p.stat().st_size > 0 for p in wandb_files)
    # The run's records (protobuf in W&B's log format) carry the keys as plain bytes.
    blob = b"".join(p.read_bytes() for p in wandb_files)
    assert b"valid/loss" in blob and b"train.lr" in blob and b"samples" in blob


def test_mlflow_sqlite_store_gets_params_curves_samples_and_a_resumed_run_continues(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        import mlflow
    except ImportError:
        skip_missing("mlflow is not installed (pip install -e '.[test]' brings it, extra 'track')")
    # No MLFLOW_TRACKING_URI: medcap's default store, one SQLite database beside the run folders.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    run = runs / "blip2-a"
    base = tiny_overrides(prepared, run, max_steps=2, eval_every=2, report_to="mlflow,csv")
    fit(load_run_config(None, [*base, "--train.tracker_project", "rocov2"]))
    store = runs / "mlflow.db"
    assert store.is_file()
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]
    # Train longer: the same MLflow run continues.
    fit(
        load_run_config(
            None,
            [*base, "--train.tracker_project", "rocov2", "--train.max_steps", "4", "--train.resume", "true"],
        )
    )
    assert json.loads((run / "trackers.json").read_text())["mlflow"] == run_id

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store.as_posix()}")
    experiment = client.get_experiment_by_name("rocov2")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_id == run_id and found.info.run_name == "blip2-a"
    assert found.data.params["train.lr"] == "0.003" and found.data.params["model.name_or_path"] == "tiny"
    assert [m.step for m in client.get_metric_history(run_id, "valid/loss")] == [2, 4]
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2, 3, 4]
    rows = [r.split(",") for r in (run / "log.csv").read_text().splitlines()[1:]]
    valid = [round(float(r[3]), 4) for r in rows if r[2] == "valid"]
    assert [round(m.value, 4) for m in client.get_metric_history(run_id, "valid/loss")] == valid
    samples = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert samples == ["samples/step-0000002.md", "samples/step-0000004.md"]
    text = Path(client.download_artifacts(run_id, samples[0], str(tmp_path))).read_text()
    first = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert first["prediction"] in text and first["reference"] in text

    # A store the user names (MLFLOW_TRACKING_URI) is used instead.
    elsewhere = tmp_path / "team.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere.as_posix()}")
    fit(
        load_run_config(
            None, tiny_overrides(prepared, runs / "blip2-b", max_steps=1, eval_every=1, report_to="mlflow")
        )
    )
    team = mlflow.MlflowClient(tracking_uri=f"sqlite:///{elsewhere.as_posix()}")
    (other,) = team.search_runs([team.get_experiment_by_name("medcap").experiment_id])
    assert other.info.run_name == "blip2-b"
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_resume_extends_a_finished_run_and_refuses_what_would_change_it(
    prepared: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    base = tiny_overrides(prepared, run, max_steps=2, eval_every=2)
    first = fit(load_run_config(None, base))
    assert first["step"] == 2
    longer = fit(
        load_run_config(
            None, [*base, "--train.resume", "true", "--train.max_steps", "4", "--train.eval_every", "1"]
        )
    )
    assert longer["step"] == 4 and read_run_config(run).train.max_steps == 2  # the run's own config is kept
    steps = [int(r.split(",")[0]) for r in (run / "log.csv").read_text().splitlines()[1:] if ",valid," in r]
    assert steps == [2, 3, 4]
    from medcap.train.errors import TrainingError

    with pytest.raises(TrainingError, match=r"config train.lr: 0.003 -> 0.001"):
        fit(
            load_run_config(
                None, [*base, "--train.resume", "true", "--train.max_steps", "6", "--train.lr", "1e-3"]
            )
        )


def test_an_unknown_tracker_is_refused_with_the_choices() -> None:
    with pytest.raises(
        ConfigError,
        match=r"train.report_to: 'neptune' is not a place medcap can log to; choose from csv, tensorboard, wandb",
    ):
        TrainConfig(report_to=["csv", "neptune"])


def test_configs_of_earlier_versions_still_load(tmp_path: Path) -> None:
    old = tmp_path / "config.yaml"
    old.write_text("model:\n  name_or_path: tiny\ntrain:\n  tensorboard: false\n  lr: 0.002\n")
    cfg = read_run_config(tmp_path)
    assert cfg.train.report_to == ["csv"] and cfg.train.lr == 0.002
    old.write_text("train:\n  tensorboard: true\n")
    assert read_run_config(tmp_path).train.report_to == ["tensorboard", "csv"]
