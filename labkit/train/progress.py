"""Progress of a loop: a tqdm bar in a terminal; in a Jupyter kernel one line of text updated in place (a
display handle), so that a saved notebook shows text, never a widget's fallback such as ``0%|  | 0/22``."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm


def in_kernel() -> bool:
    """True inside a Jupyter kernel (JupyterLab, papermill), where stdout is a notebook cell."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return shell is not None and hasattr(shell, "kernel")


class TextProgress:
    """``desc: i/n (p%), postfix, elapsed`` as one text/plain display, refreshed at most every ``mininterval``
    seconds; cleared at the end unless ``leave``."""

    def __init__(self, iterable: Iterable, desc: str = "", leave: bool = True, mininterval: float = 1.0):
        from IPython.display import display  # lazy: IPython is only there in a kernel

        self.iterable, self.desc, self.leave, self.mininterval = iterable, desc, leave, mininterval
        self.total = len(iterable) if hasattr(iterable, "__len__") else None
        self.n, self.postfix, self.start, self.shown = 0, "", time.perf_counter(), 0.0
        self.handle = display({"text/plain": self._line()}, raw=True, display_id=True)

    def _line(self) -> str:
        done = f"{self.n}/{self.total} ({100 * self.n // max(self.total, 1)}%)" if self.total else f"{self.n}"
        tail = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done}{tail}, {time.perf_counter() - self.start:.0f} s"

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if refresh:
            self._show()

    def _show(self) -> None:
        self.shown = time.perf_counter()
        self.handle.update({"text/plain": self._line()}, raw=True)

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.n += 1
            if time.perf_counter() - self.shown >= self.mininterval:
                self._show()
        self.handle.update({"text/plain": self._line() if self.leave else ""}, raw=True)


def progress(iterable: Iterable, desc: str = "", leave: bool = True, disable: bool = False,
             mininterval: float = 1.0):
    """The loop ``iterable`` with a progress display (text in a kernel, tqdm elsewhere); ``disable``: none."""
    if not disable and in_kernel():
        return TextProgress(iterable, desc, leave, mininterval)
    return tqdm(iterable, desc=desc, leave=leave, disable=disable, mininterval=mininterval)
