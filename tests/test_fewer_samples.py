"""Fewer samples per certificate, end to end on the shipped digits engine.

- The exact early exit of the K-run vote gives the same votes (so the same counts and rows) as the
  full vote with the same noise, with fewer UNet evaluations.
- ``certify --radius`` and ``certify --tol`` use the estimation samples 0, 1, 2, ... of fixed-n
  CERTIFY: a fixed-n run with the n a sequential row used must see the same n_a. Their decisions
  are recomputed here from (n_a, n) with the beta-mixture formula written out independently
  (scipy.special.betaln), not with densepure_rt.stats.sequential.
- The sequential modes' selection stops at the first round where ``selection_done`` says so (on the
  digits engine and on scripted votes), and an empty confidence interval abstains.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import special, stats


from conftest import invoke
from densepure_rt.files.data import digits_test_split
from densepure_rt.sampling.noise import SELECTION
from densepure_rt.runtime import Engine, open_engine
from densepure_rt.stats.sequential import selection_done

SIGMA, STEPS, VOTES, N0, ALPHA = 0.5, 2, 3, 20, 0.001
SETTINGS = ["--sigma", SIGMA, "--steps", STEPS, "--votes", VOTES, "--n0", N0, "--alpha", ALPHA, "--quiet"]
COMMON = [*SETTINGS, "--skip", 45]
#: Every 90th test digit (images 0, 90, 180, 270): the sequential runs whose every row is recomputed.
SPARSE = [*SETTINGS, "--skip", 90]
# The default prior of densepure_rt.stats.sequential, restated: equal weights on Beta(16^k, 1), k = 0..4.
PRIOR_A = np.array([1.0, 16.0, 256.0, 4096.0, 65536.0])




def rows(path: Path) -> list[dict]:
    lines = Path(path).read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def log_m(n_a: int, n: int, p: float) -> float:
    """log M_n(p) of the equal-weight Beta(a, 1) mixture, from its definition."""
    terms = np.log(0.2) + special.betaln(PRIOR_A + n_a, 1.0 + n - n_a) - special.betaln(PRIOR_A, 1.0)
    log_marginal = np.logaddexp.reduce(terms)
    return float(log_marginal - special.xlogy(n_a, p) - special.xlog1py(n - n_a, -p))


def lower_bound(n_a: int, n: int) -> float:
    """inf {p : M_n(p) < 1/alpha}, by bisection on [0, n_a / n]."""
    if n_a == 0:
        return 0.0
    lo, hi = 0.0, n_a / n
    for _ in range(200):
        mid = (lo + hi) / 2
        if log_m(n_a, n, mid) >= np.log(1 / ALPHA):
            lo = mid
        else:
            hi = mid
    return lo


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    from conftest import build_digits_engine

    return build_digits_engine(tmp_path_factory, "fewer")


@pytest.mark.slow
def test_vote_early_exit_gives_identical_counts_with_fewer_unet_evaluations(engine):
    data = digits_test_split()
    results = {}
    for early_exit in (False, True):
        with open_engine(engine, early_exit=early_exit) as eng:
            results[early_exit] = [
                eng.certify_counts(data[i].image, SIGMA, 2, 5, 30, 60, ALPHA, image_index=i, batch=16) for i in (0, 100)
            ]
    saved = []
    for (cert_full, full), (cert_ee, ee) in zip(results[False], results[True]):
        np.testing.assert_array_equal(ee.counts0, full.counts0)
        np.testing.assert_array_equal(ee.counts, full.counts)
        assert cert_ee == cert_full
        assert full.unet_evals == 90 * 5 * 2  # (n0 + n) x K x b
        assert ee.unet_evals < full.unet_evals
        saved.append(1 - ee.unet_evals / full.unet_evals)
    print(f"vote early exit (K = 5): {np.round(saved, 3)} of UNet evaluations saved")
    assert min(saved) > 0.2  # at least the last ceil(K/2) - 1 runs of clearly decided samples


@pytest.mark.slow
def test_cli_rows_are_identical_without_early_exit(engine, tmp_path):
    a, b = tmp_path / "ee.tsv", tmp_path / "full.tsv"
    assert invoke("certify", "--engine", engine, *COMMON, "--n", 40, "--max", 180, "--out", a).exit_code == 0
    result = invoke("certify", "--engine", engine, *COMMON, "--n", 40, "--max", 180, "--no-early-exit", "--out", b)
    assert result.exit_code == 0, result.output
    ra, rb = rows(a), rows(b)
    assert len(ra) == 4
    strip = lambda r: {k: v for k, v in r.items() if k not in ("time", "unet_evals")}  # noqa: E731
    assert [strip(r) for r in ra] == [strip(r) for r in rb]
    assert all(int(r["unet_evals"]) == (N0 + 40) * VOTES * STEPS for r in rb)
    assert sum(int(r["unet_evals"]) for r in ra) < sum(int(r["unet_evals"]) for r in rb)


@pytest.mark.slow
def test_target_radii_rows_match_fixed_n_samples_and_the_mixture_test(engine, tmp_path):
    radii = [0.125, 0.25, 0.5]
    out = tmp_path / "radii.tsv"
    args = ["certify", "--engine", engine, *SPARSE, "--n-max", 400, "--out", out]
    for r in radii:
        args += ["--radius", r]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    got = rows(out)
    assert len(got) == 4
    options = json.loads(Path(f"{out}.json").read_text())
    assert options["mode"] == "certify-radii" and options["radii"] == radii and options["n"] == 400
    kinds = set()
    for row in got:
        n_a, n = int(row["n_a"]), int(row["n"])
        decisions = dict(pair.split(":") for pair in row["decisions"].split(","))
        assert [float(r) for r in decisions] == radii
        # Recompute every decision at the final (n_a, n) from the mixture's definition.
        for r, said in decisions.items():
            p0 = stats.norm.cdf(float(r) / SIGMA)
            rejected = log_m(n_a, n, p0) >= np.log(1 / ALPHA)
            want = "certified" if rejected and n_a > p0 * n else "futile" if rejected and n_a < p0 * n else "undecided"
            assert said == want, (row, r)
            kinds.add(said)
        assert n == 400 or "undecided" not in decisions.values()  # stops only when all are decided
        certified = [float(r) for r, d in decisions.items() if d == "certified"]
        assert float(row["radius"]) == (max(certified) if certified else 0.0)
        assert int(row["predict"]) == (int(row["c_a"]) if certified else -1)
        assert int(row["unet_evals"]) <= (N0 + n) * VOTES * STEPS
    assert "certified" in kinds
    assert options["round"] == 1  # rounds of one vote (the default with the scheduler): n is any count

    # The estimation samples are fixed-n CERTIFY's samples 0..n-1: a fixed-n run of that n agrees
    # (on the first image; rows are written in the order images finish).
    row = min(got, key=lambda r: int(r["idx"]))
    fixed = tmp_path / "fixed.tsv"
    result = invoke("certify", "--engine", engine, *SPARSE, "--max", 1, "--n", row["n"], "--out", fixed)
    assert result.exit_code == 0, result.output
    frow = rows(fixed)[0]
    assert (frow["c_a"], frow["n_a"]) == (row["c_a"], row["n_a"])


@pytest.mark.slow
def test_early_stopping_radius_is_the_lower_confidence_sequence(engine, tmp_path):
    out = tmp_path / "until.tsv"
    result = invoke("certify", "--engine", engine, *SPARSE, "--tol", 0.05, "--n-max", 600, "--out", out)
    assert result.exit_code == 0, result.output
    got = rows(out)
    assert len(got) == 4
    assert {r["stop"] for r in got} <= {"futile", "precise", "stalled", "budget"}
    for row in got:
        n_a, n, p_low = int(row["n_a"]), int(row["n"]), float(row["p_a_lower"])
        # The reported bound is the running maximum over rounds: at least the final round's bound.
        assert lower_bound(n_a, n) * (1 - 1e-5) <= p_low < 1.0  # the file keeps 6 significant digits
        radius = SIGMA * stats.norm.ppf(p_low) if p_low > 0.5 else 0.0
        # p_low is written with 6 significant digits: half a unit of its last digit moves the radius by
        # up to SIGMA * half / pdf(radius / SIGMA), which dominates the relative error near p = 0.5.
        half = 0.5 * 10 ** (np.floor(np.log10(max(p_low, 1e-300))) - 5)
        rounding = SIGMA * half / stats.norm.pdf(radius / SIGMA)
        assert float(row["radius"]) == pytest.approx(radius, rel=1e-5, abs=rounding + 1e-9)
        assert int(row["predict"]) == (int(row["c_a"]) if p_low > 0.5 else -1)
        assert n <= 600 and (row["stop"] != "budget" or n == 600)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--radius", "0.5", "--tol", "0.1"], "give one of them"),
        (["--radius", "0.5", "--n", "100"], "--n-max"),
        (["--n-max", "100"], "--radius or --tol"),
        (["--radius", "-0.5"], "--radius"),
        (["--radius", "nan"], "--radius"),
    ],
)
def test_mode_flags_are_checked(extra, needle, engine, tmp_path):
    out = tmp_path / "bad.tsv"
    result = invoke("certify", "--engine", engine, *COMMON, *extra, "--out", out)
    assert result.exit_code == 2 and needle in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_changing_the_targets_of_a_results_file_is_refused(engine, tmp_path):
    out = tmp_path / "r.tsv"
    base = ["certify", "--engine", engine, *COMMON, "--max", 1, "--n-max", 64, "--out", out]
    assert invoke(*base, "--radius", 0.25).exit_code == 0
    result = invoke(*base, "--radius", 0.5)
    assert result.exit_code == 2 and "radii [0.25] -> [0.5]" in result.stderr
    result = invoke(*base, "--radius", 0.25)  # the same targets: continued (nothing left to do)
    assert result.exit_code == 0 and "1 images done, 0 to go" in result.stderr


class _Spy:
    """The engine's own scheduler, with the labels each job's ``deliver`` receives recorded by phase
    (the scheduler runs as it is; only what it hands the engine's tests is looked at)."""

    def __init__(self, inner, seen: dict):
        self.inner, self.seen = inner, seen

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, images, jobs, seed, deliver, **kwargs):
        def spy(job, labels):
            self.seen.setdefault(jobs[job].phase, []).append(np.asarray(labels).copy())
            return deliver(job, labels)

        return self.inner.run(images, jobs, seed, spy, **kwargs)


