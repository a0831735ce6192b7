"""The sampling path (the scheduler over the loop: numpy + ONNX Runtime IOBinding on the CPU; CuPy +
the CUDA provider on a GPU).

The reference is the plain step-by-step oracle (:class:`oracle.StepByStep` in this folder,
``open_reference(...)``): whole-array noise from :func:`densepure_rt.sampling.noise.sample_noise`,
``session.run`` per step, the vote in numpy. On the shipped digits engine (trained weights, sigma
0.6, where votes split) the engine must give the oracle's counts and work, with calls that mix
images and phases, and the oracle's rows through the Python API and the CLI, in every mode
(:func:`test_the_engine_equals_the_step_by_step_oracle`: the one comparison with the oracle).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import build_digits_engine, gpu_cupy, run_label_agreement, sample_counts
from densepure_rt.cli import main
from densepure_rt.files.data import DIGITS_TEST_ASSET
from densepure_rt.sampling.device import HostNoise
from densepure_rt.sampling.noise import ESTIMATION, PREDICTION, sample_noise
from densepure_rt.sampling.philox import draw_normals, row_normals
from densepure_rt.runtime import open_engine
from densepure_rt.spec import RunSpec
from oracle import open_reference

SIGMA, STEPS, VOTES = 0.6, 2, 3


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    return build_digits_engine(tmp_path_factory, "loop")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(DIGITS_TEST_ASSET)
    images = data["images"][:6].astype(np.float32)
    if images.ndim == 3:
        images = images[:, None]
    if images.max() > 1.5:
        images = images / 255.0
    return images, data["labels"][:6]


def test_row_normals_are_draw_normals_row_by_row():
    size = 37  # not a multiple of 4: the last block is cut
    images, phases, samples, draws = [5, 5, 7, 0], [1, 1, 0, 2], [2, 9, 4, 4], [0, 3, 1, 12]
    got = row_normals(3, images, phases, samples, draws, size)
    for r in range(4):
        want = draw_normals(3, images[r], phases[r], [samples[r]], [draws[r]], size)[0, 0]
        np.testing.assert_array_equal(got[r], want)
    scaled = row_normals(3, images, phases, samples, draws, size, scale=0.6)
    np.testing.assert_array_equal(scaled, got * np.float32(0.6))


def test_host_noise_fills_the_sample_noise_layout():
    """The loop's per-row fills give exactly :func:`sample_noise`'s delta and z (run k of sample b)."""
    shape, calls, votes, samples = (1, 4, 4), 3, 2, [6, 1, 11]
    delta, z = sample_noise(4, 9, ESTIMATION, samples, votes, calls, shape, SIGMA)
    noise = HostNoise()
    n = len(samples)
    key = lambda v: np.full(n, v, dtype=np.uint32)  # noqa: E731
    got = np.empty((n, *shape), dtype=np.float32)
    noise.fill(got, 4, key(9), key(ESTIMATION), np.array(samples, dtype=np.uint32), key(0), 0, SIGMA)
    np.testing.assert_array_equal(got, delta)
    rows = n * votes
    r_sample = np.repeat(np.array(samples, dtype=np.uint32), votes)
    r_draw = np.tile(1 + np.arange(votes, dtype=np.uint32) * calls, n)
    zr = np.empty((rows, *shape), dtype=np.float32)
    for s in range(calls):
        noise.fill(zr, 4, np.full(rows, 9, np.uint32), np.full(rows, ESTIMATION, np.uint32), r_sample, r_draw, s, 1.0)
        np.testing.assert_array_equal(zr, z[s])


@pytest.mark.slow
@pytest.mark.parametrize("early_exit", [True, False])
def test_the_engine_equals_the_step_by_step_oracle(engine, digits, tmp_path, early_exit):
    """Calls of 7 x 3 rows that mix six images and both phases (n0 = 5 is smaller than a call) give
    each image the counts, certificate and UNet evaluations of the oracle run one image and one
    phase at a time (early exit stops the same runs); PREDICT through the API equals the oracle's. With
    early exit (the default): the CLI's rows (fixed n, also with --images-per-call 3) equal the
    oracle's certificates, and the sequential modes (--radius, --tol; rounds of 1 and 6) make the
    oracle's decisions: c_a, samples read, votes for c_a, decisions or reason, radius."""
    images, labels = digits
    with open_reference(engine, early_exit=early_exit) as ref, open_engine(engine, early_exit=early_exit) as new:
        assert type(new.loop).__name__ == "BatchLoop" and type(ref.loop).__name__ == "StepByStep"
        got = []
        spec = RunSpec("certify", SIGMA, STEPS, VOTES, n0=5, n=23, alpha=0.01, seed=3, batch=7, images_per_call=6)
        new.stream(spec, [(10 + i, images[i]) for i in range(6)], got.append)
        assert sorted(s.idx for s in got) == list(range(10, 16))
        split = 0
        for s in got:
            cert, counts = s.result
            want_cert, want_counts = ref.certify_counts(images[s.idx - 10], SIGMA, STEPS, VOTES, 5, 23, 0.01, seed=3,
                                                        image_index=s.idx, batch=7)
            assert cert == want_cert
            np.testing.assert_array_equal(counts.counts0, want_counts.counts0)
            np.testing.assert_array_equal(counts.counts, want_counts.counts)
            # exact per image, though calls mix images: early exit stops the same runs
            assert counts.unet_evals == s.unet_evals == want_counts.unet_evals
            split += int(np.count_nonzero(want_counts.counts)) > 1
        assert split >= 2  # the votes split: the comparison is of real counts, not of constants
        assert new.predict(images[2], SIGMA, STEPS, VOTES, n=30, alpha=0.01, seed=1, image_index=2) == \
            ref.predict(images[2], SIGMA, STEPS, VOTES, n=30, alpha=0.01, seed=1, image_index=2)
        if not early_exit:
            return
        # n_max 100: image 1 certifies both radii at n = 30, image 0 one of them and image 2 none at n_max.
        common = dict(steps=STEPS, votes=VOTES, n0=30, n_max=100, alpha=0.01, seed=5)
        for round_size in (1, 6):
            for mode, extra in (("certify-radii", dict(radii=(0.25, 0.5))), ("certify-until", dict(tol=0.05))):
                streamed = []
                new.stream(RunSpec(mode, 0.5, STEPS, VOTES, n0=30, n=100, alpha=0.01, seed=5, round_size=round_size, **extra),
                           list(enumerate(images[:3])), streamed.append)
                for s in streamed:
                    got = s.result
                    if mode == "certify-radii":
                        want = ref.certify_radii(images[s.idx], 0.5, [0.25, 0.5], image_index=s.idx, round_size=round_size, **common)
                        assert (got.c_a, got.n, got.n_a, got.decisions, got.radius) == \
                            (want.c_a, want.n, want.n_a, want.decisions, want.radius)
                    else:
                        want = ref.certify_until(images[s.idx], 0.5, 0.05, image_index=s.idx, round_size=round_size, **common)
                        assert (got.c_a, got.n, got.n_a, got.reason, got.radius) == \
                            (want.c_a, want.n, want.n_a, want.reason, want.radius)
                    # The scheduler may start samples past a test's stop (dropped): never fewer evaluations.
                    assert got.unet_evals >= want.unet_evals
        k = 3  # and one image alone through the single-image call
        r_new = new.certify_radii(images[k], 0.5, [0.25, 0.5], image_index=k, round_size=6, **common)
        r_ref = ref.certify_radii(images[k], 0.5, [0.25, 0.5], image_index=k, round_size=6, **common)
        assert (r_new.c_a, r_new.n, r_new.n_a, r_new.decisions) == (r_ref.c_a, r_ref.n, r_ref.n_a, r_ref.decisions)

    data = tmp_path / "d.npz"
    np.savez(data, images=images[:4], labels=labels[:4])
    out = tmp_path / "r.tsv"
    args = ["certify", "--engine", str(engine), "--data", str(data), "--sigma", str(SIGMA), "--steps", str(STEPS),
            "--votes", str(VOTES), "--n0", "6", "--n", "25", "--alpha", "0.01", "--batch", "5", "--quiet", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    assert len(rows) == 4
    with open_reference(engine) as ref:
        for row in rows:
            i = int(row["idx"])
            cert, counts = ref.certify_counts(images[i], SIGMA, STEPS, VOTES, 6, 25, 0.01, seed=0, image_index=i, batch=5)
            assert int(row["predict"]) == cert.prediction
            assert float(row["radius"]) == pytest.approx(cert.radius, abs=1e-4)
            assert int(row["c_a"]) == int(np.argmax(counts.counts0))
            assert int(row["n_a"]) == int(counts.counts[int(row["c_a"])])
            assert int(row["unet_evals"]) == counts.unet_evals
    options = json.loads(Path(str(out) + ".json").read_text())
    assert options["votes"] == VOTES and options["early_exit"] is True  # the default
    # Three images in flight: the rows (work included) are the same.
    strip = lambda text: [line.split("\t")[:5] + line.split("\t")[6:] for line in text.splitlines()]  # noqa: E731
    grouped = tmp_path / "g.tsv"
    result = CliRunner().invoke(main, args[:-1] + [str(grouped), "--images-per-call", "3"])
    assert result.exit_code == 0, result.output
    assert sorted(strip(grouped.read_text())) == sorted(strip(out.read_text()))


# --------------------------------------------------------------------------------------------------
# GPU only (marker gpu): skipped without CuPy, a CUDA device or onnxruntime-gpu


def _cupy():
    return gpu_cupy()


def _ort_cuda():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")


@pytest.mark.gpu
def test_cupy_noise_equals_host_noise():
    cupy = _cupy()
    from densepure_rt.sampling.device import CudaContext, CupyNoise

    ctx = CudaContext(cupy)
    noise = CupyNoise(cupy, ctx.stream)
    rows, shape = 50, (3, 9, 7)
    rng = np.random.default_rng(0)
    keys = [rng.integers(0, 2**32, rows, dtype=np.uint64).astype(np.uint32) for _ in range(4)]
    for offset, scale in ((0, 0.25), (7, 1.0)):
        want = np.empty((rows, *shape), dtype=np.float32)
        HostNoise().fill(want, 11, *keys, offset, scale)
        got = cupy.empty((rows, *shape), dtype=np.float32)
        got.fill(np.nan)
        noise.fill(got, 11, *(cupy.asarray(k) for k in keys), offset, scale)
        ctx.synchronize()
        np.testing.assert_allclose(cupy.asnumpy(got), want, rtol=0, atol=1e-6)


@pytest.mark.gpu
def test_cuda_executor_step_matches_the_cpu_provider_in_fp32(engine):
    cupy = _cupy()
    _ort_cuda()
    from densepure_rt.executors.onnxrt import OrtExecutor
    from densepure_rt.sampling.device import CudaContext
    from densepure_rt.files.manifest import load_manifest
    from densepure_rt.schedule import make_schedule, reverse_schedule

    manifest = load_manifest(engine)
    ctx = CudaContext(cupy)
    gpu = OrtExecutor(engine, manifest, "cuda", stream=ctx.stream, xp=cupy)
    cpu = OrtExecutor(engine, manifest, "cpu")
    sched = manifest["schedule"]
    rs = reverse_schedule(make_schedule(sched["kind"], sched["num_timesteps"], sched["rescale_timesteps"]), SIGMA, 4)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 1, 16, 16)).astype(np.float32)
    for s in range(rs.num_calls):
        z = rng.standard_normal(x.shape).astype(np.float32)
        scal = np.ascontiguousarray(np.tile(rs.scalars[s], (len(x), 1)), dtype=np.float32)  # one row per image row (format 3)
        want = np.empty_like(x)
        cpu.step(x, z, scal, want)
        out = cupy.empty(x.shape, dtype=np.float32)
        with ctx.stream:
            gpu.step(cupy.asarray(x), cupy.asarray(z), cupy.asarray(scal), out)
        ctx.synchronize()
        got = cupy.asnumpy(out)
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
        x = want


