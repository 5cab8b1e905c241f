"""Resume a run from its directory alone, without ever overwriting its launch record.

`latentlab-train hydra.run.dir=<run> ckpt_path=last [more overrides]` relaunches with the run's own
overrides (`<run>/.hydra/overrides.yaml`) and the ones given now on top (a key given now replaces the
saved one), so an ALMOND run resumes as ALMOND without retyping `model=almond`. Hydra writes the
relaunch's record into `<run>/.hydra/resume-N/` instead of over `<run>/.hydra/`, so the original
launch record stays as it was; `resume-N/overrides.yaml` holds everything the relaunch ran with.

`ckpt_path=last` without a run directory picks the newest run of the same task *and* model (the
`model._target_` the command line composes) that has `checkpoints/last.ckpt`, names it, and says
when newer runs of other methods exist that the user may have meant.

This module runs before Hydra and before Lightning is imported: it reads YAML and file times only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from latentlab.errors import CheckpointError

LAST = "last.ckpt"
RECORD = ".hydra"
#: keys of a saved launch that a relaunch never inherits: where it runs and what it resumes are given now
NOT_INHERITED = ("hydra.run.dir", "hydra.output_subdir", "hydra.job.name", "ckpt_path")


def override_key(text: str) -> str:
    """The key an override sets (`model`, `trainer.max_epochs`, `model@x`), prefix (+, ++, ~) stripped."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    o = OverridesParser.create().parse_override(text)
    return o.key_or_group + (f"@{o.package}" if o.package else "")


def override_value(overrides: Sequence[str], key: str) -> str | None:
    """The (last) value given to `key`, quotes stripped, or None."""
    found = None
    for text in overrides:
        if text.split("=", 1)[0].lstrip("+~") == key and "=" in text:
            found = text.split("=", 1)[1].strip("'\"")
    return found


def merge_overrides(saved: Sequence[str], given: Sequence[str]) -> list[str]:
    """The saved launch's overrides with those given now on top: a key given now replaces the saved one."""
    given_keys = {override_key(o) for o in given}
    kept = [o for o in saved if (k := override_key(o)) not in given_keys and k not in NOT_INHERITED]
    return [*kept, *given]


def saved_overrides(run_dir: Path) -> list[str] | None:
    """The overrides a run was launched with (`.hydra/overrides.yaml`), None when it has no record."""
    path = run_dir / RECORD / "overrides.yaml"
    if not path.is_file():
        return None
    loaded = yaml.safe_load(path.read_text()) or []
    return [str(o) for o in loaded]


def next_resume_subdir(run_dir: Path) -> str:
    """`.hydra/resume-N` for the N-th relaunch into `run_dir` (1, 2, ...)."""
    taken = [int(m.group(1)) for p in (run_dir / RECORD).glob("resume-*") if (m := re.fullmatch(r"resume-(\d+)", p.name))]
    return f"{RECORD}/resume-{max(taken, default=0) + 1}"


def _target(run_dir: Path) -> str | None:
    try:
        cfg = yaml.safe_load((run_dir / RECORD / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    return (cfg.get("model") or {}).get("_target_")


def method_name(target: str | None) -> str:
    return (target or "?").rsplit(".", 1)[-1].lower()


def resumable_runs(runs_root: Path) -> list[tuple[Path, str | None, float]]:
    """(run dir, model target, time of its last checkpoint) of every run under `runs_root` with a
    `checkpoints/last.ckpt`, newest first."""
    runs = [(p.parent.parent, p.stat().st_mtime) for p in runs_root.glob(f"*/checkpoints/{LAST}") if p.is_file()]
    return [(d, _target(d), t) for d, t in sorted(runs, key=lambda r: r[1], reverse=True)]


def newest_run(runs_root: Path, target: str | None, explicit: bool, say: Callable[[str], None]) -> Path | None:
    """The newest run of `target` under `runs_root`; None when there is none (the caller's error applies).
    When the model was not chosen on the command line and newer runs of other methods exist, say so."""
    runs = resumable_runs(runs_root)
    same = [r for r in runs if r[1] == target]
    if not same:
        others = ", ".join(f"{method_name(t)}: {d}" for d, t, _ in runs[:3])
        if others:
            raise CheckpointError(f"ckpt_path=last: no run of method {method_name(target)} under {runs_root} has a "
                                  f"checkpoint (there are runs of other methods, newest first: {others}); pass "
                                  "model=<its method> or hydra.run.dir=<its run directory> ckpt_path=last")
        return None
    picked = same[0][0]
    newer = [r for r in runs if r[2] > same[0][2] and r[1] != target]
    if newer and not explicit:
        say(f"ckpt_path=last is ambiguous: resuming the newest {method_name(target)} run {picked} (the method this "
            f"command builds), but {newer[0][0]} of method {method_name(newer[0][1])} is newer; pass "
            f"model={method_name(newer[0][1])} or hydra.run.dir=<run dir> to resume that one")
    else:
        say(f"ckpt_path=last: resuming the newest {method_name(target)} run of this task, {picked}")
    return picked


def plan_relaunch(overrides: Sequence[str], compose: Callable[[list[str]], Any],
                  say: Callable[[str], None]) -> list[str]:
    """The overrides a single run actually launches with (see the module docstring).

    `compose(overrides)` gives the config (with its `hydra` node) the command line builds; it is only
    called for `ckpt_path=last` without a run directory, to find the task's runs and the model.
    """
    given = list(overrides)
    run_dir = override_value(given, "hydra.run.dir")
    ckpt = override_value(given, "ckpt_path")
    if run_dir is None and ckpt == "last":
        cfg = compose(given)
        runs_root = Path(str(cfg.hydra.run.dir)).parent
        target = (cfg.get("model") or {}).get("_target_")
        explicit = any(override_key(o) in ("model", "experiment") for o in given)
        picked = newest_run(runs_root, target, explicit, say)
        if picked is None:
            return given  # the run's own "no checkpoint" error explains what to do
        run_dir = str(picked)
        given.append(f"hydra.run.dir={picked}")
    if run_dir is None:
        return given
    saved = saved_overrides(Path(run_dir))
    if saved is None:
        return given
    merged = merge_overrides(saved, given) if ckpt not in (None, "", "null") else given
    if override_value(given, "hydra.output_subdir") is None:  # never over the run's own record
        merged.append(f"hydra.output_subdir={next_resume_subdir(Path(run_dir))}")
    return merged
