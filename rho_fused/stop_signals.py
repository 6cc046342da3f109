"""SIGINT and SIGTERM as a request to stop at the next step boundary, not an abrupt end.

Inside `stop_requests()` the first SIGINT (Ctrl-C) or SIGTERM (a scheduler's) only sets
``StopRequest.signum``; a loop looks at it between steps, saves, and stops. A second signal of the
same kind while the request is pending ends the process at once, the usual way (Ctrl-C twice to
abort a save you don't want to wait for). Outside the main thread signals cannot be caught:
the block then does nothing and the default handlers stay.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """The first stop signal received (``signum``, 0 when none) and where the request was announced."""

    def __init__(self, announce: bool = True) -> None:
        self.signum = 0
        self.announce = announce

    def __bool__(self) -> bool:
        return self.signum != 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signum:  # the same signal again: stop now, the default way
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        if not self.signum:
            self.signum = signum
            if self.announce:
                print(
                    f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
                    f"(send it again to stop at once)",
                    file=sys.stderr,
                    flush=True,
                )


@contextlib.contextmanager
def stop_requests(announce: bool = True) -> Iterator[StopRequest]:
    """Catch SIGINT and SIGTERM for the duration of the block as a `StopRequest`; restore the handlers after."""
    request = StopRequest(announce)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._handle) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
