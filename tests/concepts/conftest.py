"""A small phantom dataset (ROCOv2 layout, with concepts and cui_mapping.csv), prepared once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def phantom_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medcap.cli.data import cmd_prepare
    from medcap.data.phantoms import make_phantoms

    base = tmp_path_factory.mktemp("concept_phantoms")
    make_phantoms(base / "phantoms", 240, seed=0, size_range=(64, 72), progress=False)
    prepared = base / "prepared"
    assert cmd_prepare([str(base / "phantoms"), "--out", str(prepared), "--color-policy", "all"]) == 0
    return prepared


def concept_overrides(prepared: Path, out_dir: Path, **settings: object) -> list[str]:
    """Overrides of a fast tiny concept run."""
    base: dict[str, object] = {
        "data.prepared": prepared,
        "model.name_or_path": "tiny",
        "concepts.min_freq": 3,
        "train.out_dir": out_dir,
        "train.batch_size": 16,
        "train.num_workers": 0,
        "train.cpu_threads": 1,
        "train.progress_bar": "false",
        "train.report_to": "csv",
        "train.lr": 5e-3,
    }
    base.update(settings)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]
