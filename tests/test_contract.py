"""lmech.contract: the registry's public register(), the spec's public parsing, run_experiment(config=)."""

import sys
import types
from dataclasses import dataclass

import pytest

from lmech import experiments
from lmech.contract import (Experiment, coerce_key, coerce_values, get, module_of, names, parse_grid, parse_point,
                            parse_sets, register, unregister)
from lmech.errors import ConfigError


@dataclass
class _Cfg:
    lr: float = 1e-3
    steps: int = 3
    name: str = "x"


def _run(cfg, run, seed):
    run.log(0, value=float(cfg.steps))
    return {"steps": cfg.steps}


@pytest.fixture
def entry(monkeypatch):
    module = types.ModuleType("lmech_test_contract_entry")
    module.EXPERIMENT = Experiment("contract-toy", "a toy", _Cfg, _run)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    register("contract-toy", module.__name__)
    yield "contract-toy"
    unregister("contract-toy")


def test_register_get_unregister(entry):
    assert entry in names() and entry in experiments.names()
    assert module_of(entry) == "lmech_test_contract_entry"
    assert get(entry) is experiments.get(entry)
    register(entry, "lmech_test_contract_entry")  # the same binding again: no-op
    with pytest.raises(ConfigError, match="already registered"):
        register(entry, "another.module")
    unregister(entry)
    with pytest.raises(ConfigError, match="unknown experiment"):
        get(entry)


def test_register_refuses_bad_names_and_modules():
    with pytest.raises(ConfigError, match="bad experiment name"):
        register("Bad Name", "x")
    with pytest.raises(ConfigError, match="dotted module path"):
        register("ok-name", "")


def test_builtin_entries_are_registered_in_catalog_order():
    assert names()[:2] == ["grokking", "inr-noise"]
    assert module_of("grokking") == "lmech.experiments.grokking"


def test_public_parsing(entry):
    exp = get(entry)
    assert parse_sets(exp, ["lr=0.5", "steps=1e1"]) == {"lr": 0.5, "steps": 10}
    assert coerce_key(exp, "steps", "7") == 7
    assert coerce_values(exp, {"lr": "2", "name": 3}) == {"lr": 2.0, "name": "3"}
    with pytest.raises(ConfigError, match="unknown key"):
        coerce_key(exp, "nope", 1)
    assert parse_grid(["lr=1e-3, 1e-2", "steps=1"]) == {"lr": ["1e-3", "1e-2"], "steps": ["1"]}
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["lr=1", "lr=2"])
    assert parse_point("optimizer=poprisk,gate=soft") == {"optimizer": "poprisk", "gate": "soft"}
    with pytest.raises(ConfigError):
        parse_point("optimizer")


def test_run_experiment_takes_a_ready_config(entry, tmp_path):
    cfg = _Cfg(steps=5)
    summary = experiments.run_experiment(entry, config=cfg, out=tmp_path)
    assert summary["state"] == "done" and summary["result"]["steps"] == 5
    same = experiments.run_experiment(entry, ["steps=5"], out=tmp_path / "b")
    assert same["result"]["steps"] == 5 and same["state"] == "done"  # the parsed path gives the same run
    with pytest.raises(ConfigError, match="not both"):
        experiments.run_experiment(entry, ["steps=5"], config=cfg, out=tmp_path / "c")
    with pytest.raises(ConfigError, match="must be a _Cfg"):
        experiments.run_experiment(entry, config={"steps": 5}, out=tmp_path / "d")


def test_old_import_paths_keep_working():
    from lmech.cli import parse_grid as cli_parse_grid
    from lmech.experiments.base import CheckRow, ConfigError as OldConfigError, parse_sets as old_parse_sets

    assert cli_parse_grid is parse_grid and old_parse_sets is parse_sets and OldConfigError is ConfigError
    assert CheckRow.relative("x", 1.0, 1.0, 0.1).passed