@pytest.mark.gpu
def test_gpu_loop_counts_and_cross_image_batches(engine, digits, tmp_path):
    """fp32 engine on the GPU: counts equal the CPU loop's on almost every image (fp32 rounding on
    another device may flip a rare vote: at most one count in 100 may move); cross-image batches on
    the GPU equal one image at a time on the GPU exactly."""
    _cupy()
    _ort_cuda()
    images, _ = digits
    with open_engine(engine) as cpu, open_engine(engine, device="cuda") as gpu:
        for e in (cpu, gpu):
            e._prepare(SIGMA, STEPS, VOTES, 16)
        moved = total = 0
        single = []
        for i in range(6):
            want = sample_counts(cpu, images[i], 50, ESTIMATION, seed=0, image_index=i)
            got = sample_counts(gpu, images[i], 50, ESTIMATION, seed=0, image_index=i)
            moved += int(np.abs(got - want).sum()) // 2
            total += 50
            single.append(got)
        assert moved <= total // 100, (moved, total)
        many = []
        gpu.stream(RunSpec("predict", SIGMA, STEPS, VOTES, n=50, seed=0, batch=16), list(enumerate(images[:6])), many.append)
        by_idx = {s.idx: s.counts for s in many}
        for i in range(6):
            gpu._prepare(SIGMA, STEPS, VOTES, 16)
            np.testing.assert_array_equal(by_idx[i], sample_counts(gpu, images[i], 50, PREDICTION, seed=0, image_index=i))