@pytest.mark.slow
def test_selection_stops_where_selection_done_says_on_the_digits_engine(engine):
    """The sequential modes end the selection phase at the first round (of --round) where
    ``selection_done`` says so, with c_a the argmax of the counts so far; with the exact rule alone
    (level 0) that is the class all n0 samples pick."""
    data = digits_test_split()
    round_size, n0 = 16, 100
    early = 0
    with open_engine(engine) as eng:
        eng._prepare(SIGMA, STEPS, VOTES, round_size)
        scheduler = eng.scheduler
        for i in (0, 17, 45, 90, 135, 180, 225, 270):
            image = data[i].image
            eng._prepare(SIGMA, STEPS, VOTES, round_size)
            # counts after every round, from the same selection samples (noise: a function of the index)
            labels = eng.loop.voted_labels(image, 0, i, SELECTION, range(n0))
            ends = list(range(round_size, n0, round_size)) + [n0]
            prefix = [np.bincount(labels[:t], minlength=eng.num_classes) for t in ends]
            stop = next(t for t, c in zip(ends, prefix) if selection_done(c, n0 - t))
            seen: dict = {}
            eng.scheduler = lambda seen=seen: _Spy(scheduler(), seen)
            cert = eng.certify_radii(image, SIGMA, [0.25], STEPS, VOTES, n0, 40, ALPHA, image_index=i, batch=round_size,
                                     round_size=round_size)
            del eng.scheduler
            read = np.concatenate(seen[SELECTION])
            assert len(read) == stop and [len(r) for r in seen[SELECTION][:-1]] == [round_size] * (len(seen[SELECTION]) - 1)
            np.testing.assert_array_equal(read, labels[:stop])  # exactly the samples up to the stop
            assert cert.c_a == int(np.argmax(prefix[ends.index(stop)]))  # np.argmax: ties to the lowest class
            exact_stop = next(t for t, c in zip(ends, prefix) if selection_done(c, n0 - t, level=0.0))
            assert int(np.argmax(prefix[ends.index(exact_stop)])) == int(np.argmax(prefix[-1]))
            early += stop < exact_stop
    assert early >= 4  # the clear-leader rule ends most of these images' selection sooner


