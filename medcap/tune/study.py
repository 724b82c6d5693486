"""Running a study (``medcap tune``): Optuna's TPE sampler and pruners over normal medcap runs.

Every trial is ``medcap.train.recipe.fit`` on the base run config plus the trial's values, in its
own run folder (``STUDY/trials/NNNN``: config.yaml, log.csv, checkpoints ...), selecting its best
checkpoint by the study's objective (``train.select_by``). After each validation the figure goes to
the pruner (``trial.report``), which may stop the run there.

Several workers (processes, machines) share one study through its storage: by default a SQLite
file in the study folder, or ``--storage postgresql://...`` for several machines. The storage is
the only shared state, and the rules below keep the count exact:

* **budget**: the study runs ``trials`` trials in all. A worker starts a trial only while fewer
  are finished or running; if two workers still ask at the same moment, the trial that came later
  (a higher number) sees the budget full and ends at once as ``surplus`` (FAIL, not counted);
* **a worker killed (-9)**: its trial stops sending heartbeats; after the grace period another
  worker marks it FAIL and enqueues a retry with the same values, which resumes the killed trial's
  run folder from its last checkpoint (nothing trained is lost). A worker whose budget is used up
  waits for the running trials of others before it exits, so it is there to take such a retry;
* **an interrupted study** (Ctrl-C, a reboot): the next ``medcap tune`` on the same study retries
  interrupted trials the same way and runs the rest of the budget; finished trials are kept.

Trials that fail by themselves (a diverging learning rate) count: their error is kept with them.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcap.config.loader import ConfigError
from medcap.layout import RunLayout, StudyLayout
from medcap.tune.space import SearchSpace

#: Trial user attributes (what the storage keeps about each trial besides Optuna's own fields).
ATTR_RUN_DIR = "run_dir"
ATTR_RETRY_OF = "retry_of"  # the trial whose run folder a retry continues
ATTR_ERROR = "error"  # the trial failed by itself (counted)
ATTR_INTERRUPTED = "interrupted"  # Ctrl-C: retried by the next medcap tune
ATTR_SURPLUS = "surplus"  # asked when the budget was full: ended at once, not counted
ATTR_WORKER = "worker"  # host:pid of the worker that ran it


class SurplusTrial(Exception):
    """A trial asked for when the study's budget was already taken (two workers at once)."""


@dataclass
class TuneResult:
    """What a worker's ``tune`` call saw at its end."""

    study: Path
    storage: str
    """The storage URL, password hidden."""
    counted: int
    complete: int
    pruned: int
    failed: int
    best_value: float | None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_trial: int | None = None
    best_run: str | None = None
    ran_here: int = 0
    """Trials this worker ran (surplus ones included)."""
    wall_s: float = 0.0
    report: Path | None = None


def storage_url(study: StudyLayout, storage: str | None) -> str:
    """The storage URL: ``--storage`` as given, else the SQLite file in the study folder."""
    return storage or f"sqlite:///{study.database.resolve()}"


