"""The digits experiment (docs/benchmarks.md): its block and benchmarks/digits_experiment.sh run the
same commands into a fresh folder, and end with a row-by-row comparison against the recorded results."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "benchmarks" / "results" / "digits"
SCRIPT = ROOT / "benchmarks" / "digits_experiment.sh"
ECHO = 'densepure-rt() { echo "densepure-rt $*"; }\npython() { echo "python $*"; }\n'


def readme_block() -> str:
    """The first ```bash block of the section "The digits experiment" in docs/benchmarks.md."""
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    section = page[page.index("## The digits experiment"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def commands(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def test_the_readme_block_and_the_script_run_the_same_commands(tmp_path):
    block = subprocess.run(["bash", "-c", ECHO + readme_block()], cwd=tmp_path, capture_output=True, text=True, check=True)
    script = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, check=True,
                            env={**os.environ, "DRY_RUN": "1"})
    assert commands(block.stdout) == commands(script.stdout)
    ran = commands(block.stdout)
    assert sum(c.startswith("densepure-rt certify") for c in ran) == 6
    assert all("--out digits-experiment/" in c for c in ran if c.startswith("densepure-rt certify"))
    assert ran[-1] == "python benchmarks/compare_rows.py digits-experiment benchmarks/results/digits"


def test_the_script_refuses_to_write_over_recorded_results(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "benchmarks/results/digits"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "DRY_RUN": "1"})
    assert result.returncode == 2
    assert "recorded results" in result.stderr
    assert not (tmp_path / "benchmarks").exists()


def test_compare_rows_says_same_rows_or_each_difference(tmp_path):
    fresh = tmp_path / "fresh"
    shutil.copytree(RECORDED, fresh)
    run = [sys.executable, str(ROOT / "benchmarks" / "compare_rows.py"), str(fresh), str(RECORDED)]
    same = subprocess.run(run, capture_output=True, text=True)
    assert same.returncode == 0 and same.stdout.startswith("same rows: 6 files"), same.stdout + same.stderr

    # A different wall time is the same row; a different radius is not.
    target = fresh / "onestep_sigma0.5.tsv"
    lines = target.read_text().splitlines()
    header = lines[0].split("\t")
    row = lines[3].split("\t")
    row[header.index("time")] = "9:99:99.000000"
    lines[3] = "\t".join(row)
    target.write_text("\n".join(lines) + "\n")
    assert subprocess.run(run, capture_output=True, text=True).returncode == 0
    old_radius = row[header.index("radius")]
    row[header.index("radius")] = "0.123"
    lines[3] = "\t".join(row)
    target.write_text("\n".join(lines) + "\n")
    differs = subprocess.run(run, capture_output=True, text=True)
    assert differs.returncode == 1
    assert differs.stdout.strip() == f"onestep_sigma0.5.tsv: image {row[0]} radius {old_radius} -> 0.123"


@pytest.mark.slow
def test_the_block_reruns_its_first_images_to_the_recorded_rows(tmp_path):
    """The block as written, each certify limited to its first image (``--max 9`` appended: image
    0), into a fresh folder; its last line compares them with the recorded rows of
    those images (the whole block takes about 11 minutes on two cores; rows are per image, so its
    first images are the whole run's first rows)."""
    images = ("0",)
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    for tsv in RECORDED.glob("*.tsv"):
        if not Path(f"{tsv}.json").is_file():
            continue  # wall_times.tsv: not a results file
        lines = tsv.read_text().splitlines()
        kept = [lines[0]] + [line for line in lines[1:] if line.split("\t")[0] in images]
        assert len(kept) == 1 + len(images), tsv
        (recorded / tsv.name).write_text("\n".join(kept) + "\n")
        shutil.copy(f"{tsv}.json", recorded / f"{tsv.name}.json")
    console = Path(sys.executable).parent / "densepure-rt"
    wrappers = (
        f'densepure-rt() {{ if [ "$1" = certify ]; then "{console}" "$@" --max 9; else "{console}" "$@"; fi; }}\n'
        f'python() {{ [ "$1 $3" = "benchmarks/compare_rows.py benchmarks/results/digits" ] || exit 9; '
        f'"{sys.executable}" "{ROOT}/$1" "$2" "{recorded}"; }}\n'
    )
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", wrappers + readme_block()], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("same rows: 6 files of digits-experiment"), done.stdout[-2000:]
    assert (tmp_path / "digits-experiment" / "curves.png").read_bytes()[:4] == b"\x89PNG"
