"""Rich progress for the long evaluations that run outside Lightning's loops.

Lightning's (Rich) progress bar covers fit, validate and test. BDMC, the inference gaps, the classifier
that sample quality needs and the sample-quality pass itself run after `trainer.test`, from a minute to
an hour each: a person watching needs to see them move and how long is left. On a terminal Rich draws a
live bar; elsewhere (a log file, CI) it prints only the final state, one line per analysis.

Log messages written while a bar is live print above it: Rich redirects sys.stdout/stderr while live,
and `reroute_logging` points the logging handlers that hold the real streams at the redirected ones.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Rerouted = list[tuple[logging.StreamHandler, Any]]


def reroute_logging(rerouted: Rerouted | None = None) -> Rerouted:
    """Point root-logger stream handlers at the current sys.stdout/stderr (Rich's redirected streams while a
    live display runs); returns [(handler, original stream)] for `restore_logging`. Idempotent."""
    rerouted = [] if rerouted is None else rerouted
    real = {id(sys.__stdout__): "stdout", id(sys.__stderr__): "stderr"}
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and id(handler.stream) in real:
            current = getattr(sys, real[id(handler.stream)])
            if current is not handler.stream:
                rerouted.append((handler, handler.stream))
                handler.setStream(current)
    return rerouted


def restore_logging(rerouted: Rerouted) -> None:
    for handler, stream in rerouted:
        handler.setStream(stream)
    rerouted.clear()


@contextmanager
def progress(description: str, total: float, unit: str = "") -> Iterator[Callable[[float], None]]:
    """A bar for `total` units of work; yields `advance(n=1)`. Shares Rich's global console with Lightning's bar."""
    from rich import get_console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = get_console()
    # Rich allows one live display at a time: inside another (e.g. Lightning's bar, from a callback) stay silent
    if getattr(console, "_live_stack", None) or getattr(console, "_live", None):
        yield lambda n=1: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn(unit), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as bar:
        rerouted = reroute_logging()
        task = bar.add_task(description, total=total)
        try:
            yield lambda n=1: bar.advance(task, n)
        finally:
            restore_logging(rerouted)
