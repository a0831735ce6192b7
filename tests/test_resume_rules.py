"""A results file continues only under the rules that wrote it: --tol's stop rule is part of the
experiment, recorded in the options file, and a file of another rule is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from densepure_rt.cli import main
from densepure_rt.stats.sequential import STOP_RULE

TOL = ["certify", "--sigma", "0.5", "--steps", "1", "--votes", "1", "--n0", "5", "--tol", "0.1", "--n-max", "60",
       "--skip", "60", "--quiet"]


def test_a_tol_file_of_another_stop_rule_is_refused_and_its_own_continues(tmp_path):
    out = tmp_path / "tol.tsv"
    first = CliRunner().invoke(main, [*TOL, "--out", str(out)])
    assert first.exit_code == 0, first.output
    options_file = Path(f"{out}.json")
    options = json.loads(options_file.read_text())
    assert options["stop_rule"] == STOP_RULE == "tol-budget-1"
    complete = out.read_text()
    lines = complete.splitlines(keepends=True)
    out.write_text("".join(lines[:2]))  # stopped after one image: the same rule continues it
    again = CliRunner().invoke(main, [*TOL, "--out", str(out)])
    assert again.exit_code == 0, again.output
    # Rows are written as images finish (not in index order): compared by image, without the wall time
    # and the UNet evaluations (which count the work of samples started and dropped, and so depend on
    # which other images were in flight).
    strip = lambda text: sorted(line.split("\t")[:5] + line.split("\t")[6:-1] for line in text.splitlines())  # noqa: E731
    assert strip(out.read_text()) == strip(complete)

    out.write_text("".join(lines[:2]))
    del options["stop_rule"]  # a file written before the rule was recorded: the one-doubling forecast
    options_file.write_text(json.dumps(options))
    refused = CliRunner().invoke(main, [*TOL, "--out", str(out)])
    assert refused.exit_code == 2
    assert "stop_rule 'tol-one-doubling' -> 'tol-budget-1'" in refused.stderr
    assert out.read_text() == "".join(lines[:2])


RADIUS = ["certify", "--sigma", "0.5", "--steps", "1", "--votes", "1", "--n0", "20", "--radius", "0.25", "--n-max", "60",
          "--skip", "60", "--quiet"]


def test_the_selection_rule_is_recorded_and_a_file_of_another_rule_is_refused(tmp_path):
    from densepure_rt.stats.selection import SELECTION_RULES

    # The command's choices are the rules the statistics define.
    choices = next(p for p in main.commands["certify"].params if p.name == "selection").type.choices
    assert list(choices) == list(SELECTION_RULES)

    out = tmp_path / "radius.tsv"
    first = CliRunner().invoke(main, [*RADIUS, "--selection", "first-2", "--out", str(out)])
    assert first.exit_code == 0, first.output
    options_file = Path(f"{out}.json")
    options = json.loads(options_file.read_text())
    assert options["selection_rule"] == "first-2"
    complete = out.read_text()

    refused = CliRunner().invoke(main, [*RADIUS, "--out", str(out)])  # the default rule on a first-2 file
    assert refused.exit_code == 2
    assert "selection_rule 'first-2' -> 'clear-leader'" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert out.read_text() == complete

    # A file written before the rule was recorded used the clear-leader rule: it continues under it.
    plain = tmp_path / "plain.tsv"
    assert CliRunner().invoke(main, [*RADIUS, "--out", str(plain)]).exit_code == 0
    plain_options = json.loads(Path(f"{plain}.json").read_text())
    assert plain_options["selection_rule"] == "clear-leader"
    del plain_options["selection_rule"]
    Path(f"{plain}.json").write_text(json.dumps(plain_options))
    assert CliRunner().invoke(main, [*RADIUS, "--out", str(plain)]).exit_code == 0
    assert CliRunner().invoke(main, [*RADIUS, "--selection", "first-1", "--out", str(plain)]).exit_code == 2


def test_selection_goes_with_the_sequential_modes_only(tmp_path):
    fixed = ["certify", "--sigma", "0.5", "--steps", "1", "--votes", "1", "--n0", "5", "--n", "10", "--max", "1"]
    result = CliRunner().invoke(main, [*fixed, "--selection", "first-1", "--out", str(tmp_path / "f.tsv")])
    assert result.exit_code == 2 and "--selection goes with --radius or --tol" in result.stderr
    assert not (tmp_path / "f.tsv").exists()
    from densepure_rt.errors import ConfigError
    from densepure_rt.spec import RunSpec

    with pytest.raises(ConfigError, match="selection must be one of clear-leader, first-1, first-2, first-3"):
        RunSpec("certify-radii", 0.5, radii=(0.25,), selection="first-9")
