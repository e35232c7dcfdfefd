"""Crash points for testing crash consistency: the process ends with SIGKILL where a test says.

Every write of a run's state and of a saved checkpoint passes `reach(name)`. With
QUIPKIT_FAULT=name (or name:n) in the environment, the n-th arrival at that point (the first by
default) kills the process on the spot, as a power cut or the OOM killer would: tests then rerun the
same command and compare the result with an uninterrupted run, byte for byte.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_arrivals: Counter = Counter()


def reach(name: str) -> None:
    spec = os.environ.get("QUIPKIT_FAULT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _arrivals[name] += 1
    if _arrivals[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
