"""The statistical modes, one small class each, picked from :data:`MODE_TABLE` by name.

A mode says what one image computes from its noisy samples' votes and what its result is:

    mode        phases (samples read)                         result                    results row
    certify     n0 selection + n estimation, all read          (Certificate, CountsResult)  write_certificate
    predict     n prediction samples                           Prediction                write_prediction
    certify-radii  selection until clear, estimation until     RadiiCertificate          write_radii
                every target radius is decided (<= n)
    certify-until  selection until clear, estimation until     EarlyStopCertificate      write_until
                more samples stop paying off (<= n)

Every mode runs through the one sampling path (:meth:`densepure_rt.runtime.Engine.stream`: the
scheduler, many images in flight); its :meth:`Mode.work` is the per-image bookkeeping
(:class:`densepure_rt.sampling.stream.FixedWork` or :class:`~densepure_rt.sampling.stream.SequentialWork`)
and the statistics are the pure functions of :mod:`densepure_rt.stats`. A new mode is a class here
(its checks, its work, its row) plus one line in :data:`MODE_TABLE`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from densepure_rt.certificates import CountsResult, EarlyStopCertificate, RadiiCertificate
from densepure_rt.errors import ConfigError, param
from densepure_rt.sampling.noise import ESTIMATION, PREDICTION, SELECTION

if TYPE_CHECKING:  # pragma: no cover
    from densepure_rt.spec import RunSpec

__all__ = ["Mode", "FixedCertify", "Predict", "TargetRadii", "EarlyStop", "MODE_TABLE", "mode_of"]


class Mode:
    """One statistical mode: what an image computes and how its row is written."""

    #: The mode's name (``RunSpec.mode``, the options file's ``mode``).
    name = ""
    #: Whether an image stops when its test decides (then ``n`` is the most samples, ``--n-max``).
    sequential = False

    def check(self, spec: "RunSpec") -> None:
        """Refuse, as a :class:`ConfigError` naming the parameter, settings the mode cannot run."""

    def work(self, spec: "RunSpec", idx: int, num_classes: int):
        """What image ``idx`` computes: a work object of :mod:`densepure_rt.sampling.stream`."""
        raise NotImplementedError

    def settings(self, spec: "RunSpec") -> dict:
        """The settings a single image's result carries (``result.settings``)."""
        return {"sigma": spec.sigma, "steps": spec.steps, "votes": spec.votes, "alpha": spec.alpha, "seed": spec.seed}

    def options(self, spec: "RunSpec") -> dict:
        """What the options file records beyond :meth:`RunSpec.to_dict` (None where the mode has none)."""
        return {"stop_rule": None}

    def write(self, writer, label: int, outcome) -> None:
        """The results row of ``outcome`` (:class:`densepure_rt.scale.work.Outcome`)."""
        raise NotImplementedError


class FixedCertify(Mode):
    """Cohen et al.'s CERTIFY: c_a from n0 selection samples, p_A's lower bound from n fresh ones."""

    name = "certify"

    def work(self, spec, idx, num_classes):
        from densepure_rt.sampling.stream import FixedWork
        from densepure_rt.stats.cohen import certify

        return FixedWork(idx, num_classes, [(SELECTION, spec.n0), (ESTIMATION, spec.n)],
                         lambda c, ev: (certify(c[0], c[1], spec.sigma, spec.alpha), CountsResult(c[0], c[1], ev)))

    def settings(self, spec):
        return {**super().settings(spec), "n0": spec.n0, "n": spec.n}

    def write(self, writer, label, outcome):
        writer.write_certificate(outcome.idx, label, outcome.result, outcome.counts, outcome.seconds, outcome.unet_evals)


class Predict(Mode):
    """Cohen et al.'s PREDICT: the top two counts of n samples, a two-sided binomial test."""

    name = "predict"

    def work(self, spec, idx, num_classes):
        from densepure_rt.sampling.stream import FixedWork
        from densepure_rt.stats.cohen import predict

        return FixedWork(idx, num_classes, [(PREDICTION, spec.n)], lambda c, ev: predict(c[0], spec.alpha))

    def settings(self, spec):
        return {**super().settings(spec), "n": spec.n}

    def write(self, writer, label, outcome):
        writer.write_prediction(outcome.idx, label, outcome.result, outcome.seconds, outcome.unet_evals)