def redact(url: str) -> str:
    """A storage URL fit for messages and logs: the password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def check_storage(url: str) -> None:
    """Refuse a storage that cannot be used, before any trial: say which --storage and why."""
    shown = redact(url)
    if url.startswith("sqlite:///"):
        folder = Path(url.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--storage {shown}: cannot create {folder}: {e}") from None
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"--storage {shown}: {folder} is not writable")
        return
    try:
        import sqlalchemy
    except ImportError:
        raise ConfigError("medcap tune needs optuna and sqlalchemy: pip install 'medcap[tune]'") from None
    try:
        engine = sqlalchemy.create_engine(url, **_engine_kwargs(url))
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"--storage {shown}: the database driver {e.name} is not installed (PostgreSQL: pip install "
            "'medcap[tune]', which brings psycopg)"
        ) from None
    except Exception as e:
        raise ConfigError(f"--storage {shown}: not a usable database URL: {e}") from None
    try:
        with engine.connect():
            pass
    except Exception as e:
        first = str(getattr(e, "orig", e)).strip().splitlines()
        raise ConfigError(
            f"--storage {shown}: cannot connect ({first[0] if first else type(e).__name__}); is the server "
            "running and reachable from here, and are the database, user and password right?"
        ) from None
    finally:
        engine.dispose()


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        # Workers on one machine share the file: wait for a lock instead of failing at once.
        return {"connect_args": {"timeout": 120}}
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    return {"pool_pre_ping": True}


def _space_identity(space: SearchSpace) -> dict[str, Any]:
    """What makes two spaces the same study (the trial budget may change between runs)."""
    return {
        "config": space.config,
        "objective": space.objective,
        "overrides": {k: str(v) for k, v in sorted(space.overrides.items())},
        "params": [p.describe() + f" [{p.name}]" for p in space.params],
        "pruner": [
            space.pruner.kind,
            space.pruner.startup_trials,
            space.pruner.warmup_steps,
            space.pruner.reduction_factor,
        ],
    }


def _retry(study: Any, trial: Any) -> None:
    """Enqueue a trial again with the same values, continuing the same run folder."""
    root = trial.user_attrs.get(ATTR_RETRY_OF, trial.number)
    study.enqueue_trial(trial.params, user_attrs={ATTR_RETRY_OF: root}, skip_if_exists=False)


def _rdb_storage(url: str, heartbeat: int) -> Any:
    """optuna's RDBStorage for ``url``. Workers started together on a new database race to create
    its tables and stamp the schema version (PostgreSQL: a unique violation on alembic_version or
    pg_type); the loser finds the schema made by the winner when it tries again."""
    import time

    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=_engine_kwargs(url),
                heartbeat_interval=heartbeat,
                # Three beats: a worker slowed by a loaded machine is not taken for dead.
                grace_period=3 * heartbeat,
                # A killed worker's trial: FAIL after the grace period, then the same values again.
                heartbeat_stale_trial_callback=_retry,
            )
        except (IntegrityError, ProgrammingError):
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def open_study(
    space: SearchSpace,
    layout: StudyLayout,
    storage: str | None = None,
    study_name: str | None = None,
    heartbeat: int = 60,
) -> Any:
    """Create the study, or load it when it exists (refusing a different search space)."""
    import optuna

    url = storage_url(layout, storage)
    check_storage(url)
    rdb = _rdb_storage(url, heartbeat)
    name = study_name or layout.root.resolve().name
    study = optuna.create_study(
        storage=rdb,
        study_name=name,
        sampler=trial_sampler(space, 0),
        pruner=space.pruner.make(),
        direction=space.direction,
        load_if_exists=True,
    )
    identity = _space_identity(space)
    saved = study.user_attrs.get("space")
    if saved is None:
        study.set_user_attr("space", identity)
        study.set_user_attr("objective", space.objective)
    elif saved != identity:
        diffs = [
            f"{k}: {saved.get(k)!r} -> {identity.get(k)!r}"
            for k in identity
            if saved.get(k) != identity.get(k)
        ]
        raise ConfigError(
            f"study {name!r} in {redact(url)} was started with another search space ({'; '.join(diffs)}); "
            "use the original space file, or a new --study folder / --study-name"
        )
    layout.root.mkdir(parents=True, exist_ok=True)
    if not layout.space.is_file():
        shutil.copyfile(space.source, layout.space)
    return study


def trial_sampler(space: SearchSpace, number: int) -> Any:
    """The TPE sampler that draws trial ``number``'s values.

    Seeded by the space's seed and the trial number, not once per process: workers started with the
    same seed would otherwise draw the same values for their first trials. ``constant_liar`` makes
    TPE treat the trials still running elsewhere as bad results, so parallel workers spread out."""
    import optuna

    return optuna.samplers.TPESampler(
        seed=space.seed * 1_000_003 + number, n_startup_trials=space.startup_trials, constant_liar=True
    )


def _counts(trial: Any) -> bool:
    """Whether a trial takes a place in the budget (finished, running, queued, or failed by itself)."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING):
        return True
    return trial.state == TrialState.FAIL and ATTR_ERROR in trial.user_attrs


