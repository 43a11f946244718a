"""Child processes that die with the step that started them, SIGKILL included.

A step killed outright (SIGKILL from a timed-out or killed Airflow task, the OOM killer) runs
no cleanup: its ProcessPoolExecutor workers and the programs it ran were reparented to PID 1
and lived on for good (~75 MB each, ignoring SIGTERM). So every child the steps start, and
the step the local runner starts for an Airflow task, asks the kernel, on Linux, to SIGKILL
it when its parent dies: prctl(PR_SET_PDEATHSIG, SIGKILL). After asking, the child checks
that its parent is still the one that started it: a parent that died before the request
would otherwise leave it an orphan after all. Elsewhere this is a no-op.

Two kernel rules shape the use:
* The signal fires when the *thread* that forked the child ends, not its process. The steps
  create their pools and subprocesses from their main thread, which lives as long as the step;
  a child forked from a short-lived thread would be killed when that thread returns. (A "fork"
  ProcessPoolExecutor forks all its workers when first used, from the caller's thread; only
  with max_tasks_per_child would its manager thread fork replacements.)
* The setting is kept across execve (but for set-uid programs) and cleared in a forked child,
  so it covers a program the step runs (`preexec_fn`) but not that program's own children:
  `module_command` (`python -m bertdistill.children PARENT_PID -m MODULE ARGS`) sets it in
  every process a Python program forks, too.
"""

from __future__ import annotations

import ctypes
import functools
import os
import runpy
import signal
import sys
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_forking_pid = 0  # the pid of the process forking, noted just before the fork (see _die_with_forker)


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl on Linux, else None; looked up in the parent, so a forked child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.restype = ctypes.c_int
    return prctl


def die_with_parent(parent: int) -> None:
    """In a child of `parent`: be SIGKILLed when it dies, and exit now if it already has."""
    prctl = _prctl()
    if prctl is None:
        return
    if prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0) != 0:
        return  # not refused on any Linux we know; the child then just lives as it did before
    if os.getppid() != parent:  # the parent died between fork and prctl: nobody will signal us
        os._exit(1)


def preexec_fn() -> Callable[[], None]:
    """A `subprocess.Popen(preexec_fn=...)` for a child that must die with this process.

    It runs in the child between fork and exec, so it calls only prctl (looked up here, before the
    fork) and getppid: no imports, no locks another thread of the parent could have held.
    """
    _prctl()  # resolved before the fork: the child should not load libraries between fork and exec
    return functools.partial(die_with_parent, os.getpid())


def pool_initializer(parent: int, initializer: Callable[..., object] | None = None, *initargs: Any) -> None:
    """A process pool's initializer that ties each worker to `parent` (the step), then runs `initializer`.

    Module-level and given the parent's pid as an argument, so a "spawn" pool can pickle it too:
    `ProcessPoolExecutor(initializer=pool_initializer, initargs=(os.getpid(), init, *args))`.
    Not for a "forkserver" pool, whose workers are the server's children: they would exit at once.
    """
    die_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)


def _note_forking_pid() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _die_with_forker() -> None:
    """After a fork, in the child: die with the process that forked it (noted before the fork)."""
    die_with_parent(_forking_pid)


def run_module_dying_with_parent(parent: int, module: str, args: list[str]) -> None:
    """Run `module` as __main__ (like `python -m`) with this process and every process it forks tied to
    its parent: a program the step runs whose workers would otherwise outlive it (WikiExtractor's)."""
    die_with_parent(parent)
    os.register_at_fork(before=_note_forking_pid, after_in_child=_die_with_forker)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def module_command(module: str, *args: str) -> list[str]:
    """`python -m module ARGS` through this module, so the program and all it forks die with this process."""
    return [sys.executable, "-m", "bertdistill.children", str(os.getpid()), "-m", module, *args]


def main(argv: list[str]) -> None:
    """`python -m bertdistill.children PARENT_PID -m MODULE ARGS`."""
    if len(argv) < 3 or not argv[0].isdigit() or argv[1] != "-m":
        raise SystemExit("usage: python -m bertdistill.children PARENT_PID -m MODULE [ARGS...]")
    run_module_dying_with_parent(int(argv[0]), argv[2], argv[3:])


if __name__ == "__main__":
    main(sys.argv[1:])