class _Sequential(Mode):
    """Selection until the leader is clear, then estimation rounds of ``round_size`` fed to a
    sequential test until it is done (anytime-valid: :mod:`densepure_rt.stats.sequential`)."""

    sequential = True

    def test(self, spec):
        raise NotImplementedError

    def result(self, test, c_a: int, evals: int):
        raise NotImplementedError

    def check(self, spec):
        self.test(spec)

    def work(self, spec, idx, num_classes):
        from densepure_rt.sampling.stream import SequentialWork

        from densepure_rt.stats.selection import SELECTION_RULES

        return SequentialWork(idx, num_classes, spec.n0, self.test(spec), self.result, spec.round_size, spec.round_size,
                              selection=SELECTION_RULES[spec.selection])

    def settings(self, spec):
        return {**super().settings(spec), "n0": spec.n0, "n_max": spec.n, "round_size": spec.round_size,
                "selection": spec.selection}


class TargetRadii(_Sequential):
    """Is the image certifiably robust at each target radius? (``--radius``)"""

    name = "certify-radii"

    def check(self, spec):
        if spec.radii is None:
            raise ConfigError(f"{param('radii')}: give the target radii of mode 'certify-radii'")
        super().check(spec)
        object.__setattr__(spec, "radii", tuple(float(r) for r in spec.radii))

    def test(self, spec):
        from densepure_rt.stats.sequential import TargetRadiiTest

        try:
            return TargetRadiiTest(spec.sigma, list(spec.radii), spec.alpha, int(spec.n))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{param('radii')}: {exc}") from None

    def result(self, test, c_a, evals) -> RadiiCertificate:
        r = test.result()
        return RadiiCertificate(prediction=c_a if r.certified else -1, radius=r.radius, c_a=c_a, n_a=r.n_a, n=r.n,
                                radii=tuple(float(x) for x in test.radii), decisions=r.decisions, unet_evals=int(evals))

    def settings(self, spec):
        return {**super().settings(spec), "radii": list(spec.radii)}

    def write(self, writer, label, outcome):
        writer.write_radii(outcome.idx, label, outcome.result, outcome.seconds)


class EarlyStop(_Sequential):
    """Cohen's largest certified radius, stopping once more samples stop paying off (``--tol``)."""

    name = "certify-until"

    def check(self, spec):
        if spec.tol is None:
            raise ConfigError(f"{param('tol')}: give the tolerance of mode 'certify-until'")
        super().check(spec)
        object.__setattr__(spec, "tol", float(spec.tol))

    def test(self, spec):
        from densepure_rt.stats.sequential import EarlyStopRadius

        try:
            return EarlyStopRadius(spec.sigma, spec.alpha, int(spec.n), float(spec.tol))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{param('tol')}: {exc}") from None

    def result(self, test, c_a, evals) -> EarlyStopCertificate:
        # The test's own reads (not test.result()): a certificate carries no p_a_upper, whose
        # exact value would cost a root.
        return EarlyStopCertificate(prediction=c_a if test.certified else -1, radius=test.radius, c_a=c_a, n_a=test.n_a,
                                    n=test.n, p_a_lower=test.p_a_lower, reason=test.reason, unet_evals=int(evals))

    def settings(self, spec):
        from densepure_rt.stats.sequential import STOP_RULE

        return {**super().settings(spec), "tol": spec.tol, "stop_rule": STOP_RULE}

    def options(self, spec):
        from densepure_rt.stats.sequential import STOP_RULE

        return {"stop_rule": STOP_RULE}  # another rule stops elsewhere: a resume key

    def write(self, writer, label, outcome):
        writer.write_until(outcome.idx, label, outcome.result, outcome.seconds)


#: The modes by name: adding one is its class plus a line here.
MODE_TABLE: dict[str, Mode] = {m.name: m for m in (FixedCertify(), Predict(), TargetRadii(), EarlyStop())}


def mode_of(name: str) -> Mode:
    """The mode called ``name`` (:data:`MODE_TABLE`); an unknown name is a :class:`ConfigError`."""
    try:
        return MODE_TABLE[name]
    except KeyError:
        raise ConfigError(f"mode must be one of {', '.join(MODE_TABLE)} (got {name!r})") from None

