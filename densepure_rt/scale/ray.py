"""Scale-out on Ray: one actor per GPU (or per CPU slot) certifies images that the driver hands out.

    from densepure_rt.scale.ray import RayPool
    from densepure_rt.spec import RunSpec

    spec = RunSpec("certify", sigma=0.5, steps=4, votes=10, n0=100, n=10000, alpha=0.001, seed=0, batch=32)
    with RayPool("engines/cifar10", address="auto", device="cuda") as pool:
        for outcome in pool.map(spec, indices, load=lambda idx: images[idx]):
            ...  # completion order

How it works (``densepure-rt certify --ray ...`` is built on it):

- The driver connects to Ray (``address``: ``"auto"`` an existing cluster, e.g. one started with
  ``ray start --head``; ``"local"`` a new single-machine cluster; or a cluster's address), and
  starts ``actors`` actors (default: one per GPU of the cluster with ``device="cuda"``, one per
  ``threads`` CPUs otherwise). Each opens the engine once, on its own node: the engine directory
  must be at the same path on every node (or at the path in the node's ``DENSEPURE_RT_ENGINE``
  environment variable), and an actor whose manifest's sha256 differs from the driver's refuses
  to start, in one line naming its host.
- Connecting is bounded by ``connect_timeout`` (``--ray-timeout``): a host that does not resolve
  fails at once, an address is probed over TCP until then, and ``ray.init`` is given up on then
  (Ray itself retries an address where no cluster answers for many minutes). Each failure is one
  :class:`ConfigError` line saying what was tried and how to fix it.
- ``actors`` is capped at what the cluster's nodes can hold (one line says so); an actor that no
  node can hold is refused at once; while actors wait for resources held by other work, a line
  every ``report_every`` seconds says how many are ready.
- Images travel from the driver to the actors (the data needs to be readable on the driver only);
  each actor has at most one image in flight and gets the next when it returns one, so faster
  GPUs certify more images. Outcomes come back in completion order; the caller (the CLI) is the one
  writer of the results file.
- An actor that dies (process killed, node lost) loses only its image in flight: the image goes to
  another actor and a replacement actor is started (at most ``max_replacements`` in all). The
  outcome of an image does not depend on which actor computed it: noise is a pure function of
  (seed, image index, phase, sample), and every actor runs :func:`densepure_rt.scale.work.run_image`.
  Rows are identical to a single-process run with the same ``--threads`` (ONNX Runtime's CPU
  kernels may round differently with another thread count), except the wall-time column.
- A user error on an actor (a NaN image, a broken engine) stops the run with that error's one line.

Ray is an optional dependency (``pip install 'densepure-rt[ray]'``), imported only here, and this
module only when ``--ray`` is given. Tested on a local Ray cluster on the CPU (tests/test_ray.py);
on GPUs each actor takes ``num_gpus=1`` and Ray sets ``CUDA_VISIBLE_DEVICES`` (what has run on
which hardware: docs/backends.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections import deque
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from densepure_rt.errors import ConfigError, DensePureError, EngineError
from densepure_rt.errors import first_line as _first_line
from densepure_rt.scale.work import Outcome, RunSpec, run_group, run_image

__all__ = ["ENGINE_ENV", "RayPool", "require_ray"]

#: On a node whose copy of the engine directory lives at another path: that path.
ENGINE_ENV = "DENSEPURE_RT_ENGINE"
#: The actors' concurrency group for progress queries.
PROGRESS_GROUP = "progress"
#: How to fix an address where no Ray cluster answers (the end of each such error line).
_FIX = "start a cluster with `ray start --head` and give the address it prints, use --ray local, or raise --ray-timeout"


def require_ray():
    """The ray module, or a :class:`ConfigError` that says how to get it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'densepure-rt[ray]'") from None
    return ray



