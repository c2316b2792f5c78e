"""Progress you can read: tqdm bars (rate, ETA) when a person watches the terminal, plain lines in logs.

`progress_enabled()` decides, once for everything: RAYROBUST_PROGRESS=1 forces bars on, RAYROBUST_PROGRESS=0
forces them off; otherwise bars are drawn when stderr is a terminal (never in CI, `ray job submit` logs or
pytest, which keep their one line per stage step), and never by a Ray worker on its own (its stderr is a log
file). `Bar` is the one bar type: tqdm on stderr in the driver; in a Ray worker (a Ray Train rank, told by the
driver that the driver is interactive) Ray's distributed tqdm, which the driver draws; nothing when disabled.

    >>> with Bar(total=len(batches), desc="epoch 1/3", unit="batch") as bar:
    ...     for b in batches:
    ...         step(b)
    ...         bar.update()
"""
from __future__ import annotations

import os
import sys
from typing import Dict, Optional, Sequence

ENV = "RAYROBUST_PROGRESS"
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def in_ray_worker() -> bool:
    """Whether this process is a Ray worker (a task, an actor, a Ray Train rank), not a driver."""
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        from ray._private.worker import global_worker

        return global_worker.mode == ray.WORKER_MODE
    except Exception:
        return False


def progress_enabled(stream=None) -> bool:
    """Draw progress bars? RAYROBUST_PROGRESS=1/0 forces it; otherwise only when `stream` (default: stderr)
    is a terminal and this process is not a Ray worker."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in _ON:
        return True
    if forced in _OFF:
        return False
    if in_ray_worker():
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Bar:
    """A progress bar, or nothing when disabled (`enabled=None`: `progress_enabled()`).

    tqdm on stderr (rate and ETA; `unit` names what is counted, e.g. "img" gives "img/s"); inside a Ray worker,
    `ray.experimental.tqdm_ray` (the driver draws it). `postfix(text)` shows a short status after the counts.
    """

    def __init__(self, total: Optional[int] = None, desc: str = "", unit: str = "it", *,
                 enabled: Optional[bool] = None, leave: bool = True, initial: int = 0):
        self.enabled = progress_enabled() if enabled is None else bool(enabled)
        self.desc = desc
        self._bar = None
        self._ray = False
        if not self.enabled:
            return
        if in_ray_worker():
            from ray.experimental.tqdm_ray import tqdm as ray_tqdm

            self._bar, self._ray = ray_tqdm(total=total, desc=desc, unit=unit), True
            if initial:
                self._bar.update(initial)
        else:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=sys.stderr,
                             dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int = 1) -> None:
        if self._bar is not None and n:
            self._bar.update(n)

    def set_count(self, n: int) -> None:
        """Move the count to `n` (a total recounted elsewhere, e.g. trials finished)."""
        if self._bar is not None and n != self._bar.n:
            self.update(n - self._bar.n)

    def postfix(self, text: str) -> None:
        if self._bar is None:
            return
        if self._ray:  # Ray's tqdm has no postfix: it rides on the description
            self._bar.set_description(f"{self.desc} {text}".strip())
        else:
            self._bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def robust_left(counts: Dict[str, int], attacks: Sequence[str], n: int) -> str:
    """The postfix of an attack bar: robust points left after each stage, e.g.
    "robust left: clean 91, apgd-ce 62, apgd-t 60 of 100"."""
    stages = [s for s in ("clean", *attacks) if s in counts]
    return "robust left: " + ", ".join(f"{s} {counts[s]}" for s in stages) + f" of {n}"


class AttackBar:
    """A bar over attacked images that shows, per attack stage, how many of the images done so far are
    still robust. `chunk(broken_by)` adds a finished chunk's per-example outcome ("clean", the name of the
    attack that broke it, or None); `stage(name, left, of)` shows a running chunk's stages as they finish."""

    def __init__(self, total: int, attacks: Sequence[str], desc: str, *, enabled: Optional[bool] = None):
        self.attacks = list(attacks)
        self.bar = Bar(total=total, desc=desc, unit="img", enabled=enabled)
        self.enabled = self.bar.enabled
        self.done = 0
        self.broken: Dict[str, int] = {"clean": 0, **{a: 0 for a in self.attacks}}

    def counts(self) -> Dict[str, int]:
        left, out = self.done, {}
        for stage in ("clean", *self.attacks):
            left -= self.broken.get(stage, 0)
            out[stage] = left
        return out

    def chunk(self, broken_by: Sequence[Optional[str]]) -> None:
        for b in broken_by:
            if b is not None:
                self.broken[b] = self.broken.get(b, 0) + 1
        self.done += len(broken_by)
        self.bar.postfix(robust_left(self.counts(), self.attacks, self.done))
        self.bar.update(len(broken_by))

    def stage(self, name: str, left: int, of: int) -> None:
        done = f"{robust_left(self.counts(), self.attacks, self.done)}; " if self.done else ""
        self.bar.postfix(f"{done}chunk: {left}/{of} robust after {name}")
        if self.bar._bar is not None and not self.bar._ray:
            self.bar._bar.refresh()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "AttackBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
