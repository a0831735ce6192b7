"""Refusals: no output ever replaces a file it does not own, and every refusal a user can meet is
one line.

The cases live in one table (:data:`CASES`): the command, what the test puts on disk first, the
one line expected on stderr, the exit status, and what must still be on disk afterwards; a case
fails on a file replaced, a traceback, a hang or a silent acceptance. The tests after the table:
every float option refuses NaN and infinities, report replaces only its own outputs, a full disk
leaves no truncated file, the command line's own behaviour (bare commands, SIGHUP), and the Python
API refuses what the command line refuses, naming its own parameters. Everything runs inside
pytest's temporary folders; nothing here deletes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click
import numpy as np
import pytest

from conftest import build_digits_engine, digits_test_images
from densepure_rt.cli import main

from conftest import invoke

_SCRIPT = Path(sys.executable).with_name("densepure-rt")
CLI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "densepure_rt.cli"]
#: Three digits (idx 0, 10, 20), one reverse step, one vote: about a second.
FAST = ["--sigma", "0.5", "--steps", "1", "--votes", "1", "--n0", "5", "--n", "20", "--skip", "10", "--max", "30", "--quiet"]




def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    return build_digits_engine(tmp_path_factory, "refusals")


@pytest.fixture(scope="module")
def results(engine, tmp_path_factory) -> Path:
    """A complete certify results file and its options, never written to by the cases."""
    out = tmp_path_factory.mktemp("results") / "r.tsv"
    result = invoke("certify", "--engine", engine, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    return out


# ------------------------------------------------------------------------------------------------ #
# the table                                                                                          #
# ------------------------------------------------------------------------------------------------ #


@dataclass
class Case:
    """``setup(where, engine, results)`` puts files in ``where`` and returns the command's arguments;
    the command must end with ``code`` and, for an error, exactly one stderr line holding
    ``needle``; ``kept`` names files (relative to ``where``) whose bytes must not change."""

    setup: Callable[[Path, Path, Path], list]
    needle: str
    code: int = 2
    kept: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    #: How docs/troubleshooting.md words it, where the line names a concrete file.
    doc: str | None = None


def _copy_results(where: Path, results: Path, name: str = "r.tsv") -> Path:
    out = where / name
    out.write_bytes(results.read_bytes())
    Path(f"{out}.json").write_bytes(Path(f"{results}.json").read_bytes())
    return out


def _precious(where: Path, name: str, data: bytes = b"my own notes\n") -> Path:
    path = where / name
    path.write_bytes(data)
    return path


def _link(where: Path, name: str, target: str) -> Path:
    os.symlink(target, where / name)
    return where / name


def _npz(where: Path, name: str = "d.npz", count: int = 3) -> Path:
    images = digits_test_images(count)
    np.savez(where / name, images=images, labels=np.arange(count))
    return where / name


def _report_json_is_results(w, e, r):
    return ["report", _copy_results(w, r), "--json", w / "r.tsv"]


def _report_json_is_options(w, e, r):
    return ["report", _copy_results(w, r), "--json", w / "r.tsv.json"]


def _report_json_through_link(w, e, r):
    _precious(w, "notes.txt")
    _link(w, "table.json", "notes.txt")
    return ["report", _copy_results(w, r), "--json", w / "table.json"]


def _report_json_hard_link_of_results(w, e, r):
    out = _copy_results(w, r)
    os.link(out, w / "table.json")
    return ["report", out, "--json", w / "table.json"]


def _report_json_foreign(w, e, r):
    _precious(w, "table.json", b'{"mine": true}\n')
    return ["report", _copy_results(w, r), "--json", w / "table.json"]


def _report_plot_through_link(w, e, r):
    _precious(w, "notes.txt")
    _link(w, "curve.png", "notes.txt")
    return ["report", _copy_results(w, r), "--plot", w / "curve.png"]


def _report_plot_foreign(w, e, r):
    _precious(w, "curve.png", b"\x89PNG\r\n\x1a\n someone else's picture")
    return ["report", _copy_results(w, r), "--plot", w / "curve.png"]


def _report_json_stdout(w, e, r):
    return ["report", _copy_results(w, r), "--json", "-"]


def _report_json_unwritable(w, e, r):
    return ["report", _copy_results(w, r), "--json", "/proc/densepure-table.json"]


def _report_radii_empty(w, e, r):
    return ["report", _copy_results(w, r), "--radii", "0.5,,1"]


def _certify_foreign_options(w, e, r):
    _precious(w, "run.json", b'{"my": "config"}\n')
    return ["certify", "--engine", e, *FAST, "--out", w / "run"]


def _certify_options_link(w, e, r):
    _precious(w, "notes.txt")
    _link(w, "run.tsv.json", "notes.txt")
    return ["certify", "--engine", e, *FAST, "--out", w / "run.tsv"]


def _certify_out_stdout(w, e, r):
    return ["certify", "--engine", e, *FAST, "--out", "-"]


def _certify_out_named_like_data(w, e, r):
    return ["certify", "--engine", e, *FAST, "--out", w / "results.npz"]


def _certify_out_is_data(w, e, r):
    data = _npz(w)
    os.link(data, w / "d.tsv")
    return ["certify", "--engine", e, *FAST, "--data", data, "--out", w / "d.tsv"]


def _certify_out_inside_data_folder(w, e, r):
    from PIL import Image

    (w / "imgs" / "3").mkdir(parents=True)
    for i, image in enumerate(digits_test_images(2)):
        Image.fromarray((image[0] * 255).astype(np.uint8)).save(w / "imgs" / "3" / f"{i}.png")
    return ["certify", "--engine", e, *FAST, "--data", w / "imgs", "--out", w / "imgs" / "r.tsv"]


def _certify_huge_sigma_without_purification(w, e, r):
    return ["certify", "--engine", e, "--sigma", "1e39", "--steps", "none", "--votes", "1", "--n0", "5", "--n", "20",
            "--max", "30", "--skip", "10", "--quiet", "--out", w / "s.tsv"]


def _certify_progress_nan(w, e, r):
    return ["certify", "--engine", e, *FAST, "--progress-every", "nan", "--out", w / "p.tsv"]


def _certify_ray_timeout_nan(w, e, r):
    return ["certify", "--engine", e, *FAST, "--ray", "local", "--ray-timeout", "nan", "--out", w / "p.tsv"]


def _certify_tol_inf(w, e, r):
    return ["certify", "--engine", e, *FAST[:-7], "--tol", "inf", "--out", w / "p.tsv"]


def _certify_two_labels_files(w, e, r):
    from PIL import Image

    (w / "imgs").mkdir()
    for i, image in enumerate(digits_test_images(2)):
        Image.fromarray((image[0] * 255).astype(np.uint8)).save(w / "imgs" / f"{i}.png")
    (w / "imgs" / "labels.csv").write_text("0.png,7\n1.png,2\n")
    (w / "imgs" / "labels.txt").write_text("0.png 1\n1.png 3\n")
    return ["certify", "--engine", e, *FAST, "--data", w / "imgs", "--out", w / "r.tsv"]


CASES: dict[str, Case] = {
    # Outputs never replace an input, never follow a link, never replace a file densepure-rt did not write.
    "report --json onto the results file it reads": Case(_report_json_is_results, "is the results file", kept=("r.tsv", "r.tsv.json")),
    "report --json onto the options file": Case(_report_json_is_options, "is the options file of", kept=("r.tsv", "r.tsv.json")),
    "report --json through a symbolic link": Case(_report_json_through_link, "is a symbolic link", kept=("notes.txt",)),
    "report --json onto a hard link of the results": Case(_report_json_hard_link_of_results, "is the results file", kept=("r.tsv",)),
    "report --json onto a foreign JSON": Case(_report_json_foreign, "is not a densepure-rt report JSON", kept=("table.json",)),
    "report --plot through a symbolic link": Case(_report_plot_through_link, "is a symbolic link", kept=("notes.txt",)),
    "report --plot onto a foreign image": Case(_report_plot_foreign, "is not a densepure-rt report plot", kept=("curve.png",)),
    "report --json to standard output": Case(_report_json_stdout, "not standard output"),
    "report --json into a folder that takes no file": Case(_report_json_unwritable, "cannot create a file in /proc",
                                                                doc="cannot create a file in FOLDER"),
    "report --radii with an empty entry": Case(_report_radii_empty, "none left empty"),
    "certify whose options name is a foreign file": Case(_certify_foreign_options, "is not a densepure-rt options file",
                                                           kept=("run.json",), absent=("run",)),
    "certify whose options name is a link": Case(_certify_options_link, "is not a densepure-rt options file",
                                                 kept=("notes.txt",), absent=("run.tsv",)),
    "certify --out to standard output": Case(_certify_out_stdout, "not standard output"),
    "certify --out named like a data file": Case(_certify_out_named_like_data, "named like a data", absent=("results.npz",)),
    "certify --out onto the --data file": Case(_certify_out_is_data, "is the --data file", kept=("d.npz",)),
    "certify --out inside the --data folder": Case(_certify_out_inside_data_folder, "inside the --data folder",
                                                   absent=("imgs/r.tsv",)),
    # Inputs that mislead.
    "certify --steps none --sigma 1e39": Case(_certify_huge_sigma_without_purification, "beyond the largest float32",
                                              absent=("s.tsv",)),
    "certify --progress-every nan": Case(_certify_progress_nan, "'nan' is not a finite number", absent=("p.tsv",)),
    "certify --ray-timeout nan": Case(_certify_ray_timeout_nan, "'nan' is not a finite number", absent=("p.tsv",)),
    "certify --data with both labels.csv and labels.txt": Case(_certify_two_labels_files, "holds both labels.csv and labels.txt",
                                                                absent=("r.tsv",)),
    "certify --tol inf": Case(_certify_tol_inf, "'inf' is not a finite number", absent=("p.tsv",),
                              doc="is not a finite number"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_refusal_is_one_line_and_leaves_every_file_as_it_was(name, engine, results, tmp_path):
    case = CASES[name]
    args = case.setup(tmp_path, engine, results)
    before = {kept: sha256(tmp_path / kept) for kept in case.kept}
    listing = sorted(os.listdir(tmp_path))
    result = invoke(*args)
    assert result.exit_code == case.code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and case.needle in lines[0], result.stderr
    for kept, digest in before.items():
        assert sha256(tmp_path / kept) == digest, f"{kept} was changed"
    for absent in case.absent:
        assert not os.path.lexists(tmp_path / absent), f"{absent} was created"
    assert sorted(os.listdir(tmp_path)) == listing, "a file was left behind"


def test_every_refusal_of_the_table_is_explained_in_the_troubleshooting_page():
    page = (Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    missing = [name for name, case in CASES.items() if (case.doc or case.needle) not in page]
    assert not missing, missing


# ------------------------------------------------------------------------------------------------ #
# every float option of every command refuses NaN and infinities                                     #
# ------------------------------------------------------------------------------------------------ #


def _float_options():
    for command in main.commands.values():
        for parameter in command.params:
            if isinstance(parameter, click.Option) and isinstance(parameter.type, (click.types.FloatParamType, click.FloatRange)):
                yield command.name, parameter.opts[0]


FLOAT_OPTIONS = sorted(_float_options())


def test_the_float_options_are_found_from_the_commands():
    # Read from click's own parameter objects, not listed by hand: a new float option joins the test below.
    assert {opt for _, opt in FLOAT_OPTIONS} >= {"--sigma", "--alpha", "--progress-every", "--ray-timeout", "--tol", "--radius"}


@pytest.mark.parametrize("command, option", FLOAT_OPTIONS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_option_refuses_nan_and_infinities(command, option, value, engine, tmp_path):
    fast = ["--steps", "1", "--votes", "1", "--n", "20", "--max", "0", "--quiet"]  # a second if a value got through
    args = {"certify": ["certify", "--engine", engine, "--sigma", "0.5", *fast, "--out", tmp_path / "x.tsv"],
            "predict": ["predict", "--engine", engine, "--sigma", "0.5", *fast, "--out", tmp_path / "x.tsv"]}[command]
    result = invoke(*args, option, value)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and "finite" in lines[0], result.stderr
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ #
# report: own outputs replaced, others only with --force; correct recomputed                         #
# ------------------------------------------------------------------------------------------------ #


def test_report_replaces_its_own_outputs_and_others_only_with_force(results, tmp_path):
    out = _copy_results(tmp_path, results)
    table, curve = tmp_path / "table.json", tmp_path / "curve.png"
    for _ in range(2):  # the second run replaces what the first wrote
        result = invoke("report", out, "--json", table, "--plot", curve)
        assert result.exit_code == 0, result.output
    assert json.loads(table.read_text())["files"][str(out)][0] == 1.0  # the 3 digits are right at radius 0
    foreign = _precious(tmp_path, "other.json", b'{"mine": true}\n')
    assert invoke("report", out, "--json", foreign).exit_code == 2
    result = invoke("report", out, "--json", foreign, "--force")
    assert result.exit_code == 0, result.output
    assert "radii" in json.loads(foreign.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png", "other.json", "r.tsv", "r.tsv.json", "table.json"]


def test_report_recomputes_correct_from_label_and_predict(results, tmp_path):
    out = _copy_results(tmp_path, results)
    lines = out.read_text().splitlines()
    header = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[1:]]
    at = {name: header.index(name) for name in ("label", "predict", "correct")}
    truth = [int(r[at["label"]]) >= 0 and r[at["predict"]] == r[at["label"]] for r in rows]
    assert sum(truth) == 3
    rows[0][at["correct"]] = "0"  # an edited column claims the first image wrong
    out.write_text("\n".join(["\t".join(header), *("\t".join(r) for r in rows)]) + "\n")
    result = invoke("report", out, "--json", tmp_path / "t.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "t.json").read_text())["files"][str(out)][0] == pytest.approx(sum(truth) / len(truth))
    assert "disagrees with label and predict in 1 row" in result.stdout


# ------------------------------------------------------------------------------------------------ #
# no truncated output on a full disk                                                                 #
# ------------------------------------------------------------------------------------------------ #


def _full_disk_after(monkeypatch, allowed: int):
    """os.write fails with ENOSPC once ``allowed`` bytes were written (what a full disk does)."""
    real, written = os.write, [0]

    def write(fd, data):
        if written[0] + len(data) > allowed:
            room = max(allowed - written[0], 0)
            if room:
                written[0] += real(fd, bytes(data[:room]))
                return room
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written[0] += len(data)
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_a_full_disk_leaves_the_old_report_file_and_no_temporary_file(results, tmp_path, monkeypatch):
    from densepure_rt.errors import DataError
    from densepure_rt.files.outputs import write_atomic

    table = tmp_path / "table.json"
    table.write_bytes(b'{"generator": "densepure-rt report", "old": 1}\n')
    before = sha256(table)

    def fill(handle):  # a buffered writer: the bytes reach os.write at flush, where the disk is full
        handle.write(b"x" * 100_000)

    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(DataError, match="nothing was written"):
        write_atomic(table, fill)
    assert sha256(table) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.json"]


def test_a_full_disk_mid_row_leaves_only_complete_rows(results, tmp_path, monkeypatch):
    from densepure_rt.errors import DataError
    from densepure_rt.files.results import HEADER, ResultsWriter
    from densepure_rt.stats.cohen import certify

    out = tmp_path / "r.tsv"
    counts = np.zeros(10, dtype=np.int64)
    counts[3] = 20
    cert = certify(counts, counts, 0.5, 0.001)
    with ResultsWriter(out, header=HEADER) as writer:
        writer.open({"mode": "certify", "sigma": 0.5, "seed": 0}, allowed=range(10))
        writer.write_certificate(0, 3, cert, counts, 1.0, 20)
        complete = out.read_bytes()
        _full_disk_after(monkeypatch, 10)  # 10 bytes of the next row fit
        with pytest.raises(DataError, match="cannot write"):
            writer.write_certificate(1, 3, cert, counts, 1.0, 20)
    assert out.read_bytes() == complete


# ------------------------------------------------------------------------------------------------ #
# the command line's own behaviour                                                                   #
# ------------------------------------------------------------------------------------------------ #


@pytest.mark.parametrize("argv", [[], ["certify"], ["report"], ["build"], ["info"], ["predict"]])
def test_a_bare_command_prints_its_help_on_stdout_and_exits_0(argv):
    result = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: densepure-rt {' '.join(argv)}".rstrip() + " [OPTIONS]")
    assert result.stderr == ""


def test_nothing_is_printed_after_the_error_line(tmp_path):
    # A library's atexit chatter (Ray's cluster shutdown, torch's warnings) stands in as a handler
    # that prints at interpreter exit; the error line must stay the last line on stderr.
    program = ("import atexit, sys\n"
               "atexit.register(lambda: print('chatter at exit', file=sys.stderr))\n"
               "from densepure_rt.cli import main\n"
               f"main(['certify', '--engine', {str(tmp_path / 'missing')!r}, '--sigma', '0.5'])\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr
    assert "chatter" not in result.stderr


@pytest.mark.slow
def test_sighup_keeps_complete_rows_and_releases_the_lock(engine, tmp_path):
    out = tmp_path / "r.tsv"
    args = [*CLI, "certify", "--engine", str(engine), "--sigma", "0.5", "--steps", "2", "--votes", "3", "--n0", "10",
            "--n", "40", "--skip", "5", "--max", "100", "--quiet", "--out", str(out)]
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.1)
    run.send_signal(signal.SIGHUP)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGHUP, stderr
    assert stderr.strip().splitlines()[-1].startswith("terminated (SIGHUP): rows written so far are kept")
    assert not Path(f"{out}.lock").exists()
    kept = out.read_text()
    assert kept.endswith("\n") and len(kept.splitlines()) >= 3
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)  # resumes to the end
    assert result.returncode == 0, result.stderr
    assert out.read_text().startswith(kept) and len(out.read_text().splitlines()) == 1 + 20


def test_images_per_call_beyond_the_images_is_all_of_them(engine, results, tmp_path):
    out = tmp_path / "r.tsv"
    result = invoke("certify", "--engine", engine, *FAST, "--images-per-call", 10**9, "--out", out)
    assert result.exit_code == 0, result.output
    strip = lambda text: [line.split("\t")[:5] + line.split("\t")[6:] for line in text.splitlines()]  # noqa: E731
    assert strip(out.read_text()) == strip(results.read_text())


# ------------------------------------------------------------------------------------------------ #
# the Python API refuses the same things, naming its own parameters                                  #
# ------------------------------------------------------------------------------------------------ #


API_CASES = {
    "seed=1.5": (dict(seed=1.5), "ConfigError", "seed must be an integer"),
    "seed=-1": (dict(seed=-1), "ConfigError", "seed must be an integer"),
    "seed=True": (dict(seed=True), "ConfigError", "seed must be an integer"),
    "image_index=-2": (dict(image_index=-2), "ConfigError", "image_index must be an integer"),
    "complex image": (dict(image="complex"), "ConfigError", "complex64 values"),
    "boolean image": (dict(image="bool"), "ConfigError", "bool values"),
    "sigma=-1": (dict(sigma=-1.0), "ConfigError", "sigma must be > 0"),
    "alpha=2": (dict(alpha=2.0), "ConfigError", "alpha must be in (0, 1)"),
    "votes=0": (dict(votes=0), "ConfigError", "votes must be an integer >= 1"),
    "n0=0": (dict(n0=0), "ConfigError", "n0 must be >= 1"),
}


@pytest.fixture(scope="module")
def api_engine(engine):
    from densepure_rt import open_engine

    with open_engine(engine) as opened:
        yield opened


@pytest.mark.parametrize("name", list(API_CASES))
def test_the_api_refuses_with_a_config_error_naming_its_parameter(name, api_engine):
    import densepure_rt.errors as errors

    changes, kind, needle = API_CASES[name]
    image = digits_test_images(1)[0]
    image = {"complex": image.astype(np.complex64), "bool": image > 0.5}.get(changes.pop("image", None), image)
    call = dict(sigma=0.5, steps=1, votes=1, n0=5, n=10, image_index=0) | changes
    with pytest.raises(getattr(errors, kind)) as caught:
        api_engine.certify(image, **call)
    message = str(caught.value)
    assert needle in message and "--" not in message, message


def test_the_command_line_names_the_flags_of_the_same_errors(engine, tmp_path):
    result = invoke("certify", "--engine", engine, *FAST[:8], "--n0", "0", "--out", tmp_path / "x.tsv")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --n0 must be >= 1 (got 0)"


def test_threads_zero_and_a_closed_engine_are_refused(engine):
    from densepure_rt import open_engine
    from densepure_rt.errors import ConfigError, EngineError

    with pytest.raises(ConfigError, match="threads must be an integer >= 1"):
        open_engine(engine, threads=0)
    opened = open_engine(engine)
    opened.close()
    image = digits_test_images(1)[0]
    with pytest.raises(EngineError, match="is closed"):
        opened.certify(image, 0.5, steps=1, votes=1, n0=5, n=10, image_index=0)
    with pytest.raises(EngineError, match="is closed"):
        opened.stream("certify", iter([(0, image)]), lambda s: None, sigma=0.5, steps=1, votes=1, n0=5, n=10)


def test_the_threads_variable_sets_the_sessions_threads_and_a_bad_value_is_refused(engine, monkeypatch):
    from densepure_rt import open_engine
    from densepure_rt.errors import ConfigError

    def intra_op(**kwargs):
        with open_engine(engine, **kwargs) as opened:
            return opened.loop.executor._step.get_session_options().intra_op_num_threads

    monkeypatch.setenv("DENSEPURE_RT_THREADS", "1")
    assert intra_op() == 1
    assert intra_op(threads=2) == 2  # an explicit count wins
    monkeypatch.delenv("DENSEPURE_RT_THREADS")
    assert intra_op() == 0  # ONNX Runtime's own choice (0: every core)
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("DENSEPURE_RT_THREADS", bad)
        with pytest.raises(ConfigError, match=f"DENSEPURE_RT_THREADS='{bad}' is not a thread count"):
            open_engine(engine)
    result = invoke("certify", "--engine", engine, *FAST, "--out", engine.parent / "never.tsv")
    assert result.exit_code == 2 and result.stderr.startswith("error: DENSEPURE_RT_THREADS='-1' is not a thread count")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (engine.parent / "never.tsv").exists()


def test_too_many_images_in_flight_is_a_config_error(api_engine):
    from densepure_rt.errors import ConfigError

    image = digits_test_images(1)[0]
    with pytest.raises(ConfigError, match=r"in_flight=\d+ images in flight take .* GiB of staging"):
        api_engine.stream("certify", iter([(0, image)]), lambda s: None, sigma=0.5, steps=1, votes=1, n0=5, n=10,
                          in_flight=10**12)


def test_sigma_limit_is_where_float32_overflows():
    from densepure_rt.schedule import MAX_FINITE_SIGMA

    # The largest Box-Muller normal from 32-bit uniforms, sqrt(-2 ln 2^-32), worked out here.
    z_max = math.sqrt(64 * math.log(2))
    with np.errstate(over="ignore"):
        assert np.isfinite(np.float32(2 * (1 + z_max * MAX_FINITE_SIGMA) - 1))
        assert not np.isfinite(np.float32(2 * (1 + z_max * 4 * MAX_FINITE_SIGMA) - 1))
