"""`invnet.fit`'s progress display: a tqdm bar over epochs that says when it is compiling.

The first step of a run traces the model and has XLA compile it, which can take from a
second to minutes for a large image flow; without a word the bar would sit at 0%. While
that first step compiles, the bar reads ``invnet.fit: compiling... 12s`` (refreshed every
half second from a helper thread: the compile itself holds no Python lock); afterwards the
compile time stays in the bar's postfix next to the losses (``compile=12.3s``) and in
`History.compile_seconds`.
"""

from __future__ import annotations

import threading
import time

from tqdm.auto import tqdm

from invnet.training.state import History

_SHOWN_FROM = 0.5  # compile seconds worth a mention in the postfix


class Progress:
    """The epoch bar of one `invnet.fit` call (a no-op display with ``enabled=False``)."""

    def __init__(self, epochs: range, history: History, *, enabled: bool):
        self.history, self.enabled = history, enabled
        self.bar = tqdm(epochs, desc="invnet.fit", unit="epoch", disable=not enabled,
                        leave=False)  # fmt: skip
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def __iter__(self):
        return iter(self.bar)

    def compiling(self, started: bool) -> None:
        """Called before (``True``) and after (``False``) the run's first step."""
        if started:
            self._t0 = time.perf_counter()
            if self.enabled:
                self.bar.set_description("invnet.fit: compiling...", refresh=True)
                self._stop.clear()
                self._thread = threading.Thread(target=self._tick, daemon=True)
                self._thread.start()
            return
        self.history.compile_seconds += time.perf_counter() - self._t0
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.bar.set_description("invnet.fit", refresh=False)
            self.bar.set_postfix(self._compile_postfix(), refresh=True)

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            seconds = time.perf_counter() - self._t0
            self.bar.set_description(f"invnet.fit: compiling... {seconds:.0f}s", refresh=True)

    def _compile_postfix(self) -> dict[str, str]:
        seconds = self.history.compile_seconds
        return {"compile": f"{seconds:.1f}s"} if seconds >= _SHOWN_FROM else {}

    def epoch_done(self) -> None:
        history = self.history
        postfix = {"train": f"{history.train_loss[-1]:.4f}"}
        if history.val_loss:
            postfix["val"] = f"{history.val_loss[-1]:.4f}"
        self.bar.set_postfix({**postfix, **self._compile_postfix()}, refresh=False)

    def close(self) -> None:
        if self._thread is not None:  # interrupted while compiling
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.bar.close()