def _host_port(address: str) -> Optional[tuple]:
    """(host, port) of ``host:port``, ``[v6]:port`` or ``ray://host:port``; None if it is none of those."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return None
    return host, int(port)


def _room(resources: dict, need: dict) -> int:
    """How many actors that each need ``need`` fit in ``resources`` (Ray's resource dicts)."""
    return min(int(resources.get(name, 0) // amount) for name, amount in need.items())


def _resources(resources: dict) -> str:
    """``{"CPU": 2.0, "GPU": 1.0}`` as "2 CPUs, 1 GPU"."""
    return ", ".join(f"{amount:g} {name}{'s' if amount != 1 else ''}" for name, amount in resources.items()
                     if name in ("CPU", "GPU"))


def _not_main_thread_warning(record: logging.LogRecord) -> bool:
    """A logging filter: drops Ray's warning that ``ray.init`` outside the main thread leaves SIGTERM
    alone (the CLI has its own handler; a library user keeps theirs)."""
    return "SIGTERM handler is not set" not in record.getMessage()


class Worker:
    """The actor: one opened engine on one node. Plain Python (``RayPool`` wraps it with
    ``ray.remote``); an engine that cannot be opened is reported by :meth:`ready`, not raised, so the
    driver can say which node refused and why in one line."""

    def __init__(self, engine_dir: str, manifest_sha256: str, device: str, threads: Optional[int], early_exit: Optional[bool],
                 kernels: str = "portable"):
        from densepure_rt.runtime import open_engine

        self.engine = None
        self.samples = 0
        self.error: Optional[str] = None
        self.path = os.environ.get(ENGINE_ENV) or engine_dir
        self.host = socket.gethostname()
        try:
            engine = open_engine(self.path, device=device, threads=threads, early_exit=early_exit, kernels=kernels)
        except DensePureError as exc:
            self.error = f"the engine at {self.path} on {self.host} cannot be opened: {_first_line(exc)}"
            return
        found = engine.manifest.manifest_sha256
        if found != manifest_sha256:
            engine.close()
            self.error = (
                f"the engine at {self.path} on {self.host} is not the driver's (manifest sha256 {found[:12]}... vs "
                f"{manifest_sha256[:12]}...): copy the same engine directory to every node"
            )
            return
        self.engine = engine

    def ready(self) -> dict:
        """Where the actor runs and what it runs in (or why it cannot)."""
        info = {"host": self.host, "pid": os.getpid(), "path": self.path, "error": self.error}
        if self.engine is not None:
            executor = self.engine.executor
            info["precision"] = executor.effective_precision
            info["backend"] = executor.name
        return info

    def _drawn(self, samples: int) -> None:
        self.samples += samples

    def run(self, task: RunSpec, image: np.ndarray, idx: int) -> Outcome:
        self.samples = 0
        return run_image(self.engine, task, image, idx, progress=self._drawn)

    def run_group(self, task: RunSpec, images: np.ndarray, indices: list) -> list:
        self.samples = 0
        return run_group(self.engine, task, images, indices, progress=self._drawn)

    def progress(self) -> int:
        """Noisy samples drawn so far for the work in flight (called from the driver while ``run``
        works: the actor has a second concurrency group, ``progress``, for it)."""
        return self.samples


class RayPool:
    """Actors that certify images on a Ray cluster (see the module docstring). A context manager."""

    def __init__(
        self,
        engine_dir: str,
        manifest_sha256: str,
        *,
        address: str = "auto",
        actors: Optional[int] = None,
        device: str = "cpu",
        threads: Optional[int] = None,
        early_exit: Optional[bool] = None,
        kernels: str = "portable",
        runtime_env: Optional[dict] = None,
        max_replacements: Optional[int] = None,
        start_timeout: float = 600.0,
        connect_timeout: float = 30.0,
        report_every: float = 10.0,
        poll: float = 2.0,
        log: Callable[[str], None] = print,
    ):
        if actors is not None and actors < 1:
            raise ConfigError(f"--actors must be at least 1 (got {actors})")
        self.engine_dir, self.manifest_sha256 = str(engine_dir), manifest_sha256
        self.address, self.wanted, self.device = address, actors, device
        # One CPU slot per actor: ONNX Runtime would otherwise take every core of the node per actor.
        self.threads = threads if threads is not None else (None if device == "cuda" else 1)
        self.early_exit, self.runtime_env, self.kernels = early_exit, runtime_env, kernels
        self.max_replacements = max_replacements
        self.start_timeout, self.log = float(start_timeout), log
        #: Seconds to wait for the Ray cluster to answer when connecting (``--ray-timeout``).
        self.connect_timeout = float(connect_timeout)
        #: Seconds between "waiting for Ray actors: k of n ready" lines while actors start.
        self.report_every = float(report_every)
        #: Seconds between progress queries to busy actors (with a ``progress`` callback in :meth:`map`).
        self.poll = float(poll)
        self.ray = None
        self._owns_ray = False
        #: The session folder of a cluster this pool started (``"local"``), removed when it closes.
        self._temp_dir: Optional[str] = None
        self._actor_class = None
        self.actors: list = []  # slot -> actor handle (None: slot retired)
        self.info: list[dict] = []  # slot -> Worker.ready() of its current actor
        self.replaced = 0

    # -- lifecycle ----------------------------------------------------------------------------- #
    def __enter__(self) -> "RayPool":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _connect(self) -> None:
        """Connect to the cluster of ``address`` within :attr:`connect_timeout` (``"local"``: start one).

        Ray's own client retries an address where no GCS answers for many minutes, in C++ that
        cannot be interrupted; so an address is first probed over TCP (a host that does not resolve
        fails at once), and ``ray.init`` then runs in a helper thread that is given up on at the
        deadline. Every failure is one :class:`ConfigError` line that says what was tried and what to do."""
        ray = self.ray = require_ray()
        if ray.is_initialized():  # a caller (a library user, the tests) connected already
            return
        if self.address == "local":
            # Ray keeps each session's logs and sockets under TMPDIR/ray/session_* for ever; a cluster
            # this pool starts gets a folder of its own instead, removed by close().
            self._temp_dir = tempfile.mkdtemp(prefix="densepure-rt-ray-")
            self._init(ray)
        else:
            deadline = time.monotonic() + self.connect_timeout
            target = self._target(ray)
            if target is not None:
                self._probe(*target, deadline)
            self._init_by(ray, deadline)
        self._owns_ray = True

    def _target(self, ray) -> Optional[tuple]:
        """(host, port) of the GCS that ``ray.init`` will try for :attr:`address` (None: unknown)."""
        if self.address != "auto":
            return _host_port(self.address)
        # "auto": RAY_ADDRESS, else the last `ray start` on this machine, else a running local GCS.
        # Ray's resolver is private API: without it, the deadline on ray.init still holds.
        resolve = getattr(getattr(getattr(ray, "_private", None), "services", None), "canonicalize_bootstrap_address", None)
        if resolve is None:
            return None
        try:
            found = resolve("auto")
        except ConnectionError:  # no cluster found on this machine: Ray says so at once
            raise ConfigError("--ray auto: no Ray cluster runs on this machine (none started with `ray start --head`, no "
                              "RAY_ADDRESS); start one with `ray start --head`, or use --ray local") from None
        except Exception:
            return None
        return _host_port(found) if found else None

    def _probe(self, host: str, port: int, deadline: float) -> None:
        """Return once something accepts a TCP connection at host:port; retry (a head node that is
        starting) until ``deadline``, then raise."""
        where = f"{host}:{port}"
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConfigError(f"--ray {self.address}: the host {host} does not resolve ({exc.strerror}); give the "
                              "address that `ray start --head` prints on the head node, or use --ray local") from None
        while True:
            left = deadline - time.monotonic()
            try:
                with socket.create_connection((host, port), timeout=max(0.1, min(2.0, left))):
                    return
            except OSError as exc:
                last = exc.strerror or type(exc).__name__
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConfigError(f"--ray {self.address}: nothing accepted a connection at {where} within "
                                  f"{self.connect_timeout:g} s ({last}); {_FIX}")
            time.sleep(min(0.5, left))

    def _init(self, ray) -> None:
        where = {"_temp_dir": self._temp_dir} if self._temp_dir else {}
        try:
            ray.init(address=self.address, include_dashboard=False, logging_level=logging.ERROR, **where)
        except Exception as exc:  # ConnectionError, ValueError, RuntimeError... from Ray's start-up
            raise ConfigError(f"--ray {self.address}: cannot connect to or start a Ray cluster ({_first_line(exc)}); {_FIX}") from None

    def _init_by(self, ray, deadline: float) -> None:
        """:meth:`_init` in a helper thread, given up on at ``deadline`` (the thread is left to
        Ray's retries: a process that goes on should not call ``ray.init`` again)."""
        failure: list = []

        def connect() -> None:
            try:
                self._init(ray)
            except ConfigError as exc:
                failure.append(exc)

        thread = threading.Thread(target=connect, name="densepure-rt ray.init", daemon=True)
        worker_log = logging.getLogger("ray._private.worker")
        worker_log.addFilter(_not_main_thread_warning)
        try:
            thread.start()
            thread.join(max(0.0, deadline - time.monotonic()))
        finally:
            worker_log.removeFilter(_not_main_thread_warning)
        if thread.is_alive():
            raise ConfigError(f"--ray {self.address}: no Ray cluster answered within {self.connect_timeout:g} s "
                              f"(something accepts connections there, but not Ray's); {_FIX}")
        if failure:
            raise failure[0]

    def _need(self) -> dict:
        """The Ray resources one actor asks for."""
        return {"CPU": 1, "GPU": 1} if self.device == "cuda" else {"CPU": self.threads or 1}

    def _count(self) -> int:
        """Actors to start: ``actors``, or one per actor's resources in the cluster; never more than
        the cluster's nodes can hold (those would wait for resources that never come)."""
        need = self._need()
        total = self.ray.cluster_resources()
        if self.device == "cuda" and total.get("GPU", 0) < 1:
            raise ConfigError("--device cuda --ray: the Ray cluster has no GPUs; use --device cpu, or nodes with GPUs")
        fit = sum(_room(node["Resources"], need) for node in self.ray.nodes() if node.get("Alive"))
        if fit < 1:
            raise ConfigError(
                f"--ray: one actor needs {_resources(need)}{'' if self.device == 'cuda' else ' (--threads)'}, and no node of "
                f"the Ray cluster has that ({_resources(total)} in all); use fewer --threads, or bigger nodes"
            )
        if self.wanted is None:
            return fit
        if self.wanted > fit:
            self.log(f"--actors {self.wanted}: the Ray cluster ({_resources(total)}) has room for {fit} actor{'s' if fit > 1 else ''} "
                     f"of {_resources(need)}; starting {fit}")
        return min(self.wanted, fit)

    def _new_actor(self):
        if self._actor_class is None:
            # "progress": a second thread that answers progress() while run() works (run keeps the
            # default group's single thread).
            self._actor_class = self.ray.remote(concurrency_groups={PROGRESS_GROUP: 1})(Worker)
        need = self._need()
        options = {"num_cpus": need["CPU"], "num_gpus": need.get("GPU", 0)}
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        return self._actor_class.options(**options).remote(
            self.engine_dir, self.manifest_sha256, self.device, self.threads, self.early_exit, self.kernels
        )

    def _await_ready(self, actors: list) -> list:
        """Worker.ready() of each actor (None where it did not start within the timeout or died);
        a log line every :attr:`report_every` seconds while some are not ready."""
        ray = self.ray
        refs = [a.ready.remote() for a in actors]
        started = time.monotonic()
        waiting = list(refs)
        while waiting:
            left = started + self.start_timeout - time.monotonic()
            if left <= 0:
                break
            _, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=min(self.report_every, left))
            if waiting:
                self.log(f"waiting for Ray actors: {len(refs) - len(waiting)} of {len(refs)} ready "
                         f"({time.monotonic() - started:.0f} s; giving up after {self.start_timeout:g} s)")
        waiting = set(waiting)
        infos = []
        for ref in refs:
            if ref in waiting:
                infos.append(None)
                continue
            try:
                infos.append(ray.get(ref))
            except ray.exceptions.RayError as exc:
                self.log(f"an actor failed to start: {_first_line(exc)}")
                infos.append(None)
        for info in infos:
            if info is not None and info["error"]:
                raise EngineError(info["error"])
        return infos

    def _say_if_busy(self, count: int) -> None:
        """One log line when other work holds resources that some of the ``count`` actors need."""
        free = _room(self.ray.available_resources(), self._need())
        if free < count:
            self.log(f"the Ray cluster has free resources for {free} of {count} actors now (other work holds the rest); "
                     f"the others start when it frees them (up to {self.start_timeout:g} s)")

    def start(self, images: Optional[int] = None) -> None:
        """Connect, start the actors (at most ``images`` of them) and check their engines."""
        self._connect()
        count = self._count()
        if images is not None:
            count = max(1, min(count, int(images)))
        if self.max_replacements is None:
            self.max_replacements = 2 * count
        self._say_if_busy(count)
        actors = [self._new_actor() for _ in range(count)]
        infos = self._await_ready(actors)
        live = [(a, i) for a, i in zip(actors, infos) if i is not None]
        for a, i in zip(actors, infos):
            if i is None:
                self.ray.kill(a)
        if not live:
            raise EngineError(
                f"no Ray actor started within {self.start_timeout:g} s: the cluster has no free resources for one "
                f"({_resources(self._need())} per actor; other work holds them); check `ray status`"
            )
        if len(live) < count:
            self.log(f"{len(live)} of {count} Ray actors started (the others found no free resources); going on with {len(live)}")
        self.actors = [a for a, _ in live]
        self.info = [i for _, i in live]
        self.precision = self._agree("precision")
        self.backend = self._agree("backend")

    def _agree(self, key: str) -> str:
        values = {i[key] for i in self.info}
        if len(values) > 1:
            where = ", ".join(f"{i['host']} (pid {i['pid']}): {i[key]}" for i in self.info)
            raise EngineError(f"the Ray actors run the engine with different {key}s ({where}): every node must compute the same")
        return values.pop()

    def close(self) -> None:
        """Stop the actors, and the Ray connection (and its local cluster) if this pool made it."""
        ray = self.ray
        if ray is None:
            return
        for actor in self.actors:
            if actor is not None:
                try:
                    ray.kill(actor)
                except Exception:
                    pass
        self.actors = []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
        if self._temp_dir is not None:  # made by mkdtemp in _connect: never any other folder
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
        self.ray = None

    # -- work ---------------------------------------------------------------------------------- #
    def _replace(self, slot: int, why: str) -> None:
        """Retire the dead actor of ``slot``; start a replacement while replacements are left."""
        dead = self.info[slot]
        try:
            self.ray.kill(self.actors[slot])
        except Exception:
            pass
        self.actors[slot] = None
        if self.replaced < self.max_replacements:
            self.replaced += 1
            actor = self._new_actor()
            info = self._await_ready([actor])[0]
            if info is not None:
                self.actors[slot], self.info[slot] = actor, info
                self.log(f"Ray actor on {dead['host']} (pid {dead['pid']}) died ({why}); replaced by pid {info['pid']} on {info['host']}")
                return
            self.ray.kill(actor)
        self.log(f"Ray actor on {dead['host']} (pid {dead['pid']}) died ({why}); {self.live} actors left")
        if self.live == 0:
            raise EngineError(f"every Ray actor died (the last: {why}); nothing is lost: run again with --resume")

    @property
    def live(self) -> int:
        return sum(a is not None for a in self.actors)

    def _poll(self, pending: dict, counted: dict, progress: Callable[[int], None]) -> None:
        """Ask every busy actor how many samples its work in flight has drawn; report the increase."""
        ray = self.ray
        asks = {}
        for slot, _ in pending.values():
            asks[slot] = self.actors[slot].progress.options(concurrency_group=PROGRESS_GROUP).remote()
        done, _ = ray.wait(list(asks.values()), num_returns=len(asks), timeout=self.poll)
        done = set(done)
        for slot, ref in asks.items():
            if ref not in done:
                continue
            try:
                now = int(ray.get(ref))
            except ray.exceptions.RayError:  # a dead actor: its task's failure says so
                continue
            if now > counted.get(slot, 0):
                progress(now - counted.get(slot, 0))
                counted[slot] = now

    def map(self, task: RunSpec, indices: Iterable[int], load: Callable[[int], np.ndarray], group: int = 1,
            progress: Optional[Callable[[int], None]] = None) -> Iterator[Outcome]:
        """Outcomes of every image in ``indices`` (``load(idx)`` gives its image), in completion order.

        ``group`` > 1: each actor gets up to ``group`` images at a time and streams them through
        one scheduler run, their noisy samples sharing its calls (:func:`densepure_rt.scale.work.run_group`; same outcomes). An image
        whose actor died (with its group) is computed again by another actor; an error of the
        user's (a :class:`DensePureError` on an actor) is raised here as itself.

        ``progress(k)``: called with the noisy samples drawn since the last call (every
        :attr:`poll` seconds from the busy actors, and each image's rest when it completes; negative
        when a dead actor's counted samples are to be drawn again), so a bar moves within an image."""
        ray = self.ray
        group = int(group)
        if group < 1:
            raise ConfigError(f"images per call must be >= 1 (got {group})")
        todo = iter(indices)
        retry: deque = deque()
        pending: dict = {}
        counted: dict = {}  # slot -> samples of its work in flight already reported
        idle = [s for s in range(len(self.actors)) if self.actors[s] is not None][::-1]
        while True:
            while idle:
                work = []
                while len(work) < group:
                    idx = retry.popleft() if retry else next(todo, None)
                    if idx is None:
                        break
                    work.append(int(idx))
                if not work:
                    break
                slot = idle.pop()
                actor = self.actors[slot]
                if group == 1:
                    ref = actor.run.remote(task, load(work[0]), work[0])
                else:
                    ref = actor.run_group.remote(task, np.stack([load(i) for i in work]), work)
                pending[ref] = (slot, work)
                counted[slot] = 0
            if not pending:
                return
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.poll if progress is not None else None)
            if not ready:
                self._poll(pending, counted, progress)
                continue
            ref = ready[0]
            slot, work = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                if progress is not None and counted.get(slot):
                    progress(-counted[slot])  # those samples are drawn again elsewhere
                counted[slot] = 0
                retry.extend(work)
                self._replace(slot, _first_line(exc).split(". ")[0])
                if self.actors[slot] is not None:
                    idle.append(slot)
                continue
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, DensePureError):
                    raise cause from None
                raise EngineError(
                    f"images {work} failed on {self.info[slot]['host']}: {type(cause or exc).__name__}: {_first_line(cause or exc)}"
                ) from None
            rest = task.samples_per_image * len(work) - counted.get(slot, 0)
            if progress is not None and rest:
                # Sequential modes stop before n: the rest of the image's samples are not drawn.
                progress(rest)
            counted[slot] = 0
            idle.append(slot)
            yield from ([result] if group == 1 else result)
