"""Progress reporting: rich progress bars for the CLI, silence for library calls.

When stderr is not a terminal (a log file, CI) live bars would print nothing until the end, so the
CLI's reporter writes plain lines instead: one when a task starts, then its count at most every
LINE_SECONDS and when it completes.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

LINE_SECONDS = 5.0


class Reporter:
    """Silent reporter; the base for the CLI's rich one. Tasks are named bars with a total."""

    @contextmanager
    def task(self, description: str, total: int) -> Iterator["Task"]:
        yield Task()

    def log(self, message: str) -> None:
        pass


class Task:
    def advance(self, steps: int = 1, status: str | None = None) -> None:
        pass


class RichReporter(Reporter):
    """Nested rich progress bars on stderr, plus log lines above them."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            transient=False,
        )

    def __enter__(self) -> "RichReporter":
        if self.console.is_terminal:  # in a file, progress is plain lines: no live display to start
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.console.is_terminal:
            self.progress.stop()

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Task]:
        if not self.console.is_terminal:
            with self._line_task(description, total) as task:
                yield task
            return
        task_id = self.progress.add_task(description, total=total, status="")
        progress = self.progress

        class _RichTask(Task):
            def advance(self, steps: int = 1, status: str | None = None) -> None:
                fields = {"status": status} if status is not None else {}
                progress.update(task_id, advance=steps, **fields)

        try:
            yield _RichTask()
        finally:
            progress.remove_task(task_id)

    @contextmanager
    def _line_task(self, description: str, total: int) -> Iterator[Task]:
        console, start = self.console, time.perf_counter()
        state = {"done": 0, "printed": start}
        label = description.strip()

        class _LineTask(Task):
            def advance(self, steps: int = 1, status: str | None = None) -> None:
                state["done"] += steps
                now = time.perf_counter()
                if state["done"] >= total or now - state["printed"] >= LINE_SECONDS:
                    state["printed"] = now
                    console.print(f"{label} {state['done']}/{total} {now - start:.0f}s {status or ''}".rstrip(),
                                  highlight=False, soft_wrap=True)

        yield _LineTask()

    def log(self, message: str) -> None:
        self.progress.console.print(message)
