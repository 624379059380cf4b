"""The local backend's worker processes: a spawn pool that survives the death of a worker.

``multiprocessing.Pool`` replaces a worker that dies (killed, out of memory) but drops the group it was
running, so the run would wait for it forever. ``concurrent.futures.ProcessPoolExecutor`` instead fails
every unfinished future of the pool (``BrokenProcessPool``); the groups those futures held are handed to a
fresh pool, at most ``MAX_RESTARTS_PER_WORKER`` times per worker. As with the Ray backend, a group's results
are committed only when they arrive, so a death loses and duplicates nothing.

Workers die with their parent (``daptq.lifeline``: set up before the worker imports its initializer's
module, so also while it loads its models). A pool with no group in flight is closed by letting its workers
exit normally, so what they created is released; workers get a threading lock for tqdm, so one terminated
mid-group leaks no named semaphore either (the "leaked semaphore objects" warning at exit).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from daptq.lifeline import function_name, start_worker

MAX_RESTARTS_PER_WORKER = 3


class LocalPool:
    """``processes`` spawn workers, each started with ``initializer(*initargs)`` as soon as the pool is made
    (so they load their policies while the caller validates), replaced all together by ``restart``."""

    def __init__(self, ctx: Any, processes: int, initializer: Callable | None = None, initargs: tuple = ()):
        self.ctx, self.processes, self.initializer, self.initargs = ctx, processes, initializer, initargs
        self.restarts = 0
        self._lock = threading.Lock()  # the feeder thread restarts, the caller closes
        self._closed = False
        self._executor: ProcessPoolExecutor | None = None
        self._start()

    def _start(self) -> None:
        # Every process is started here, in this thread (the executor spawns one per submit until it has
        # them all, and none later): the kernel's parent-death signal is tied to this thread.
        main = threading.current_thread() is threading.main_thread()
        self._executor = ProcessPoolExecutor(
            self.processes,
            mp_context=self.ctx,
            initializer=start_worker,  # imports self.initializer's module only after its own set-up
            initargs=(os.getpid(), main, function_name(self.initializer), self.initargs),
        )
        self._futures: set[Future] = set()
        for _ in range(self.processes):
            self._track(self._executor.submit(os.getpid))

    def _track(self, future: Future) -> Future:
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        return future

    def submit(self, fn: Callable, *args: Any) -> Future:
        executor = self._executor
        if self._closed or executor is None:
            raise RuntimeError("the worker pool is closed")
        return self._track(executor.submit(fn, *args))

    def restart(self) -> None:
        """Replace every worker (after one died, the executor accepts no more work)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            self.restarts += 1
            if self.restarts > MAX_RESTARTS_PER_WORKER * self.processes:
                raise RuntimeError(
                    f"evaluation workers died {self.restarts} times; giving up (finished episodes are "
                    "committed: --resume runs the rest)"
                )
            self._stop_workers()
            self._start()

    def close(self) -> None:
        """Stop the workers now, also mid-group; the pool takes no more work."""
        with self._lock:
            self._closed = True
            self._stop_workers()

    def _stop_workers(self) -> None:
        # Idle workers (every future done: no group, no start-up in flight) are shut down normally, so they
        # release what they hold. Otherwise a shutdown alone would wait for the groups running to end:
        # terminate the workers first, then let the shutdown join the executor's thread, which reaps them
        # (so their exit codes are known after).
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # The executor's own table of its processes (Python has no public accessor before 3.14).
        processes = list((getattr(executor, "_processes", None) or {}).values())
        if any(not f.done() for f in list(self._futures)):
            for process in processes:
                process.terminate()
        executor.shutdown(wait=True, cancel_futures=True)
        for process in processes:
            process.join(timeout=10)

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()  # the feeder's last item: every group it took has come back


def _broke(future: Future) -> bool:
    return future.cancelled() or isinstance(future.exception(), BrokenProcessPool)


class _Feeder(threading.Thread):
    """Keeps one group per pool worker in flight, taking the next from ``jobs`` (shared with the caller,
    which runs groups of its own) the moment one comes back, and re-submits the groups of a pool whose
    worker died to a fresh pool. Everything that comes back goes to ``finished``, in order, ``_DONE`` last."""

    def __init__(self, pool: LocalPool, fn: Callable, args: tuple, jobs: Iterator) -> None:
        super().__init__(name="daptq-eval-feeder", daemon=True)
        self.pool, self.fn, self.args, self.jobs = pool, fn, args, jobs
        self.finished: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.lock = threading.Lock()  # this thread and the caller share ``jobs``
        self.stopping = False

    def next_job(self) -> Any:
        with self.lock:
            return next(self.jobs, None)

    def run(self) -> None:
        in_flight: dict[Future, Any] = {}
        lost: list[Any] = []  # groups of a pool that broke, to re-run first
        try:
            while not self.stopping:
                broken = self._fill(in_flight, lost)
                if not broken:
                    if not in_flight:
                        self.finished.put(_DONE)
                        return
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    broken = any(_broke(f) for f in done)
                if broken:
                    # A broken pool fails every unfinished future; those that finished before keep their
                    # results, so nothing is run twice.
                    done, _ = wait(in_flight, return_when=ALL_COMPLETED)
                for future in done:
                    job = in_flight.pop(future)
                    if _broke(future):
                        lost.append(job)
                    elif (error := future.exception()) is not None:
                        self.finished.put(_Failed(error))
                        return
                    else:
                        self.finished.put(future.result())
                if broken and not self.stopping:
                    self.pool.restart()
        except BaseException as exc:  # the caller re-raises it
            self.finished.put(_Failed(exc))

    def _fill(self, in_flight: dict[Future, Any], lost: list[Any]) -> bool:
        """Submit groups until every worker holds one; True if the pool turned out broken."""
        while len(in_flight) < self.pool.processes:
            job = lost.pop() if lost else self.next_job()
            if job is None:
                return False
            try:
                in_flight[self.pool.submit(self.fn, *self.args, job)] = job
            except BrokenProcessPool:  # a worker died while none of its groups was in flight
                lost.append(job)
                return True
        return False

    def stop(self) -> None:
        self.stopping = True
        self.pool.close()
        self.join(timeout=30)


def pool_results(
    pool: LocalPool, fn: Callable, args: tuple, jobs: Iterator, local: Callable | None = None
) -> Iterator[Any]:
    """Yield what each group of ``jobs`` gives: ``fn(*args, group)`` on the pool's workers, ``local(group)``
    in this process (unless None), both taking groups as they free up. Groups that came back from the
    pool are yielded between this process's own. On leaving (done, an error, or the caller's ``close``) the
    pool is closed."""
    feeder = _Feeder(pool, fn, args, jobs)
    feeder.start()

    def take(item: Any) -> Any:
        if isinstance(item, _Failed):
            raise item.exc
        return item

    try:
        while True:
            while True:
                try:
                    item = feeder.finished.get_nowait()
                except queue.Empty:
                    break
                if item is _DONE:
                    return
                yield from take(item)
            job = None if local is None else feeder.next_job()
            if job is not None:
                yield from local(job)
                continue
            item = feeder.finished.get()
            if item is _DONE:
                return
            yield from take(item)
    finally:
        feeder.stop()
