"""Scale-out on Ray (densepure_rt.scale.ray, ``certify --ray``) on a local Ray cluster on the CPU.

One Ray cluster for the whole module (Ray's start-up is slow). The reference everywhere is the
single-process run with the same settings and ``--threads 1`` (each actor runs one ONNX Runtime
thread): a Ray run must write the same rows (all but the wall-time column), whatever actor computed
an image, after a killed actor and after a killed driver resumed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from click.testing import CliRunner

from densepure_rt.cli import main
from densepure_rt.files.data import DIGITS_TEST_ASSET, open_dataset
from densepure_rt.errors import EngineError
from densepure_rt.files.manifest import load_manifest, write_manifest
from densepure_rt.files.results import read_rows
from densepure_rt.runtime import open_engine
from densepure_rt.scale.ray import ENGINE_ENV, RayPool
from densepure_rt.scale.work import RunSpec, run_image

#: Ray's cluster start-up alone takes tens of seconds: the whole module is slow. Its tests run in
#: one test process (``--dist loadgroup``: one local cluster, not one per process) beside the other
#: process's tests, each on one thread (tests/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

NUM_IMAGES = 8
SETTINGS = ["--sigma", "0.5", "--steps", "2", "--votes", "3", "--batch", "16"]
CERTIFY = [*SETTINGS, "--n0", "10", "--n", "40"]
#: CERTIFY's settings for the tests that drive a RayPool themselves.
KILLED_TASK = RunSpec("certify", 0.5, "2", 3, n0=10, n=40, alpha=0.001, seed=0, batch=16)
TIME = "time"
#: The most seconds a CLI run that cannot reach Ray (--ray-timeout 2) may take: the process's own
#: start-up on a busy machine, and far below Ray's own retries (a log line every 40 s, for minutes).
GIVES_UP_WITHIN = 25.0


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def run_cli(*args, env=None, prefix=(), timeout=90):
    """The CLI in a process of its own (this one is connected to the module's cluster already):
    (exit code, lines on stderr, seconds). Killed, and the test failed, if it runs past ``timeout``."""
    command = [*prefix, sys.executable, "-m", "densepure_rt.cli", *(str(a) for a in args)]
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s (killed): {' '.join(command)}")
    return done.returncode, done.stderr.strip().splitlines(), time.monotonic() - started


def own_pid_namespace() -> list:
    """A command prefix that runs a process in a PID namespace of its own, where it sees none of
    this machine's Ray processes (``--ray auto`` looks for them); skips the test where unshare cannot."""
    for prefix in (["unshare", "--pid", "--fork", "--mount-proc"],
                   ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    pytest.skip("unshare cannot make a PID namespace here")


def assert_one_error_line(code: int, lines: list, seconds: float, out: Path, *says: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for words in says:
        assert words in lines[0], lines
    assert seconds < GIVES_UP_WITHIN, f"took {seconds:.1f} s"
    assert not out.exists() and not Path(f"{out}.json").exists()


def rows_without_time(path: Path) -> dict[int, tuple]:
    header, rows = read_rows(path)
    keyed = {}
    for row in rows:
        assert row["idx"] not in keyed, f"image {row['idx']} written twice in {path}"
        keyed[row["idx"]] = tuple((k, v) for k, v in row.items() if k != TIME)
    return keyed


# ------------------------------------------------------------------------------------------------ #
# fixtures                                                                                           #
# ------------------------------------------------------------------------------------------------ #


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray")


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    from conftest import build_digits_engine

    return build_digits_engine(tmp_path_factory, "ray-engine")


@pytest.fixture(scope="module")
def images(work) -> Path:
    path = work / "images.npz"
    digits = np.load(DIGITS_TEST_ASSET)
    np.savez(path, images=digits["images"][:NUM_IMAGES], labels=digits["labels"][:NUM_IMAGES])
    return path


@pytest.fixture(scope="module")
def cluster():
    """A local two-CPU Ray cluster; yields its address for drivers in other processes."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="error")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(work, engine, images) -> dict:
    """Single-process runs (``--threads 1``) of each mode: the rows every Ray run must equal."""
    runs = {}
    for name, args in (
        ("certify", ["certify", *CERTIFY]),
        ("radius", ["certify", *SETTINGS, "--n0", "10", "--radius", "0.25", "--n-max", "64"]),
        ("predict", ["predict", *SETTINGS, "--n", "30"]),
    ):
        out = work / f"single_{name}.tsv"
        result = invoke(*args, "--engine", engine, "--data", images, "--threads", "1", "--quiet", "--out", out)
        assert result.exit_code == 0, result.output
        runs[name] = (args, rows_without_time(out))
    return runs


# ------------------------------------------------------------------------------------------------ #
# tests                                                                                              #
# ------------------------------------------------------------------------------------------------ #


@pytest.mark.parametrize("mode", ["certify", "radius", "predict"])
def test_ray_rows_equal_single_process(mode, work, engine, images, cluster, reference):
    args, expected = reference[mode]
    out = work / f"ray_{mode}.tsv"
    result = invoke(*args, "--engine", engine, "--data", images, "--ray", cluster, "--actors", "2", "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    assert "2 Ray actors" in result.stderr
    got = rows_without_time(out)
    assert sorted(got) == list(range(NUM_IMAGES))
    if mode == "radius":
        # The scheduler drops the samples started past a sequential test's stop and counts their work:
        # how many depends on what else was in flight (other images in one process; one actor's own).
        got, expected = _without_work(got), _without_work(expected)
    assert got == expected
    options = json.loads(Path(f"{out}.json").read_text())
    assert options["ray"] == cluster and options["precision"] == "fp32"


def test_ray_groups_of_images_per_call_equal_single_process(work, engine, images, cluster, reference):
    """--images-per-call 3 with --ray: each actor certifies 3 images at a time in shared batches
    (8 images: 2 groups of 3 and one of 2); the rows equal one image at a time in one process."""
    args, expected = reference["certify"]
    out = work / "ray_groups.tsv"
    result = invoke(*args, "--engine", engine, "--data", images, "--ray", cluster, "--actors", "2", "--images-per-call", "3",
                    "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    assert rows_without_time(out) == expected


def _without_work(rows):
    return {k: tuple(c for c in v if c[0] != "unet_evals") for k, v in rows.items()}


def test_ray_actors_stream_several_images_with_the_scheduler(work, engine, images, cluster, reference):
    """--images-per-call 3 with --ray and --radius: each actor streams 3 images through one
    scheduler run (several in flight); every row equals the single-process run's but the work
    (samples started past a test's stop are dropped, and how many depends on what else was in
    flight)."""
    args, expected = reference["radius"]
    out = work / "ray_stream.tsv"
    result = invoke(*args, "--engine", engine, "--data", images, "--ray", cluster, "--actors", "2", "--images-per-call", "3",
                    "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    assert _without_work(rows_without_time(out)) == _without_work(expected)


@pytest.fixture(scope="module")
def alone(engine, images) -> dict:
    """Each image's fixed-n outcome computed in this process (``--threads 1``), by index: what every
    image computed on Ray, by whichever actor, must equal."""
    manifest = load_manifest(engine)
    shape = manifest["image_shape"]
    dataset = open_dataset(images, image_size=shape[1], channels=shape[0])
    with open_engine(engine, threads=1) as local:
        return {i: run_image(local, KILLED_TASK, dataset[i].image, i) for i in range(NUM_IMAGES)}



@pytest.mark.parametrize("group", [1, 3])
def test_killed_actors_lose_only_their_images(group, engine, images, cluster, reference, alone):
    """SIGKILL one actor after the first image and the other after the third (one image, or groups
    of 3, per call): every image comes back exactly once, equal to the single-process outcome,
    computed by replacement actors."""
    manifest = load_manifest(engine)
    shape = manifest["image_shape"]
    dataset = open_dataset(images, image_size=shape[1], channels=shape[0])
    task = KILLED_TASK
    lines: list[str] = []
    outcomes = []
    drawn: list[int] = []
    with RayPool(str(engine), manifest["manifest_sha256"], actors=2, poll=0.05, log=lines.append) as pool:
        assert pool.live == 2
        first_pids = [info["pid"] for info in pool.info]
        for outcome in pool.map(task, range(NUM_IMAGES), lambda i: dataset[i].image, group=group, progress=drawn.append):
            outcomes.append(outcome)
            if len(outcomes) in (1, 3):
                os.kill(pool.info[len(outcomes) // 3]["pid"], signal.SIGKILL)
        assert pool.replaced == 2
        assert not set(first_pids) & {info["pid"] for info in pool.info}
    assert sum("died" in line for line in lines) == 2, lines
    # The progress reported adds up to every sample exactly once (a dead actor's counted samples
    # are taken back before they are drawn again).
    assert sum(drawn) == NUM_IMAGES * (10 + 40)
    assert sorted(o.idx for o in outcomes) == list(range(NUM_IMAGES))
    for o in outcomes:
        assert o.result == alone[o.idx].result and o.unet_evals == alone[o.idx].unet_evals
        np.testing.assert_array_equal(o.counts, alone[o.idx].counts)
    # ... and the same certificates as the CLI's single-process rows.
    _, expected = reference["certify"]
    for o in outcomes:
        row = dict(expected[o.idx])
        assert (o.result.prediction, o.result.n_a, o.result.c_a) == (row["predict"], row["n_a"], row["c_a"])


def test_progress_moves_within_an_image(engine, images, cluster):
    """Busy actors are asked for their drawn samples every `poll` seconds: the progress callback
    moves in steps of a batch (16 samples) while an image is certified, and sums to all samples."""
    manifest = load_manifest(engine)
    shape = manifest["image_shape"]
    dataset = open_dataset(images, image_size=shape[1], channels=shape[0])
    task = RunSpec("certify", 0.5, "2", 3, n0=10, n=400, alpha=0.001, seed=0, batch=16)
    drawn: list[int] = []
    with RayPool(str(engine), manifest["manifest_sha256"], actors=1, poll=0.05) as pool:
        outcomes = list(pool.map(task, [0, 1], lambda i: dataset[i].image, progress=drawn.append))
    assert [o.idx for o in outcomes] == [0, 1]
    assert sum(drawn) == 2 * 410
    assert len(drawn) > 2 and min(drawn) > 0 and any(k % 16 == 0 and k < 410 for k in drawn), drawn


def test_killed_driver_resumes_without_duplicates(work, engine, images, cluster, reference):
    """SIGKILL the driver (a separate process) once rows are flowing; --resume completes the file
    with exactly the missing images, equal to the single-process run."""
    args, expected = reference["certify"]
    out = work / "killed.tsv"
    command = [sys.executable, "-m", "densepure_rt.cli", *args, "--engine", str(engine), "--data", str(images),
               "--ray", cluster, "--actors", "2", "--quiet", "--out", str(out)]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    written = 0
    while time.time() < deadline and driver.poll() is None:
        if out.is_file():
            written = max(0, len(out.read_text().splitlines()) - 1)
            if written >= 2:
                break
        time.sleep(0.02)
    assert driver.poll() is None, f"the driver ended before it could be killed: {driver.stderr.read().decode()[-2000:]}"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    driver.stderr.close()
    before = rows_without_time(out)
    assert 2 <= len(before) < NUM_IMAGES
    result = invoke(*args, "--engine", engine, "--data", images, "--ray", cluster, "--actors", "2", "--quiet", "--resume",
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert f"{len(before)} images done, {NUM_IMAGES - len(before)} to go" in result.stderr
    assert rows_without_time(out) == expected


def test_an_actor_with_another_engine_is_refused(work, engine, cluster):
    """A node whose copy of the engine differs (here: DENSEPURE_RT_ENGINE points the actors at an
    engine with another manifest) is refused in one line that names the host, before any work."""
    other = work / "other_engine"
    if not other.exists():
        import shutil

        shutil.copytree(engine, other)
        manifest = json.loads((other / "manifest.json").read_text())
        manifest.pop("manifest_sha256", None)
        manifest["default_batch"] = 7
        write_manifest(other, manifest)
    manifest = load_manifest(engine)
    assert load_manifest(other)["manifest_sha256"] != manifest["manifest_sha256"]
    pool = RayPool(str(engine), manifest["manifest_sha256"], actors=1, runtime_env={"env_vars": {ENGINE_ENV: str(other)}})
    with pytest.raises(EngineError) as info:
        with pool:
            pass
    message = str(info.value)
    assert "\n" not in message
    assert "is not the driver's" in message and str(other) in message and "copy the same engine directory" in message


def test_ray_flags_are_checked_before_work(work, engine, images):
    out = work / "never.tsv"
    result = invoke("certify", *CERTIFY, "--engine", engine, "--data", images, "--actors", "2", "--out", out)
    assert result.exit_code != 0 and "--actors goes with --ray" in result.stderr
    assert not out.exists()


def test_gpu_actors_need_gpus_in_the_cluster(work, engine, images, cluster):
    """--device cuda places one actor per GPU (num_gpus=1): on this CPU-only cluster that is a
    one-line error before anything is written (the driver itself opens no CUDA session)."""
    out = work / "gpu.tsv"
    # In a process of its own, so that what Ray itself prints on stderr is seen too: only the error line.
    code, lines, _ = run_cli("certify", *CERTIFY, "--engine", engine, "--data", images, "--device", "cuda", "--ray", cluster,
                             "--out", out)
    assert code == 2 and len(lines) == 1 and "the Ray cluster has no GPUs" in lines[0], lines
    assert not out.exists()


def test_a_local_cluster_prints_nothing_but_the_error_line(engine, images, tmp_path):
    """Starting a cluster (--ray local) makes Ray log warnings (token authentication...): a failure
    is still the one error line on stderr, nothing before or after it."""
    out = tmp_path / "gpu.tsv"
    code, lines, _ = run_cli("certify", *CERTIFY, "--engine", engine, "--data", images, "--device", "cuda", "--ray", "local",
                             "--out", out)
    assert code == 2 and len(lines) == 1 and "the Ray cluster has no GPUs" in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("address, says", [
    ("127.0.0.1:1", ["nothing accepted a connection at 127.0.0.1:1 within 2 s", "ray start --head", "--ray local", "--ray-timeout"]),
    ("nonexistent.invalid:6379", ["the host nonexistent.invalid does not resolve", "ray start --head", "--ray local"]),
])
def test_unreachable_address_fails_fast_in_one_line(address, says, engine, images, tmp_path):
    """A port where nothing listens (tried until --ray-timeout), or a host that does not resolve (at
    once): one error line, exit status 2, nothing written; Ray alone would retry for many minutes."""
    out = tmp_path / "c.tsv"
    code, lines, seconds = run_cli("certify", *CERTIFY, "--engine", engine, "--data", images, "--ray", address,
                                   "--ray-timeout", "2", "--out", out)
    assert_one_error_line(code, lines, seconds, out, f"--ray {address}: ", *says)
    if address.startswith("127."):
        assert seconds >= 2, "gave up before --ray-timeout"


def test_a_port_without_ray_fails_fast_in_one_line(engine, images, tmp_path):
    """Something accepts connections at the address but is not Ray (the kernel completes the
    handshakes of this socket, nothing ever answers): ray.init is given up at --ray-timeout."""
    out = tmp_path / "c.tsv"
    with socket.create_server(("", 0)) as server:
        address = f"127.0.0.1:{server.getsockname()[1]}"
        code, lines, seconds = run_cli("certify", *CERTIFY, "--engine", engine, "--data", images, "--ray", address,
                                       "--ray-timeout", "2", "--out", out)
    assert_one_error_line(code, lines, seconds, out, f"--ray {address}: no Ray cluster answered within 2 s", "--ray-timeout")


@pytest.mark.parametrize("stale", [False, True], ids=["no-cluster", "stale-address"])
def test_auto_without_a_cluster_fails_fast_in_one_line(stale, engine, images, tmp_path):
    """--ray auto where no Ray runs (a PID namespace of its own, an empty Ray temp directory): one
    line at once; where the last `ray start` left the address of a cluster since killed: one line
    after --ray-timeout."""
    out = tmp_path / "c.tsv"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(tmp_path)
    if stale:
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
    code, lines, seconds = run_cli("certify", *CERTIFY, "--engine", engine, "--data", images, "--ray", "auto",
                                   "--ray-timeout", "2", "--out", out, env=env, prefix=own_pid_namespace())
    if stale:
        assert_one_error_line(code, lines, seconds, out, "--ray auto: nothing accepted a connection at", ":1 within 2 s")
    else:
        assert_one_error_line(code, lines, seconds, out, "--ray auto: no Ray cluster runs on this machine", "ray start --head")


def test_more_actors_than_fit_start_those_that_fit(work, engine, images, cluster, reference):
    """--actors 3 on the two-CPU cluster (one CPU per actor): one line says at once that 2 fit, 2
    start, and the rows equal the single process's (Ray alone would wait for the third)."""
    args, expected = reference["certify"]
    out = work / "ray_three.tsv"
    started = time.monotonic()
    result = invoke(*args, "--engine", engine, "--data", images, "--ray", cluster, "--actors", "3", "--quiet", "--out", out)
    seconds = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert "--actors 3: the Ray cluster (2 CPUs) has room for 2 actors of 1 CPU; starting 2" in result.stderr
    # It never waits for a third actor; a slow start of the two may print "k of 2 ready" lines.
    assert "2 Ray actors" in result.stderr and "of 3 ready" not in result.stderr
    assert rows_without_time(out) == expected
    assert seconds < 300, f"took {seconds:.0f} s"


def test_an_actor_larger_than_every_node_is_refused(engine, images, cluster, tmp_path):
    """--threads 3: each actor needs 3 CPUs, the cluster's one node has 2: one error line at once
    that names both (Ray alone would wait for the actor for --start-timeout, 600 s)."""
    out = tmp_path / "c.tsv"
    started = time.monotonic()
    result = invoke("certify", *CERTIFY, "--engine", engine, "--data", images, "--ray", cluster, "--threads", "3", "--out", out)
    lines = result.stderr.strip().splitlines()
    assert_one_error_line(result.exit_code, lines, time.monotonic() - started, out, "one actor needs 3 CPUs", "(2 CPUs in all)")


def test_waiting_for_actors_reports_progress(engine, cluster):
    """Other work holds both CPUs of the cluster for 3 s: the pool says so at once, then a line
    every report_every seconds ("waiting for Ray actors: 0 of 1 ready"), and starts its actor when
    the CPUs are free."""

    @ray.remote(num_cpus=2)
    class Holder:
        def ready(self):
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    release = threading.Timer(3.0, ray.kill, [holder])
    lines: list[str] = []
    manifest = load_manifest(engine)
    release.start()
    try:
        with RayPool(str(engine), manifest["manifest_sha256"], actors=1, report_every=1.0, log=lines.append) as pool:
            assert pool.live == 1
    finally:
        release.cancel()
        ray.kill(holder)
    assert lines[0].startswith("the Ray cluster has free resources for 0 of 1 actors now"), lines
    waits = [line for line in lines if line.startswith("waiting for Ray actors: 0 of 1 ready")]
    assert len(waits) >= 2 and len(waits) == len(lines) - 1, lines


def test_runtime_never_imports_ray():
    code = (
        "import sys, numpy as np\n"
        "from densepure_rt import cli, runtime, run\nfrom densepure_rt.scale import work\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_local_cluster_leaves_no_session_folders(work, engine, images, reference, cluster):  # noqa: ARG001
    """``--ray local`` starts a cluster of its own (in a separate process: this one is connected to
    the module's cluster) and removes its session folder when it ends: Ray's default keeps
    TMPDIR/ray/session_* (logs, sockets) for ever. TMPDIR is a short folder of the test's own
    (Ray's socket paths must stay under 107 bytes); the rows equal the single-process run."""
    import shutil
    import tempfile

    args, expected = reference["certify"]
    tmp = tempfile.mkdtemp(prefix="dprt", dir="/tmp")
    try:
        out = work / "ray_local.tsv"
        code, lines, _ = run_cli(*args, "--engine", engine, "--data", images, "--ray", "local", "--actors", "1", "--quiet",
                                 "--out", out, env={**os.environ, "TMPDIR": tmp}, timeout=300)
        assert code == 0, lines
        assert rows_without_time(out) == expected
        assert os.listdir(tmp) == [], [os.path.join(d, f) for d, ds, fs in os.walk(tmp) for f in ds + fs]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