class _ScriptedScheduler:
    """A scheduler whose voted label of sample i is ``selection(i)`` / ``estimation(i)``: every job's
    samples in order, ``job.round`` at a time (all at once for round 0), one UNet evaluation per
    sample, and a log of the rounds handed out. Stands in for the engine's graphs, not for the
    modes' logic under test."""

    def __init__(self, selection, estimation):
        self.selection, self.estimation = selection, estimation
        self.asked = []
        self.xp = np
        self.device = _HostDevice()
        self.slots, self.first = 32, 1

    def run(self, images, jobs, seed, deliver, progress=None, stats=None, refill=None):
        from densepure_rt.sampling.scheduler import SchedulerStats

        stats = stats if stats is not None else SchedulerStats()
        j = 0
        while True:
            if j >= len(jobs):
                if refill is not None and refill():
                    continue
                break
            job = jobs[j]
            stats.per_job_unet_evals.append(0)
            stats.per_job_delivered_evals.append(0)
            stats.per_job_runs.append(0)
            start, size = 0, job.round or job.num
            while start < job.num:
                take = min(size, job.num - start)
                self.asked.append((job.phase, start, start + take))
                label = self.selection if job.phase == SELECTION else self.estimation
                stats.per_job_unet_evals[j] += take
                stats.per_job_delivered_evals[j] += take
                stats.unet_evals += take
                if progress is not None:
                    progress(take)
                start += take
                if not deliver(j, np.array([label(i) for i in range(start - take, start)], dtype=np.int64)):
                    break
            j += 1
        return stats


