"""Fuzz the command line's input handling: random experiments, keys and values (negative, zero, NaN,
inf, huge, wrong types, brackets and markup). Every case exits 0 (valid: the run is made) or 2 (one
line on stderr, nothing written). Training itself is replaced by a no-op, so the whole fuzz takes
seconds; the real commands are covered in test_cli_bad_input.py."""

import random

import pytest
from typer.testing import CliRunner

from lmech import experiments
from lmech.cli import app
from lmech.contract.spec import config_fields

VALUES = ["-1", "0", "1", "2", "0.5", "1e-3", "nan", "inf", "-inf", "1e308", "99999999999999999999", "abc",
          "", "[bold]x", "[/x]", "[mlp]", "true", "none", "1,2", "=", "a=b", "\u00e9", "%s", "{0}", "'",
          "10000000"]
NAMES = ["nosuch", "grok", "[x]"]
CASES = 300


@pytest.fixture
def no_training(monkeypatch):
    for name in experiments.names():
        exp = experiments.get(name)
        monkeypatch.setattr(exp, "run", lambda cfg, run, seed: {})
        monkeypatch.setattr(exp, "check", None)


def _case(rng: random.Random) -> list[str]:
    names = experiments.names()
    name = rng.choice(names + NAMES) if rng.random() < 0.9 else rng.choice(NAMES)
    keys = list(config_fields(experiments.get(name).config)) if name in names else ["lr"]
    args = ["run", name]
    for _ in range(rng.randint(0, 3)):
        key = rng.choice(keys + ["bogus", "[b]"])
        args += ["--set", f"{key}={rng.choice(VALUES)}" if rng.random() < 0.95 else key]
    if rng.random() < 0.3:
        args += ["--seed", rng.choice(VALUES)]
    if rng.random() < 0.2:
        args += ["--threads", rng.choice(VALUES)]
    if rng.random() < 0.2:
        args += ["--max-memory", rng.choice(VALUES + ["8G", "1K"])]
    return args


def test_random_bad_input_exits_0_or_2_with_one_line_and_nothing_written(tmp_path, no_training):
    runner = CliRunner()
    rng = random.Random(0)
    codes = {0: 0, 2: 0}
    for i in range(CASES):
        out = tmp_path / f"store-{i}"
        args = _case(rng) + ["--out", str(out)]
        result = runner.invoke(app, args)
        assert result.exit_code in (0, 2), (args, result.exit_code, result.output, result.exception)
        codes[result.exit_code] += 1
        if result.exit_code == 2:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
            assert not out.exists(), (args, list(out.iterdir()))
        else:
            assert len([p for p in out.iterdir() if not p.name.startswith(".")]) >= 1
    assert codes[0] > 10 and codes[2] > 100  # the fuzz reaches both outcomes
