"""The one error path of every entry point (`latentlab-train`, `-eval`, `-sample`, `-reproduce`, ...).

Use it in two places of a Hydra entry point:

    @hydra.main(version_base="1.3", config_path="pkg://latentlab.conf", config_name="eval")
    @entry.job                      # under hydra.main: the task function of each (multi)run job
    def _hydra_main(cfg): return evaluate(cfg)

    def main(argv=None) -> None:
        entry.run(_hydra_main, preflight=check_my_argv, argv=argv)   # before Hydra makes a directory

What a user gets, the same from every entry point:

- bad input (any `LatentlabError`) ends with one line `latentlab: error: ...` on stderr and exit status 2;
- a single run refused before it started (`mark_started` not called) leaves no run directory: the
  directory Hydra made for it (`.hydra/`, the job log) is removed unless it existed before the command;
- a run that fails after it started keeps its directory with a `FAILED` file holding the error line;
- in a multirun a failing job (user error or crash) is reported, marked `FAILED`, and the sweep goes on
  (Hydra records the job as failed; Optuna a failed trial);
- a preempted run (`Preempted`, e.g. SIGTERM from Slurm) exits with `EXIT_PREEMPTED` and a `PREEMPTED` file;
- the console shows each Lightning message once (through Hydra's handlers) and no third-party tips.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from latentlab.errors import LatentlabError, Preempted

log = logging.getLogger("latentlab")

EXIT_USAGE = 2
#: 128 + SIGTERM, what a shell reports for a terminated job: "preempted, resume with ckpt_path=last".
EXIT_PREEMPTED = 143
FAILED, PREEMPTED = "FAILED", "PREEMPTED"
HYDRA_OWN = {".hydra"}  # what Hydra writes before the task function runs (plus `<job name>.log`)

T = TypeVar("T")


_existing_dirs: set[Path] = set()
_started = False


def remember_existing(path: str | Path) -> None:
    """Note that `path` existed before this command, so a refused command never deletes it."""
    p = Path(path).resolve()
    if p.exists():
        _existing_dirs.add(p)


def mark_started() -> None:
    """Call when the job starts producing results (training begins): from now on a failure keeps the
    run directory, marked FAILED, instead of removing it."""
    global _started
    _started = True


def is_main_process() -> bool:
    """Rank 0 (or not distributed): the process that speaks for a DDP job."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def say(message: str) -> None:
    """A one-line message for the person at the console, from one process only."""
    if is_main_process():
        print(f"latentlab: {message}", file=sys.stderr, flush=True)


def report(exc: BaseException) -> NoReturn:
    """The one way a user error reaches the user: one line on stderr, exit status 2."""
    say(f"error: {exc}")
    raise SystemExit(EXIT_USAGE)


def _hydra() -> Any | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def in_multirun() -> bool:
    from hydra.types import RunMode

    hc = _hydra()
    return hc is not None and hc.mode == RunMode.MULTIRUN


def _output_dir() -> Path | None:
    hc = _hydra()
    return Path(hc.runtime.output_dir) if hc is not None else None


def write_marker(name: str, text: str) -> None:
    out = _output_dir()
    if out is not None and out.is_dir() and is_main_process():
        (out / name).write_text(text.rstrip("\n") + "\n")


def _remove_unstarted_run_dir() -> None:
    """Remove what Hydra made for a refused single run: only a directory new to this command holding
    nothing but Hydra's own files (a resumed run's directory is never touched beyond its resume record)."""
    out, hc = _output_dir(), _hydra()
    if out is None or not out.is_dir() or not is_main_process():
        return
    own = HYDRA_OWN | {f"{hc.job.name}.log"}
    subdir = hc.output_subdir
    if out.resolve() in _existing_dirs:
        if subdir and subdir != ".hydra" and subdir.startswith(".hydra/"):  # this attempt's resume record
            shutil.rmtree(out / subdir, ignore_errors=True)
        return
    if all(p.name in own for p in out.iterdir()):
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)
                        and Path(h.baseFilename).parent == out]:  # the job log: close it, then remove it
            root.removeHandler(handler)
            handler.close()
        shutil.rmtree(out, ignore_errors=True)


def quiet_console() -> None:
    """Each Lightning message once: Lightning adds its own stderr handler when it is imported before
    Hydra has configured logging; route its loggers through Hydra's handlers instead. Drop Lightning's
    advertising tips and a deprecation warning that Lightning itself triggers on recent torch."""
    if not logging.getLogger().handlers:
        return  # outside a Hydra app (notebooks, tests): Lightning's own handler is the only one
    import lightning  # noqa: F401 - deferred (start-up time); imported now so that its handler exists to remove
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        if not any(isinstance(f, _NoTips) for f in logging.getLogger(name).filters):
            logging.getLogger(name).addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in str(record.msg)


def job(task: Callable[..., T]) -> Callable[..., T]:
    """Wrap a Hydra task function with the error path described in the module docstring."""

    @functools.wraps(task)
    def wrapper(cfg: Any) -> T:
        global _started
        _started = False
        quiet_console()
        try:
            return task(cfg)
        except Preempted as exc:
            write_marker(PREEMPTED, str(exc))
            say(f"preempted: {exc}")
            raise SystemExit(EXIT_PREEMPTED) from None
        except LatentlabError as exc:
            if in_multirun():  # one bad job must not end the sweep
                write_marker(FAILED, f"latentlab: error: {exc}")
                say(f"error: {exc}")
                raise RuntimeError(f"job failed: {exc}") from None
            if _started:
                write_marker(FAILED, f"latentlab: error: {exc}")
            else:
                _remove_unstarted_run_dir()
            report(exc)
        except Exception as exc:
            line = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            write_marker(FAILED, line)
            if in_multirun():
                say(f"error: job failed: {line}")
            raise

    return wrapper


def run(hydra_main: Callable[[], Any], preflight: Callable[[list[str]], Sequence[str] | None] | None = None,
        argv: Sequence[str] | None = None) -> None:
    """Check the command line (`preflight` may return a rewritten one), then run the Hydra app.

    A run directory named on the command line (`hydra.run.dir=...`) that exists already is remembered,
    so that a refused command never removes it.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        new = preflight(args) if preflight is not None else None
    except LatentlabError as exc:
        report(exc)
    if new is not None:
        args = list(new)
    for a in args:
        if a.startswith("hydra.run.dir="):
            remember_existing(a.split("=", 1)[1].strip("'\""))
    sys.argv[1:] = args  # Hydra reads sys.argv; so does Lightning when it relaunches DDP ranks
    hydra_main()
