"""Search spaces: every shipped space loads against its run config; a space naming an unknown
setting, an empty range, an objective trials cannot select by, or an unreachable storage is refused
before any trial, with the setting named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medcap.cli.tune import cmd_tune
from medcap.config.loader import ConfigError
from medcap.tune.space import load_space, shipped_spaces
from tests.fixtures import free_port, make_prepared
from tests.tune.spaces import write_space


def test_shipped_spaces_load_and_each_bound_gives_a_valid_run_config() -> None:
    spaces = shipped_spaces()
    assert {"demo", "blip2-opt-6.7b-lora", "peft-methods"} <= set(spaces)
    for name, path in spaces.items():
        assert path.read_text().startswith(f"# medcap tune --space {name} ")
        space = load_space(name)  # checks every bound and choice against the base config
        assert space.params and space.trials >= 1
    lora = load_space("blip2-opt-6.7b-lora")
    assert lora.config == "blip2-opt-6.7b-lora-v100" and lora.objective == "bertscore"
    assert {p.name for p in lora.params} >= {
        "train.lr",
        "model.peft.r",
        "model.peft.alpha",
        "model.peft.targets",
    }
    methods = {p.name: p for p in load_space("peft-methods").params}["model.peft.method"]
    assert {"lora", "vera", "adalora", "ia3"} <= set(methods.choices)


def _space(tmp_path: Path, **changes: object) -> Path:
    prepared = make_prepared(tmp_path / "prep", n_train=4, n_valid=2)
    return write_space(tmp_path / "s", prepared, **changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"params": {"train.lrr": {"low": 1e-4, "high": 1e-2}}},
            r"params train\.lrr: unknown setting; did you mean train\.lr",
        ),
        (
            {"params": {"train.lr": {"low": 1e-2, "high": 1e-4}}},
            r"params train\.lr: the range is empty: low 0\.01 is above high 0\.0001",
        ),
        (
            {"params": {"model.peft.targets": {"choices": []}}},
            r"params model\.peft\.targets: the range is empty",
        ),
        (
            {"params": {"model.peft.r": {"low": 2.5, "high": 8}}},
            r"params model\.peft\.r 2\.5: expected an integer",
        ),
        (
            {"params": {"train.lr": {"low": 0.0, "high": 1e-2, "log": True}}},
            r"params train\.lr: a log range needs low > 0",
        ),
        (
            {"params": {"train.lr": {"low": -1.0, "high": 1e-2}}},
            r"params train\.lr = -1\.0 gives no valid run config: .*train\.lr must be a positive number",
        ),
        (
            {"params": {"train.schedule": {"low": 0, "high": 1}}},
            r"params train\.schedule.*(not one of|not a number setting)",
        ),
        (
            {"params": {"model.peft.targets": {"choices": ["lm-everything"]}}},
            r"params model\.peft\.targets = 'lm-everything' gives no valid run config: .*unknown preset",
        ),
        (
            {"objective": "bleurt"},
            r"objective 'bleurt' is not a figure trials can select by .*choose from loss, bertscore",
        ),
        (
            {"overrides": {"train.max_step": 3}},
            r"overrides train\.max_step: unknown setting; did you mean train\.max_steps",
        ),
        ({"pruner": {"kind": "hyperband"}}, r"pruner\.kind 'hyperband' is not one of median, halving, none"),
    ],
)
def test_a_bad_space_is_refused_naming_the_setting(tmp_path: Path, changes: dict, message: str) -> None:
    path = _space(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message):
        load_space(path)


def test_an_unreachable_storage_is_refused_before_any_trial(tmp_path: Path, capsys) -> None:
    path = _space(tmp_path)
    study = tmp_path / "study"
    url = f"postgresql://medcap:secret@127.0.0.1:{free_port()}/nothing"
    assert cmd_tune(["--space", str(path), "--study", str(study), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert (
        f"--storage postgresql://medcap:***@127.0.0.1:{url.split(':')[3].split('/')[0]}/nothing: cannot connect"
        in err
    )
    assert "secret" not in err
    assert not (study / "trials").exists()
    # And a bad space on the command line is refused the same way, before anything is written.
    bad = yaml.safe_load(path.read_text())
    bad["params"]["train.warmup"] = {"low": 0, "high": 5}
    path.write_text(yaml.safe_dump(bad))
    assert cmd_tune(["--space", str(path), "--study", str(study)]) == 2
    assert "params train.warmup: unknown setting; did you mean train.warmup_steps" in capsys.readouterr().err
    assert not study.exists()