class _HostDevice:
    xp = np

    def stream(self):
        import contextlib

        return contextlib.nullcontext()

    def stage(self, images):
        return np.asarray(images)


class _ScriptedLoop:
    def __init__(self):
        self.device = _HostDevice()
        self.unet_evals = self.dropped_evals = 0


def _scripted_engine(selection, estimation) -> Engine:
    eng = Engine.__new__(Engine)  # no engine directory: only what the sequential modes touch
    eng.image_shape, eng.num_classes, eng.device = (1, 4, 4), 10, "cpu"
    eng.loop = _ScriptedLoop()
    eng._prepare = lambda *args, **kwargs: None
    sch = _ScriptedScheduler(selection, estimation)
    eng.scheduler = lambda: sch
    return eng


IMAGE = np.zeros((1, 4, 4), dtype=np.float32)


def test_selection_rounds_on_scripted_votes():
    # all 32 votes of the first round for class 3: done after one round (exact rule: after two)
    eng = _scripted_engine(lambda i: 3, lambda i: 3)
    cert = eng.certify_radii(IMAGE, 0.5, [0.25], n0=100, n_max=64, alpha=0.001, batch=32, image_index=0, round_size=32)
    assert cert.c_a == 3 and eng.scheduler().asked[0] == (SELECTION, 0, 32)
    assert eng.scheduler().asked[1][0] != SELECTION
    # 3 of every 4 votes for class 3, the rest for 5: 24 vs 8 is not clear (p = 0.0035), 48 vs 16 is
    eng = _scripted_engine(lambda i: 3 if i % 4 else 5, lambda i: 3)
    cert = eng.certify_radii(IMAGE, 0.5, [0.25], n0=100, n_max=64, alpha=0.001, batch=32, image_index=0, round_size=32)
    assert cert.c_a == 3 and [a for a in eng.scheduler().asked if a[0] == SELECTION] == [(SELECTION, 0, 32), (SELECTION, 32, 64)]
    # a leader that only the later votes overturn: the early stop takes class 2, all n0 votes class 7.
    # The estimation votes (independent of the selection) then decide: futile for c_a = 2, abstain.
    eng = _scripted_engine(lambda i: 2 if i < 32 else 7, lambda i: 7)
    cert = eng.certify_radii(IMAGE, 0.5, [0.25], n0=100, n_max=640, alpha=0.001, batch=32, image_index=0, round_size=32)
    assert (cert.c_a, cert.prediction, cert.radius, cert.decisions, cert.n_a) == (2, -1, 0.0, (-1,), 0)
    assert cert.unet_evals == 32 + cert.n and cert.n == 32


def test_certify_until_abstains_when_the_interval_comes_out_empty():
    # 160 estimation votes for c_a, then none: the later intervals lie below the running lower bound
    # (about 0.98), a detected coverage failure. Abstain, with the reason in the row's stop column.
    eng = _scripted_engine(lambda i: 3, lambda i: 3 if i < 160 else 1)
    cert = eng.certify_until(IMAGE, 0.5, tol=0.0, n0=100, n_max=3200, alpha=0.05, batch=32, image_index=0, round_size=32)
    assert (cert.prediction, cert.radius, cert.reason, cert.c_a) == (-1, 0.0, "inconsistent", 3)
    assert cert.p_a_lower > 0.97 and cert.n_a == 160 and 160 < cert.n < 3200


