"""How a daptq worker process starts: it dies with its parent, and leaves no named semaphore behind.

A leaf module (imports nothing from daptq, nor torch), so a spawned worker runs this within a fraction of a
second of starting, before it imports the heavy modules its real initializer needs: a parent killed while
its workers load their models leaves none of them running.

Killed (SIGKILL, SIGTERM, out of memory), a parent cannot stop its workers, and a worker blocked reading its
job pipe would wait forever (it holds the pipe's write end too, so it never sees end-of-file). So each worker
asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG`` on Linux) and watches its parent id
besides (other systems; workers started from a thread, which the kernel signals when that thread ends).
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_POLL_S = 1.0  # how often a worker's watchdog checks that its parent lives


def die_with_parent(parent: int, kernel_signal: bool = True) -> None:
    """End this process when process ``parent`` ends (call first thing in a child of ``parent``).

    ``kernel_signal``: ask Linux for SIGKILL at the parent's death (prctl; the kernel sends it when the
    *thread* that started this process ends, so only for a child started by the parent's main thread). A
    watchdog thread polls the parent id in every case, and the parent id is checked once after the prctl, in
    case the parent died before it."""
    if kernel_signal and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the watchdog alone
            pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="daptq-parent-watchdog", daemon=True).start()


def thread_lock_for_tqdm() -> None:
    """Give tqdm a threading lock: its default also creates a multiprocessing lock, a named semaphore that a
    worker terminated mid-task never releases (the resource tracker then warns of a "leaked semaphore" at
    exit). Bars of different workers need no shared lock: each writes its own lines."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


def function_name(fn: Callable | None) -> str | None:
    """ "module:qualname" of a module-level function (what ``start_worker`` imports), None for None."""
    if fn is None:
        return None
    name = f"{fn.__module__}:{fn.__qualname__}"
    if "<" in name:
        raise ValueError(f"a worker initializer must be a module-level function, got {name}")
    return name


def start_worker(
    parent: int, kernel_signal: bool, initializer: str | None, initargs: tuple[Any, ...]
) -> None:
    """A pool's initializer: ``die_with_parent``, tqdm's lock, then ``initializer`` ("module:qualname",
    imported only now, after the first two are in place) with ``initargs``."""
    die_with_parent(parent, kernel_signal)
    thread_lock_for_tqdm()
    if initializer is not None:
        module, _, qualname = initializer.partition(":")
        fn: Any = importlib.import_module(module)
        for part in qualname.split("."):
            fn = getattr(fn, part)
        fn(*initargs)
