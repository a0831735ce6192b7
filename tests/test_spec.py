"""The run description (densepure_rt/spec.py) and the mode table (densepure_rt/modes.py).

Every setting of a run is checked in one place, when its RunSpec is made, with one-line errors that
name the API's parameter (the command line shows its flag); the spec is what the options file
records (read back from a committed options file of the digits experiment); the modes come from one
table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from densepure_rt.errors import ConfigError, cli_message
from densepure_rt.modes import MODE_TABLE, mode_of
from densepure_rt.spec import MODES, RunSpec

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("changes,needle", [
    (dict(sigma=0.0), "sigma must be > 0"),
    (dict(sigma=float("nan")), "sigma must be finite"),
    (dict(alpha=1.0), "alpha must be in (0, 1)"),
    (dict(n0=0), "n0 must be >= 1"),
    (dict(n=2.5), "n must be an integer"),
    (dict(votes=0), "votes must be an integer >= 1"),
    (dict(steps=0), "steps must be"),
    (dict(steps="two"), "steps must be"),
    (dict(seed=2**32), "seed must be an integer from 0 to 2^32 - 1"),
    (dict(batch=0), "batch must be an integer >= 1"),
    (dict(images_per_call=True), "in_flight must be an integer"),
    (dict(round_size=4), "round_size goes with the sequential modes"),
    (dict(mode="certify-radii"), "radii: give the target radii"),
    (dict(mode="certify-radii", radii=(-0.5,)), "radii"),
    (dict(mode="certify-radii", radii=(0.25,), round_size=0), "round_size must be an integer >= 1"),
    (dict(mode="certify-until"), "tol: give the tolerance"),
    (dict(mode="certify-until", tol=-1.0), "tol"),
    (dict(mode="certify-until", tol=0.05, n=0), "n_max must be >= 1"),
    (dict(mode="vote"), "mode must be one of certify, predict, certify-radii, certify-until"),
])
def test_every_setting_is_checked_when_the_spec_is_made(changes, needle):
    settings = dict(mode="certify", sigma=0.5, steps=4, votes=3, n0=10, n=100)
    with pytest.raises(ConfigError) as info:
        RunSpec(**{**settings, **changes})
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_the_command_line_shows_flags_for_the_same_errors():
    with pytest.raises(ConfigError) as info:
        RunSpec("certify-radii", 0.5, radii=(0.25,), round_size=0)
    assert cli_message(info.value).startswith("--round must be an integer >= 1")
    with pytest.raises(ConfigError) as info:
        RunSpec("certify", 0.5, images_per_call=0)
    assert cli_message(info.value).startswith("--images-per-call must be an integer >= 1")


def test_values_are_normalised_once():
    spec = RunSpec("certify-radii", 0.5, steps=" One-Shot ", votes=3, n0=10, n=200, radii=[0.5, 0.25])
    assert spec.steps == "one-shot" and spec.radii == (0.5, 0.25) and spec.round_size == 1 and spec.sequential
    assert RunSpec("predict", 0.25, n0=100, n=50).n0 is None  # PREDICT has no selection phase
    assert RunSpec("certify", 0.25, steps=4).round_size is None and RunSpec("certify", 0.25, steps=4).steps == "4"
    assert RunSpec("certify", 0.5, n0=100, n=1000).samples_per_image == 1100
    assert RunSpec("predict", 0.5, n=100).samples_per_image == 100
    with pytest.raises(Exception):
        spec.sigma = 1.0  # frozen
    assert spec.replace(round_size=4).round_size == 4
    with pytest.raises(ConfigError):
        spec.replace(votes=0)


def test_a_committed_options_file_reads_back_as_the_spec_it_records():
    """benchmarks/results/digits/densepure_b4_k3_sigma0.5.tsv.json (written by 0.1.0, b = 4, K = 3,
    n0 = 100, n = 500, sigma 0.5, seed 0, batch 32): from_dict gives those settings, and to_dict
    gives the file's values back for every key the spec holds."""
    options = json.loads((ROOT / "benchmarks/results/digits/densepure_b4_k3_sigma0.5.tsv.json").read_text())
    spec = RunSpec.from_dict(options)
    assert (spec.mode, spec.sigma, spec.steps, spec.votes, spec.n0, spec.n, spec.alpha, spec.seed, spec.batch) == (
        "certify", 0.5, "4", 3, 100, 500, 0.001, 0, 32)
    assert {k: v for k, v in spec.to_dict().items() if k in options} == {k: options[k] for k in spec.to_dict() if k in options}
    again = RunSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    radii = RunSpec("certify-radii", 0.5, n=2000, radii=(0.25, 0.5), round_size=8)
    assert radii.to_dict()["radii"] == [0.25, 0.5] and radii.to_dict()["round"] == 8
    assert RunSpec.from_dict(radii.to_dict()) == radii


def test_the_modes_come_from_one_table():
    assert MODES == tuple(MODE_TABLE) == ("certify", "predict", "certify-radii", "certify-until")
    for name, mode in MODE_TABLE.items():
        assert mode.name == name and mode_of(name) is mode
        assert type(mode).__module__ == "densepure_rt.modes"
    assert [m for m, mode in MODE_TABLE.items() if mode.sequential] == ["certify-radii", "certify-until"]
    assert MODE_TABLE["certify-until"].options(RunSpec("certify-until", 0.5, tol=0.05, n=100))["stop_rule"] == "tol-budget-1"
    assert MODE_TABLE["certify"].options(RunSpec("certify", 0.5))["stop_rule"] is None


@pytest.mark.parametrize("module", ["densepure_rt.spec", "densepure_rt.modes", "densepure_rt.scale.work"])
def test_every_public_name_of_the_run_description_has_a_docstring(module):
    import importlib

    mod = importlib.import_module(module)
    missing = [name for name in mod.__all__ if (callable(getattr(mod, name)) or isinstance(getattr(mod, name), type))
               and not (getattr(mod, name).__doc__ or "").strip()]
    assert not missing, missing
