"""Where independent, deterministic calls run: in this process, a local process pool, or Ray.

An :class:`Executor` applies a function to a list of items and hands the results back to the
calling process (the *driver*), which alone writes anything to disk. Two backends:

- ``local`` (:class:`LocalExecutor`, the default, no extra dependency): ``jobs`` spawned worker
  processes (a ``ProcessPoolExecutor``, created on first use and kept until :meth:`Executor.close`);
  with ``jobs == 1``, or a single item, the calls run in this process, in order.
- ``ray`` (:class:`RayExecutor`, ``pip install l2o[ray]``): each call is a Ray task (1 CPU) on an
  existing cluster (``address``; also Ray's own ``RAY_ADDRESS``) or on a local Ray instance with
  ``jobs`` CPUs (default: this machine's). A task whose worker process dies (killed, out of
  memory, node lost) is retried up to ``max_retries`` times; an exception raised *by the
  function* is not retried (the functions are deterministic: it would raise again) and reaches
  the caller with its own type.

Contract for the mapped function (both backends rely on it, and it is what makes the backends
give identical results): a picklable callable — a module-level function, or a
``functools.partial`` of one, whose arguments are picklable — that is **deterministic given its
argument** (seed everything from the item; read no worker-global state that a previous call may
have changed) and returns a picklable value. Ray serialises the function once per
:meth:`~Executor.map_unordered` call (``ray.put``), so large shared inputs (policy weights) are
best bound with ``functools.partial`` rather than repeated in every item.

This module imports nothing from the rest of l2o (experiments, GPS and ES trainers all use it).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

BACKENDS: tuple[str, ...] = ("local", "ray")
DEFAULT_MAX_RETRIES = 3
RAY_EXTRA_HINT = "the ray backend needs `pip install l2o[ray]`"


class BackendUnavailableError(ImportError, ValueError):
    """The requested backend's package is not installed (a ``ValueError`` too, so a command line
    reports it in one line)."""


class WorkerLostError(RuntimeError):
    """A call's worker process died more often than the retries allow (results already handed
    back are unaffected)."""


def check_backend(backend: str, jobs: int | None = None, address: str | None = None) -> None:
    """Raise a one-line ``ValueError`` for an unknown backend, ``jobs < 1``, or an ``address``
    given to a backend other than ``ray``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown execution backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    if address is not None and backend != "ray":
        raise ValueError(f"address {address!r} is a Ray cluster's: it needs backend 'ray', not {backend!r}")
    if address is not None and not str(address).strip():
        raise ValueError("address must not be empty (e.g. 'auto' or 'ray://head-node:10001')")


def require_backend(backend: str) -> None:
    """Raise :class:`BackendUnavailableError` (with the install hint) now, before any work, if
    ``backend``'s package is not installed; importing it is left to the executor."""
    if backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise BackendUnavailableError(RAY_EXTRA_HINT)


def describe_execution(backend: str, jobs: int | None = None, address: str | None = None) -> str:
    """A phrase for documents: where the runs execute (e.g. ``2 worker processes``)."""
    if backend == "ray":
        where = f"the Ray cluster at {address}" if address else \
            f"a local Ray instance with {jobs or os.cpu_count() or 1} CPUs"
        cap = f", at most {jobs} at a time" if address and jobs else ""
        return f"Ray tasks (1 CPU each) on {where}{cap}"
    n = jobs or os.cpu_count() or 1
    return "this process" if n == 1 else f"{n} worker processes"


class Executor:
    """Applies a function to items; see the module docstring for the function's contract.

    Use as a context manager (or call :meth:`close`) to release workers. Results come back to
    the caller; an exception from the function propagates from the iteration that meets it, and
    leaving an iteration early (exception, ``break``, Ctrl-C) cancels the calls not yet finished.
    """

    backend: str = ""
    jobs: int | None = None

    def map_unordered(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[int, R]]:
        """Yield ``(index, fn(items[index]))`` for every item, as calls finish (any order)."""
        raise NotImplementedError

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``[fn(x) for x in items]``, computed by the workers; results in item order."""
        items = list(items)
        out: list[Any] = [None] * len(items)
        for i, r in self.map_unordered(fn, items):
            out[i] = r
        return out

    def describe(self) -> str:
        return describe_execution(self.backend, self.jobs, getattr(self, "address", None))

    def close(self) -> None:
        """Release the workers (idempotent); the executor can still be used afterwards (it restarts them)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class LocalExecutor(Executor):
    """``jobs`` spawned worker processes on this machine (``jobs == 1``: this process).

    The pool is started on the first call that needs it and reused until :meth:`close`, so
    repeated maps (one per figure, one per meta-training iteration) pay the start-up once.
    A worker that dies breaks the pool: that map raises ``concurrent.futures.process.BrokenProcessPool``
    and the next one starts a fresh pool.
    """

    backend = "local"

    def __init__(self, jobs: int | None = None) -> None:
        check_backend("local", jobs)
        self.jobs = jobs if jobs is not None else max(1, os.cpu_count() or 1)
        self._pool: cf.ProcessPoolExecutor | None = None

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(max_workers=self.jobs, mp_context=mp.get_context("spawn"))
        return self._pool

    def map_unordered(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[int, R]]:
        items = list(items)
        if self.jobs <= 1 or len(items) <= 1:
            for i, x in enumerate(items):
                yield i, fn(x)
            return
        pool = self._get_pool()
        futures = {pool.submit(fn, x): i for i, x in enumerate(items)}
        try:
            for fut in cf.as_completed(futures):
                try:
                    result = fut.result()
                except cf.process.BrokenProcessPool:
                    self._discard_pool()
                    raise
                yield futures[fut], result
        finally:
            for f in futures:
                f.cancel()

    def _discard_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise BackendUnavailableError(f"{RAY_EXTRA_HINT} (import ray failed: {e})") from None
    return ray


