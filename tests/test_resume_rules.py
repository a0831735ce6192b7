"""A results file continues only under the rules that wrote it: --tol's stop rule is part of the
experiment, recorded in the options file, and a file of another rule is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

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
