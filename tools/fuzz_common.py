"""What the two fuzzers share (tools/fuzz_cli.py, tools/fuzz_ops.py): limits of one case's process,
running cases a few at a time, and the table of outcomes."""

from __future__ import annotations

import concurrent.futures
import json
import os
import resource
import select
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

MEMORY_LIMIT_BYTES = 4 << 30

Item = TypeVar("Item")


def sanitized() -> bool:
    """True when a sanitizer runtime is preloaded: AddressSanitizer reserves terabytes of address
    space for its shadow memory, so an address-space limit would break it (it has its own checks)."""
    return "libasan" in os.environ.get("LD_PRELOAD", "")


def limit_memory() -> None:
    """Cap the calling process's address space (a subprocess's preexec_fn, or a forked child)."""
    if not sanitized():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


def run_threaded(
    run_one: Callable[[Item], dict[str, Any]], items: Sequence[Item], jobs: int = 2
) -> list[dict[str, Any]]:
    """run_one(item) for every item, ``jobs`` at a time (each starts its own subprocess); results in order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(run_one, items))


def run_forked(
    run_one: Callable[[Item], dict[str, Any]],
    items: Sequence[Item],
    *,
    jobs: int = 2,
    timeout: float = 60.0,
    on_result: Callable[[Item, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """run_one(item) in a forked child per item (memory limited), ``jobs`` at a time, from one thread.

    Forking shares what the parent imported, so a case costs milliseconds instead of a Python start-up.
    The child sends run_one's result (JSON) through a pipe; a child killed by a signal gives
    ``{"outcome": "crash"}``, one still running after ``timeout`` seconds ``{"outcome": "hang"}``.
    The parent must not have started threads (no ONNX Runtime session): only run_one, in the child,
    does that.
    """
    results: list[dict[str, Any] | None] = [None] * len(items)
    pending = list(enumerate(items))[::-1]
    running: dict[int, tuple[int, int, float, bytearray]] = {}  # pid -> (index, read fd, start, data)
    while pending or running:
        while pending and len(running) < max(1, jobs):
            index, item = pending.pop()
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: never returns into the caller's code
                status = 0
                try:
                    os.close(read_fd)
                    limit_memory()
                    payload = json.dumps(run_one(item), default=str).encode()
                    with os.fdopen(write_fd, "wb") as pipe:
                        pipe.write(payload)
                except BaseException as exc:  # noqa: BLE001  # report, then leave without unwinding
                    try:
                        os.write(write_fd, json.dumps({"outcome": "fuzzer-error", "detail": repr(exc)}).encode())
                    except OSError:
                        pass
                    status = 1
                os._exit(status)
            os.close(write_fd)
            running[pid] = (index, read_fd, time.monotonic(), bytearray())
        fds = {entry[1]: pid for pid, entry in running.items()}
        ready, _, _ = select.select(list(fds), [], [], 0.2)
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            running[fds[fd]][3].extend(chunk)
        for pid in list(running):
            index, fd, start, data = running[pid]
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0 and time.monotonic() - start < timeout:
                continue
            if done == 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                result: dict[str, Any] = {"outcome": "hang", "detail": f"no result after {timeout:.0f} s"}
            else:
                while chunk := os.read(fd, 1 << 16):
                    data.extend(chunk)
                if os.WIFSIGNALED(status):
                    sig = signal.Signals(os.WTERMSIG(status)).name
                    result = {"outcome": "crash", "detail": f"killed by {sig}"}
                elif not data:
                    result = {"outcome": "crash", "detail": f"exit {os.WEXITSTATUS(status)} without a result"}
                else:
                    result = json.loads(data.decode())
            os.close(fd)
            del running[pid]
            results[index] = result
            if on_result is not None:
                on_result(items[index], result)
    return [r for r in results if r is not None]


def table(results: Iterable[dict[str, Any]], outcomes: Sequence[str]) -> str:
    """Markdown table: cases per outcome (in the order of ``outcomes``, then any other), and the total."""
    counts = Counter(str(r["outcome"]) for r in results)
    names = [*outcomes, *sorted(set(counts) - set(outcomes))]
    rows = [f"| {name} | {counts[name]} |" for name in names if counts.get(name)]
    return "\n".join(["| outcome | cases |", "|---|---|", *rows, f"| total | {sum(counts.values())} |"])
