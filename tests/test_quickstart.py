"""The README's quick start, run as written: its densepure-rt commands (after the install line) in a
fresh folder, through the installed console script, then checked against the Python API."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONSOLE = Path(sys.executable).parent / "densepure-rt"


def quickstart_commands() -> list[list[str]]:
    """The densepure-rt lines of the bash block under "## Quick start" in README.md."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Quick start"):]
    section = section[:section.index("\n## ", 1)]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("densepure-rt ")]


def test_the_quick_start_block_is_a_certify_then_a_report():
    names = [c[1] for c in quickstart_commands()]
    assert names == ["certify", "report"]


@pytest.mark.slow
def test_the_quick_start_runs_as_written_and_its_rows_equal_the_api(tmp_path):
    assert CONSOLE.exists(), f"the console script is not installed beside {sys.executable}"
    certify, report = quickstart_commands()
    first = subprocess.run([str(CONSOLE), *certify[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr
    out = tmp_path / certify[certify.index("--out") + 1]
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    assert len(rows) == 30  # every 12th of the 360 bundled test digits
    assert "30 images certified" in first.stderr + first.stdout

    shown = subprocess.run([str(CONSOLE), *report[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    plot = tmp_path / report[report.index("--plot") + 1]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    correct = sum(r[header.index("correct")] == "1" for r in rows)
    assert f"{100 * correct / 30:.1f}%" in shown.stdout

    again = subprocess.run([str(CONSOLE), *certify[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert [line.split("\t") for line in out.read_text().splitlines()][1:] == rows  # nothing recomputed, nothing added

    # The first row, recomputed through the Python API with the command's settings.
    from densepure_rt import open_engine
    from densepure_rt.files.data import digits_test_split
    from densepure_rt.files.manifest import BUNDLED_ENGINE

    flag = {certify[i]: certify[i + 1] for i in range(2, len(certify) - 1) if certify[i].startswith("--")}
    sample = digits_test_split()[int(rows[0][header.index("idx")])]
    with open_engine(BUNDLED_ENGINE) as engine:
        cert = engine.certify(sample.image, sigma=float(flag["--sigma"]), steps=int(flag["--steps"]), votes=int(flag["--votes"]),
                              n0=int(flag["--n0"]), n=int(flag["--n"]), alpha=0.001, seed=0, image_index=sample.index)
    assert int(rows[0][header.index("predict")]) == cert.prediction
    np.testing.assert_allclose(float(rows[0][header.index("radius")]), cert.radius, rtol=0, atol=1e-3)