@pytest.mark.gpu
def test_onnxruntime_cuda_graph_replays_give_the_same_counts(engine, digits):
    """The scheduler reserves its row count and runs every call full, so every call replays ONNX
    Runtime's CUDA graph of the step on fixed buffers: the same kernels as without the graph, so the
    same counts, call after call (fresh noise per call: the noise kernel runs outside the graph and
    writes the fixed buffer anew)."""
    _cupy()
    _ort_cuda()
    images, _ = digits
    with open_engine(engine, device="cuda", early_exit=False) as on, \
            open_engine(engine, device="cuda", early_exit=False, cuda_graph=False) as off:
        executor = on.executor
        print("ONNX Runtime CUDA graph:", "on" if executor.cuda_graph else f"off ({executor.cuda_graph_off})")
        for e in (on, off):
            e._prepare(SIGMA, STEPS, VOTES, 16)
        for i in range(3):
            a = sample_counts(on, images[i], 64, ESTIMATION, seed=0, image_index=i)
            b = sample_counts(off, images[i], 64, ESTIMATION, seed=0, image_index=i)
            np.testing.assert_array_equal(a, b)
        # Another batch size on the same engine: a graph of its own, the first one kept (not replayed
        # on freed buffers), and both still give the plain run's counts.
        for batch in (8, 16):
            for e in (on, off):
                e._prepare(SIGMA, STEPS, VOTES, batch)
            a = sample_counts(on, images[3], 48, ESTIMATION, seed=1, image_index=3)
            b = sample_counts(off, images[3], 48, ESTIMATION, seed=1, image_index=3)
            np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
