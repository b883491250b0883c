"""How a run stops: Ctrl-C and SIGTERM as stop levels the driver loop reads, and the error an
interrupted run ends with (exit 130 after Ctrl-C, 143 after SIGTERM, so scripts can tell it from
a finished run)."""

from __future__ import annotations

import contextlib
import signal
import threading

import optuna

from mergetune.core.errors import MergetuneError


class RunInterrupted(MergetuneError):
    """The run was stopped by Ctrl-C or SIGTERM; the study is consistent and can be resumed."""

    def __init__(self, message: str, exit_code: int, study: optuna.Study | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.study = study


class StopSignals:
    """Ctrl-C and SIGTERM as stop levels: 1 = dispatch no more, 2 = abandon in-flight trials now.

    Outside `graceful()` (start-up), and at the third signal, they raise KeyboardInterrupt."""

    def __init__(self) -> None:
        self.level = 0
        self.signals: list[int] = []
        self._graceful = False
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int:
        return 143 if signal.SIGTERM in self.signals else 130

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def reinstall(self) -> None:
        """Take the signals back (ray.init installs its own SIGTERM handler)."""
        for sig in self._previous:
            signal.signal(sig, self._on_signal)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @contextlib.contextmanager
    def graceful(self):
        self._graceful = True
        try:
            yield self
        finally:
            self._graceful = False

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self.signals.append(signum)
        if not self._graceful or len(self.signals) >= 3:
            raise KeyboardInterrupt
        self.level = max(self.level + 1, 2 if signum == signal.SIGTERM else 1)
