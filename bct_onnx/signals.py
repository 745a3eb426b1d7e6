"""SIGTERM as an exception, so a terminated run cleans up (temporary files, partial outputs) as ^C does.

Light on purpose (no third-party imports): the command installs it before loading anything heavy.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from bct_onnx.errors import TerminatedError


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Within: SIGTERM raises TerminatedError, so ``finally`` blocks run as on KeyboardInterrupt.

    A no-op outside the main thread or when SIGTERM already has a handler (the command installs
    one for its whole run; library calls inside it then leave it alone).
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def raise_terminated(signum: int, frame: object) -> None:
        raise TerminatedError(signum)

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
