"""report: certified accuracy with its 95% interval over the images, the envelope over several files
and the file each of its values comes from, and legends from each file's settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from statsmodels.stats.proportion import proportion_confint

from densepure_rt.cli import main
from densepure_rt.files.report import clopper_pearson

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "digits"
FILES = ("densepure_b4_k3_sigma0.25.tsv", "densepure_b4_k3_sigma0.5.tsv")
RADII = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("successes, trials", [(0, 40), (1, 40), (20, 40), (39, 40), (40, 40), (3, 7), (0, 1), (1, 1)])
def test_clopper_pearson_equals_statsmodels(successes, trials):
    low, high = proportion_confint(successes, trials, alpha=0.05, method="beta")
    assert clopper_pearson(successes, trials) == pytest.approx((low, high), abs=1e-12)


@pytest.fixture()
def two_files(tmp_path) -> list[Path]:
    for name in FILES:
        shutil.copy(COMMITTED / name, tmp_path / name)
        shutil.copy(COMMITTED / f"{name}.json", tmp_path / f"{name}.json")
    return [tmp_path / name for name in FILES]


def _recomputed(path: Path) -> list[tuple[int, int]]:
    """(certified and correct, labelled) per radius, read from the TSV here."""
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    rows = [r for r in rows if int(r["label"]) >= 0]
    return [(sum(r["predict"] == r["label"] and float(r["radius"]) >= rad for r in rows), len(rows)) for rad in RADII]


def test_the_table_gives_intervals_the_envelope_and_its_sources(two_files, tmp_path):
    table_json = tmp_path / "table.json"
    result = CliRunner().invoke(main, ["report", *map(str, two_files), "--json", str(table_json), "--plot", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    table = json.loads(table_json.read_text())
    counts = {str(f): _recomputed(f) for f in two_files}
    for name, per_radius in counts.items():
        assert table["files"][name] == pytest.approx([k / n for k, n in per_radius])
        expected = [proportion_confint(k, n, alpha=0.05, method="beta") for k, n in per_radius]
        assert np.allclose(table["intervals"][name], expected, atol=1e-9, rtol=0)
    for k, radius in enumerate(RADII):
        best = max(counts, key=lambda n: counts[n][k][0])  # first file on ties, as argmax
        assert table["best_file"][k] == best
        assert table["best_interval"][k] == pytest.approx(table["intervals"][best][k])
    assert table["settings"][str(two_files[1])] == "sigma 0.5, K 3, b 4, n 500"

    lines = result.stdout.splitlines()
    sources = next(line for line in lines if line.startswith("  from file")).split()[2:]
    assert sources == [f"[{1 + [str(f) for f in two_files].index(n)}]" for n in table["best_file"]]
    assert sum(line.startswith("  95% interval") for line in lines) == 2
    assert "(sigma 0.25, K 3, b 4, n 500)" in result.stdout


def _rows(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def test_json_summary_gives_the_run_in_numbers(tmp_path):
    out, summary = tmp_path / "r.tsv", tmp_path / "summary.json"
    args = ["certify", "--sigma", "0.5", "--steps", "1", "--votes", "1", "--n0", "5", "--skip", "30", "--quiet",
            "--radius", "0.1", "--n-max", "40", "--out", str(out), "--json-summary", str(summary)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(summary.read_text())
    rows = _rows(out)
    right = [r for r in rows if r["predict"] == r["label"]]
    assert data["images"] == len(rows) == 12 and data["labelled"] == 12
    assert data["radii"] == [0.0, 0.1]
    assert data["certified_accuracy"][0] == pytest.approx(len(right) / 12)
    assert data["certified_accuracy"][1] == pytest.approx(sum(float(r["radius"]) >= 0.1 for r in right) / 12)
    low, high = proportion_confint(len(right), 12, alpha=0.05, method="beta")
    assert data["intervals"][0] == pytest.approx([low, high])
    assert data["unet_evals"] == sum(int(r["unet_evals"]) for r in rows)
    assert data["settings"]["mode"] == "certify-radii" and data["settings"]["n"] == 40
    assert data["wall_seconds"] > 0
    # Where the radii hold: the bundled digits' 16 x 16 grey pixels in [0, 1] (its data's shape).
    from densepure_rt.files.data import digits_test_split

    shape = list(digits_test_split()[0].image.shape)
    assert shape == [1, 16, 16]
    for space in (json.loads(Path(f"{out}.json").read_text())["image_space"], data["settings"]["image_space"]):
        assert space["size"] == shape and space["range"] == [0.0, 1.0] and "before any classifier" in space["noise"]
    shown = CliRunner().invoke(main, ["report", str(out)])
    assert shown.exit_code == 0 and "radii in [0, 1] pixels at 1 x 16 x 16" in shown.output
    # Run again: the results are continued (nothing to do) and the summary, its own, is replaced.
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert json.loads(summary.read_text())["unet_evals"] == data["unet_evals"]


def test_json_summary_never_replaces_a_file_it_did_not_write(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text('{"mine": 1}\n')
    result = CliRunner().invoke(main, ["predict", "--sigma", "0.5", "--n", "10", "--out", str(tmp_path / "p.tsv"),
                                       "--json-summary", str(mine)])
    assert result.exit_code == 2
    assert "is not a densepure-rt summary" in result.stderr
    assert mine.read_text() == '{"mine": 1}\n' and not (tmp_path / "p.tsv").exists()


@pytest.mark.slow
def test_the_summary_line_and_json_count_this_runs_work(tmp_path):
    out, summary = tmp_path / "r.tsv", tmp_path / "s.json"
    args = ["certify", "--sigma", "0.5", "--steps", "2", "--votes", "10", "--n0", "20", "--radius", "0.25", "--n-max", "200",
            "--skip", "60", "--quiet", "--out", str(out), "--json-summary", str(summary)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    evals = sum(int(r["unet_evals"]) for r in rows)
    this_run = json.loads(summary.read_text())["this_run"]
    assert this_run["images_written"] == len(rows) == 6 and this_run["unet_evals"] == evals
    assert 0 <= this_run["dropped_unet_evals"] <= 0.02 * evals  # samples started and never read: a few percent at most
    assert f"{evals:,} UNet evaluations for 6 images, {this_run['dropped_unet_evals']:,}" in result.stdout
    again = CliRunner().invoke(main, args)  # nothing left to compute
    assert json.loads(summary.read_text())["this_run"] == {"images_written": 0, "unet_evals": 0, "dropped_unet_evals": 0}
    assert "UNet evaluations for" not in again.stdout


def test_api_results_carry_their_settings_and_have_to_dict():
    from densepure_rt import open_engine
    from densepure_rt.files.data import digits_test_split
    from densepure_rt.files.manifest import BUNDLED_ENGINE
    from densepure_rt.stats.cohen import certify

    sample = digits_test_split()[3]
    with open_engine(BUNDLED_ENGINE) as engine:
        cert, counts = engine.certify_counts(sample.image, 0.5, 1, 1, 5, 20, 0.001, seed=7, image_index=sample.index)
        radii = engine.certify_radii(sample.image, 0.5, [0.1], steps=1, votes=1, n0=5, n_max=40, image_index=sample.index)
        prediction = engine.predict(sample.image, 0.5, steps=1, votes=1, n=20, image_index=sample.index)
        with pytest.raises(TypeError, match="image_index"):  # two images with one index would share their noise
            engine.certify(sample.image, 0.5, steps=1, votes=1, n0=5, n=20)
    # The certificate is CERTIFY of its own counts (recomputed here), and carries what made it.
    assert cert == certify(counts.counts0, counts.counts, 0.5, 0.001)
    data = json.loads(json.dumps(cert.to_dict()))
    assert data["radius"] == cert.radius and data["n_a"] == cert.n_a
    assert {k: data["settings"][k] for k in ("sigma", "steps", "votes", "n0", "n", "alpha", "seed", "image_index")} == {
        "sigma": 0.5, "steps": "1", "votes": 1, "n0": 5, "n": 20, "alpha": 0.001, "seed": 7, "image_index": sample.index}
    assert data["settings"]["engine"] == str(BUNDLED_ENGINE.resolve())
    assert radii.to_dict()["settings"]["n_max"] == 40 and radii.to_dict()["radii"] == [0.1]
    assert prediction.to_dict()["settings"]["n"] == 20
