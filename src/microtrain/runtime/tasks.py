"""Independent trials (contribution-analysis trials, learning rates of a sweep) run in this process, in a pool of
spawned processes, or as Ray tasks, with the same results: a trial is a module-level function of picklable
arguments that computes everything from them (one torch thread each in a pool or on Ray).

Only public APIs: `multiprocessing` pools (`terminate()` stops running workers when interrupted) and
`ray.init` / `ray.remote` / `ray.wait` / `ray.get` / `ray.shutdown`.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from typing import Any

from microtrain.errors import MicrotrainError

RAY_MISSING = "--ray needs the optional package ray (pip install 'microtrain[ray]')"


def _call(job: tuple[Callable[..., Any], tuple]) -> Any:
    fn, args = job
    return fn(*args)


def run_tasks(fn: Callable[..., Any], args: Sequence[tuple], *, workers: int = 1, ray_address: str | None = None,
              on_result: Callable[[Any], None] | None = None) -> list[Any]:
    """Calls `fn(*a)` for every `a` and returns the results in completion order (`on_result` sees each as it
    arrives). ray_address: 'local' starts a private Ray instance with `workers` CPUs (shut down afterwards), 'auto'
    or host:port joins a running cluster (its workers must see the same files); otherwise workers > 1 uses a pool
    of spawned processes (the parent used torch threads: never fork it)."""
    results: list[Any] = []

    def done(r: Any) -> None:
        results.append(r)
        if on_result:
            on_result(r)

    if ray_address:
        _run_on_ray(fn, args, ray_address, workers, done)
    elif workers <= 1 or len(args) <= 1:
        for a in args:
            done(fn(*a))
    else:
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(args)))
        try:
            for r in pool.imap_unordered(_call, [(fn, a) for a in args]):
                done(r)
        except BaseException:
            pool.terminate()  # interrupted or a trial failed: stop the running trials now (finished ones are kept)
            raise
        else:
            pool.close()
        finally:
            pool.join()
    return results


def _run_on_ray(fn: Callable[..., Any], args: Sequence[tuple], address: str, workers: int,
                done: Callable[[Any], None]) -> None:
    try:
        import ray
    except ImportError:
        raise MicrotrainError(RAY_MISSING) from None
    started = not ray.is_initialized()
    if started:
        if address == "local":
            ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
    pending: list[Any] = []
    try:
        remote = ray.remote(num_cpus=1)(fn)
        pending = [remote.remote(*a) for a in args]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            done(ray.get(ready[0]))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()