def _finished(trial: Any) -> bool:
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and ATTR_ERROR in trial.user_attrs
    )


def _retry_interrupted(study: Any) -> int:
    """Enqueue once each trial that an interrupt (Ctrl-C) ended; returns how many."""
    from optuna.trial import TrialState

    latest: dict[int, Any] = {}  # the newest trial of each retry chain
    for t in study.get_trials(deepcopy=False):
        root = t.user_attrs.get(ATTR_RETRY_OF, t.number)
        if root not in latest or t.number > latest[root].number:
            latest[root] = t
    interrupted = [
        t for t in latest.values() if t.state == TrialState.FAIL and ATTR_INTERRUPTED in t.user_attrs
    ]
    for t in interrupted:
        _retry(study, t)
    return len(interrupted)


def _objective(study: Any, space: SearchSpace, layout: StudyLayout, worker: str, progress: bool) -> Any:
    import optuna

    from medcap.config.run import load_run_config
    from medcap.train.recipe import fit

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(ATTR_WORKER, worker)
        others = study.get_trials(deepcopy=False)
        ahead = [t for t in others if t.number < trial.number and _counts(t)]
        retry_of = trial.user_attrs.get(ATTR_RETRY_OF)
        twin = retry_of is not None and any(
            t.user_attrs.get(ATTR_RETRY_OF) == retry_of and t.number < trial.number and _counts(t)
            for t in others
        )
        if len(ahead) >= space.trials or twin:
            trial.set_user_attr(ATTR_SURPLUS, True)
            raise SurplusTrial(f"the study had its {space.trials} trials when this one was asked for")
        study.sampler = trial_sampler(space, trial.number)  # trial.suggest_* draw from study.sampler
        values = {p.name: p.suggest(trial) for p in space.params}
        run = layout.trial(retry_of if retry_of is not None else trial.number)
        trial.set_user_attr(ATTR_RUN_DIR, str(run.root))
        resume = retry_of is not None and run.last.train_state.is_file()
        if retry_of is not None and not resume and run.root.exists():
            shutil.rmtree(run.root)  # killed before its first checkpoint: start it again cleanly
        if resume:
            # The pruner judges the whole curve: the validations the killed trial reported come along.
            killed = max(
                (
                    t
                    for t in others
                    if t.user_attrs.get(ATTR_RETRY_OF, t.number) == retry_of and t.number < trial.number
                ),
                key=lambda t: t.number,
                default=None,
            )
            saved = json.loads(run.last.metrics.read_text(encoding="utf-8"))["step"]
            for step, value in sorted((killed.intermediate_values if killed else {}).items()):
                if step <= saved:  # later ones were not saved: the resumed run validates them again
                    trial.report(value, step)
        overrides = space.trial_overrides(values, run.root)
        if resume:
            overrides["train.resume"] = True
        cfg = load_run_config(space.base_config_path(), overrides)
        shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
        print(f"[trial {trial.number}] {shown} -> {run.root}" + (" (resuming)" if resume else ""), flush=True)

        def on_validation(step: int, figure: float | None) -> bool:
            if figure is None or not math.isfinite(figure):
                return False
            trial.report(figure, step)
            return trial.should_prune()

        try:
            result = fit(cfg, on_validation)
        except KeyboardInterrupt:
            trial.set_user_attr(ATTR_INTERRUPTED, True)
            raise
        except Exception as e:
            trial.set_user_attr(ATTR_ERROR, f"{type(e).__name__}: {e}"[:1000])
            raise
        finally:
            gc.collect()
        for key in ("best_step", "step", "best_valid_loss", "best_score", "wall_s"):
            trial.set_user_attr(key, result.get(key))
        if result.get("stopped_by_caller"):
            raise optuna.TrialPruned(f"pruned at step {result['step']}")
        value = result["best_valid_loss"] if space.objective == "loss" else result["best_score"]
        if value is None:
            raise RuntimeError(f"trial {trial.number} finished without a validation figure")
        return float(value)

    return objective


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def tune(
    space: SearchSpace,
    study_dir: str | Path,
    *,
    storage: str | None = None,
    study_name: str | None = None,
    trials: int | None = None,
    heartbeat: int = 60,
    poll_s: float | None = None,
    max_trials_here: int | None = None,
    progress: bool = True,
) -> TuneResult:
    """Work on the study until its budget of trials is finished; returns what was found.

    Any number of workers may run this on the same study at once (same ``study_dir`` name and
    ``storage``). ``trials`` overrides the space's budget (to extend a finished study).
    ``max_trials_here`` stops this worker after that many trials of its own.
    """
    import dataclasses

    import optuna
    from optuna.trial import TrialState

    from medcap.train.errors import TrainingError

    if trials is not None:
        if trials < 1:
            raise ConfigError(f"--trials must be at least 1, got {trials}")
        space = dataclasses.replace(space, trials=trials)
    # Absolute: trial folders are recorded in the shared storage and read from anywhere.
    layout = StudyLayout(Path(study_dir).resolve())
    t0 = time.perf_counter()
    if not progress:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(space, layout, storage, study_name, heartbeat)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    _retry_interrupted(study)
    objective = _objective(study, space, layout, worker, progress)
    poll = poll_s if poll_s is not None else max(1.0, heartbeat / 4)
    ran = 0
    while max_trials_here is None or ran < max_trials_here:
        with warnings.catch_warnings():  # "experimental" since optuna 2.9, and what optimize() itself calls
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a killed worker's trial becomes a queued retry
        all_trials = study.get_trials(deepcopy=False)
        finished = sum(_finished(t) for t in all_trials)
        if finished >= space.trials:
            break
        waiting = any(t.state == TrialState.WAITING for t in all_trials)
        if waiting or sum(_counts(t) for t in all_trials) < space.trials:
            study.optimize(
                objective, n_trials=1, catch=(SurplusTrial, TrainingError, RuntimeError, ValueError)
            )
            ran += 1
            continue
        # The rest of the budget is running elsewhere: stay to take over if one of them dies.
        time.sleep(poll)
    result = summarize(study, layout, storage_url(layout, storage))
    result.ran_here, result.wall_s = ran, time.perf_counter() - t0
    from medcap.tune.report import write_study_files

    with contextlib.suppress(OSError):
        result.report = write_study_files(study, layout, space)
    return result


def summarize(study: Any, layout: StudyLayout, url: str) -> TuneResult:
    """Counts and the best trial of a study."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        best = study.best_trial
    return TuneResult(
        study=layout.root,
        storage=redact(url),
        counted=sum(_finished(t) for t in trials),
        complete=len(complete),
        pruned=sum(t.state == TrialState.PRUNED for t in trials),
        failed=sum(t.state == TrialState.FAIL and ATTR_ERROR in t.user_attrs for t in trials),
        best_value=best.value if best else None,
        best_params=dict(best.params) if best else {},
        best_trial=best.number if best else None,
        best_run=best.user_attrs.get(ATTR_RUN_DIR) if best else None,
    )


def trial_run(trial: Any) -> RunLayout | None:
    run = trial.user_attrs.get(ATTR_RUN_DIR)
    return RunLayout(run) if run else None


__all__ = [
    "SurplusTrial",
    "TuneResult",
    "check_storage",
    "open_study",
    "redact",
    "storage_url",
    "summarize",
    "tune",
]