def test_gpu_scheduler_counts_with_and_without_cuda_graphs(engine, digits):
    """The scheduler over CuPy (rows of many samples at any step, per-row keys put each call, the
    classifier in chunks), with ONNX Runtime's CUDA graph (full calls: every call all rows) and
    without: the same counts and UNet evaluations, many images at once and one at a time."""
    _cupy()
    _ort_cuda()
    images, _ = digits
    got = {}
    for cuda_graph in (False, True):
        with open_engine(engine, device="cuda", early_exit=True, cuda_graph=cuda_graph) as sched:
            many = []
            sched.stream(RunSpec("certify", SIGMA, STEPS, VOTES, n0=8, n=40, seed=0, batch=16), list(enumerate(images[:5])),
                         many.append)
            sched._prepare(SIGMA, STEPS, VOTES, 16)
            one = sample_counts(sched, images[5], 64, ESTIMATION, seed=2, image_index=5)
            got[cuda_graph] = (sorted((s.idx, s.result[1].counts.tolist(), s.unet_evals) for s in many), one.tolist())
            print(f"cuda_graph={cuda_graph}: scheduler full_calls={sched.scheduler().full_calls}")
    assert got[False] == got[True]


@pytest.mark.gpu
def test_gpu_stream_certifies_as_each_image_alone(engine, digits, tmp_path):
    """`certify --device cuda` (images streamed through one scheduler run) writes the rows of each
    image certified alone through the API on the GPU (time aside; with --radius also unet_evals:
    dropped work depends on what else is in flight), fixed n and --radius."""
    _cupy()
    _ort_cuda()
    base = ["certify", "--engine", str(engine), "--sigma", str(SIGMA), "--steps", str(STEPS), "--votes", str(VOTES),
            "--n0", "10", "--max", "4", "--device", "cuda", "--batch", "8"]
    for mode, extra in (("fixed", ["--n", "40"]), ("radius", ["--radius", "0.1", "--n-max", "200", "--round", "4"])):
        out = tmp_path / f"{mode}.tsv"
        result = CliRunner().invoke(main, base + extra + ["--out", str(out)])
        assert result.exit_code == 0, result.output
        header = out.read_text().splitlines()[0].split("\t")
        rows = {int(line.split("\t")[0]): dict(zip(header, line.split("\t"))) for line in out.read_text().splitlines()[1:]}
        images, _ = digits
        with open_engine(engine, device="cuda") as gpu:
            for idx, row in rows.items():
                if mode == "fixed":
                    cert, counts = gpu.certify_counts(images[idx], SIGMA, STEPS, VOTES, 10, 40, 0.001, image_index=idx, batch=8)
                    assert int(row["unet_evals"]) == counts.unet_evals
                else:
                    cert = gpu.certify_radii(images[idx], SIGMA, [0.1], STEPS, VOTES, 10, 200, 0.001, image_index=idx, batch=8,
                                             round_size=4)
                    assert int(row["n"]) == cert.n and int(row["n_a"]) == cert.n_a
                assert int(row["predict"]) == cert.prediction and float(row["radius"]) == pytest.approx(cert.radius, abs=1e-6)


