"""Progress reporting: rich progress bars for the CLI, silence for library calls."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


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
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Task]:
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

    def log(self, message: str) -> None:
        self.progress.console.print(message)