def _apply(fn: Callable[[T], R], item: T) -> R:
    """The body of every Ray task."""
    return fn(item)


class RayExecutor(Executor):
    """Each call a Ray task (1 CPU), retried up to ``max_retries`` times if its worker dies.

    Connects on first use: to ``address`` (``"auto"``, ``"ray://head:10001"``, or the
    ``RAY_ADDRESS`` environment variable when ``address`` is None), else starts a local instance
    with ``jobs`` CPUs (default: all of this machine's). If Ray is already initialised in this
    process (a test fixture, a notebook), that instance is used and left running at
    :meth:`close`; an instance this executor started is shut down there. ``jobs`` given with an
    address caps the calls in flight (a share of a busy cluster); otherwise the cluster's
    scheduler decides.
    """

    backend = "ray"

    def __init__(self, jobs: int | None = None, address: str | None = None,
                 max_retries: int = DEFAULT_MAX_RETRIES, init_kwargs: dict[str, Any] | None = None) -> None:
        check_backend("ray", jobs, address)
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self._ray = _import_ray()
        self.jobs = jobs
        self.address = address
        self.max_retries = max_retries
        self.init_kwargs = dict(init_kwargs or {})
        self._owns = False
        self._remote: Any = None

    def _connect(self) -> Any:
        ray = self._ray
        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS") or None
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, **self.init_kwargs}
            if address is None:
                kwargs.setdefault("num_cpus", self.jobs or max(1, os.cpu_count() or 1))
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError) as e:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise ValueError(f"cannot start or reach {where}: {str(e).splitlines()[0] if str(e) else e}") from e
            self._owns = True
        if self._remote is None:
            self._remote = ray.remote(_apply).options(num_cpus=1, max_retries=self.max_retries,
                                                      retry_exceptions=False)
        return ray

    def map_unordered(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[int, R]]:
        items = list(items)
        if not items:
            return
        ray = self._connect()
        from ray.exceptions import RayTaskError, TaskCancelledError, WorkerCrashedError

        try:
            from ray.exceptions import NodeDiedError, ObjectLostError
            lost: tuple[type[BaseException], ...] = (WorkerCrashedError, NodeDiedError, ObjectLostError)
        except ImportError:  # older Ray
            lost = (WorkerCrashedError,)
        fn_ref = ray.put(fn)  # shipped once, not once per task
        cap = self.jobs if (self.jobs and self.address) else len(items)
        todo = iter(enumerate(items))
        pending: dict[Any, int] = {}

        def submit(n: int) -> None:
            for _ in range(n):
                nxt = next(todo, None)
                if nxt is None:
                    return
                pending[self._remote.remote(fn_ref, nxt[1])] = nxt[0]

        try:
            submit(cap)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                ref = ready[0]
                i = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except RayTaskError as e:  # the function raised: re-raise it as its own type
                    cause = e.as_instanceof_cause()
                    raise cause from None
                except lost as e:
                    raise WorkerLostError(
                        f"item {i}: its Ray worker died {self.max_retries + 1} time(s) "
                        f"(max_retries={self.max_retries}): {type(e).__name__}") from e
                except TaskCancelledError as e:
                    raise WorkerLostError(f"item {i}: its Ray task was cancelled") from e
                submit(1)
                yield i, result
        finally:
            for ref in pending:
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - best effort: the task may just have finished
                    pass

    def close(self) -> None:
        self._remote = None
        if self._owns:
            self._owns = False
            if self._ray.is_initialized():
                self._ray.shutdown()


def make_executor(backend: str = "local", jobs: int | None = None, address: str | None = None,
                  max_retries: int = DEFAULT_MAX_RETRIES) -> Executor:
    """The executor for ``backend`` (``"local"`` or ``"ray"``); see the classes for ``jobs`` and
    ``address``. Raises ``ValueError`` for a bad combination and :class:`BackendUnavailableError`
    (with the install hint) when Ray is asked for but not installed."""
    check_backend(backend, jobs, address)
    if backend == "ray":
        return RayExecutor(jobs=jobs, address=address, max_retries=max_retries)
    return LocalExecutor(jobs=jobs)


__all__: Sequence[str] = ("BACKENDS", "BackendUnavailableError", "Executor", "LocalExecutor", "RayExecutor",
                          "WorkerLostError", "check_backend", "describe_execution", "make_executor", "require_backend")