@pytest.mark.gpu
def test_fp16_engine_labels_agree_with_fp32_on_99_percent_of_rows(engine, digits, tmp_path):
    cupy = _cupy()
    _ort_cuda()
    pytest.importorskip("torch")
    fp16 = tmp_path / "digits16"
    result = CliRunner().invoke(main, ["build", "--model", "digits", "--precision", "fp16", "--out", str(fp16)])
    assert result.exit_code == 0, result.output
    images, _ = digits
    with open_engine(engine, early_exit=False) as cpu, open_engine(fp16, device="cuda", early_exit=False) as gpu:
        agree, rows = run_label_agreement(cpu, gpu, images, cupy, SIGMA, STEPS, VOTES)
        assert agree >= 0.99 * rows, (agree, rows)


def test_classifier_in_chunks_gives_the_same_counts(engine, digits):
    """Rows beyond the classifier's chunk (here 5 rows) are classified in several calls: same counts."""
    images, _ = digits
    with open_engine(engine) as ref, open_engine(engine) as new:
        new.loop.CLASSIFIER_ROWS = 5
        for e in (ref, new):
            e._prepare(SIGMA, STEPS, VOTES, 8)
        want = sample_counts(ref, images[4], 24, ESTIMATION, seed=7, image_index=4)
        got = sample_counts(new, images[4], 24, ESTIMATION, seed=7, image_index=4)
        np.testing.assert_array_equal(got, want)


def test_early_exit_is_on_by_default_on_every_device(engine):
    with open_engine(engine, metadata_only=True) as auto, open_engine(engine, metadata_only=True, early_exit=False) as off:
        assert auto.early_exit_for() is True and off.early_exit_for() is False


def test_keys_outside_uint32_are_refused_not_wrapped(engine, digits):
    """An image index of -1 or 2^32 + 5 would wrap onto another image's noise: refused."""
    images, _ = digits
    with open_engine(engine) as e:
        e._prepare(SIGMA, STEPS, VOTES, 4)
        for bad in (-1, 2**32 + 5):
            with pytest.raises(ValueError, match="image index must be in"):
                e.loop.voted_labels(images[0], 0, bad, ESTIMATION, [0])


def test_host_to_device_copies_name_the_loops_stream():
    """On a GPU every small host -> device copy of the loops (keys, steps) is queued on the loop's
    stream, named explicitly: CuPy releases before 14 copied on the legacy default stream when none
    was named, unordered with the loop's non-blocking stream. Checked on the loop's own _put with a
    stand-in for a CuPy buffer that records the stream each copy is given (CuPy itself is not here)."""
    from densepure_rt.sampling.loop import BatchLoop

    class DeviceBuffer:
        dtype = np.dtype(np.uint32)

        def __init__(self):
            self.copies = []

        def __getitem__(self, index):
            return self

        def set(self, host, stream=None):
            self.copies.append((host.tolist(), stream))

    class Device:
        loop_stream = object()

        def stream(self):
            return self.loop_stream

    loop = BatchLoop.__new__(BatchLoop)
    loop.xp, loop.device = object(), Device()  # not numpy: the device branch
    buf = DeviceBuffer()
    loop._put(buf, [3, 1, 2])
    assert buf.copies == [([3, 1, 2], Device.loop_stream)]
