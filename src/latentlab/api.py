"""A small Python API over the Hydra apps, for notebooks and scripts.

    from latentlab import api
    metrics, run_dir = api.train(["model=vae", "trainer.max_epochs=5"])
    run = api.load_run(run_dir)                      # config, metrics.json, the CSV training curve
    metrics = api.evaluate(run_dir / "checkpoints/last.ckpt", ["eval.gaps=100"])
    model, datamodule = api.load_model(run_dir)     # any method, rebuilt from its checkpoint
    sweep = api.multirun(["model=vae,almond", "seed=1,2"])   # `latentlab-train -m ...` in a subprocess
    runs = api.load_sweep(sweep)

The same config tree and the same `train`/`evaluate` functions as `latentlab-train`/`latentlab-eval`:
a run started here writes the same run directory (`.hydra/config.yaml`, `checkpoints/last.ckpt`,
`metrics.json`, pictures), so everything that reads run directories reads these too. Multiruns go
through the real command line, because Hydra's sweepers and launchers (Optuna, submitit) only run
inside `hydra.main`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from latentlab.builders import compose_config

__all__ = ["Run", "compose", "evaluate", "load_model", "load_run", "load_sweep", "multirun", "torch_flags_kept", "train"]


def compose(overrides: Sequence[str] = (), output_dir: str | Path | None = None,
            config_name: str = "train") -> DictConfig:
    """The config `latentlab-train` (or `latentlab-eval` with `config_name="eval"`) would run with
    these overrides; `output_dir` stands in for the run directory Hydra would make."""
    return compose_config(list(overrides), output_dir, config_name)


def quote(value: str) -> str:
    """A string as a Hydra override value: quoted, since paths may hold `=`, `,` or spaces
    (Lightning's `epoch=0-step=3.ckpt`)."""
    return "'" + value.replace("'", "\\'") + "'"


def _default_run_dir(cfg: DictConfig) -> Path:
    """Where Hydra would put the run: outputs/<task_name>/runs/<timestamp>, relative to the cwd."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    return Path("outputs") / str(cfg.get("task_name", "train")) / "runs" / stamp


@contextlib.contextmanager
def torch_flags_kept() -> Iterator[None]:
    """A run sets torch's process-wide switches (`trainer.deterministic` turns deterministic algorithms on, latentlab
    their NaN fill off, Lightning cuDNN's benchmark mode): in a notebook the code after a run gets its own back."""
    import torch

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory, torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.utils.deterministic.fill_uninitialized_memory, torch.backends.cudnn.benchmark = saved[2], saved[3]


def _prepare(overrides: Sequence[str], run_dir: str | Path | None, config_name: str) -> tuple[DictConfig, Path]:
    cfg = compose(overrides, None, config_name)
    out = Path(run_dir) if run_dir is not None else _default_run_dir(cfg)
    out = out.resolve()
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    # what Hydra would have saved: the composed (unresolved) config and the overrides
    hydra_dir = out / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, hydra_dir / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), hydra_dir / "overrides.yaml")
    return cfg, out


def train(overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> tuple[dict[str, float], Path]:
    """Train in this process as `latentlab-train <overrides>` would; returns (final metrics, run directory).

    Errors are raised (a `latentlab.errors.LatentlabError` for bad input) rather than printed, so a
    notebook shows them where they happened. With `logger=wandb` each call is a W&B run of its own,
    finished (its files complete) when the call returns.
    """
    from latentlab.loggers import finish_wandb_run
    from latentlab.train import train as train_fn

    cfg, out = _prepare(overrides, run_dir, "train")
    try:
        with torch_flags_kept():
            return train_fn(cfg), out
    finally:
        finish_wandb_run()


def evaluate(ckpt_path: str | Path, overrides: Sequence[str] = (),
             run_dir: str | Path | None = None) -> dict[str, float]:
    """`latentlab-eval ckpt_path=<ckpt_path> <overrides>` in this process; returns the numeric metrics.

    Without `run_dir` the results go next to the checkpoint's run, in `<run>/eval/`."""
    from latentlab.evaluate import evaluate as evaluate_fn

    ckpt_path = Path(ckpt_path).resolve()
    if run_dir is None:
        run_dir = ckpt_path.parent.parent / "eval"
    cfg, _ = _prepare([f"ckpt_path={quote(str(ckpt_path))}", *overrides], run_dir, "eval")
    with torch_flags_kept():
        return evaluate_fn(cfg)


def load_model(path: str | Path, setup_data: bool = True) -> tuple[Any, Any]:
    """(model, data module) of a checkpoint or run directory, rebuilt from the config saved in the checkpoint
    (any method; weights loaded with `weights_only=True`), in eval mode. The data module is set up unless
    `setup_data=False`."""
    from latentlab.builders import build_datamodule, build_model
    from latentlab.evaluate import load_checkpoint

    path = Path(path)
    ckpt = load_checkpoint(path / "checkpoints" / "last.ckpt" if path.is_dir() else path)
    run_cfg = OmegaConf.create(ckpt["latentlab"]["config"])
    datamodule = build_datamodule(run_cfg)
    if setup_data:
        datamodule.prepare_data()
        datamodule.setup("test")
    model = build_model(run_cfg, datamodule)
    model.load_state_dict(ckpt["state_dict"])
    model.on_load_checkpoint(ckpt)
    return model.eval(), datamodule


def multirun(overrides: Sequence[str], sweep_dir: str | Path | None = None, cwd: str | Path | None = None,
             timeout: float | None = None, env: dict[str, str] | None = None) -> Path:
    """Run `latentlab-train -m <overrides>` in a subprocess and return its sweep directory.

    Raises `subprocess.CalledProcessError` (with the output) when the sweep fails.
    """
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    if sweep_dir is None:
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
        sweep_dir = cwd / "outputs" / "train" / "multiruns" / stamp
    sweep_dir = Path(sweep_dir).resolve()
    cmd = [sys.executable, "-m", "latentlab.train", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, check=False, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return sweep_dir


@dataclass
class Run:
    """What a run directory holds: its config, final metrics and logged history."""

    dir: Path
    config: DictConfig | None
    overrides: list[str]
    metrics: dict[str, Any]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    label: str = ""  # in a sweep: the overrides that set this job apart from the others

    @property
    def name(self) -> str:
        """`label`, else all the run's overrides, else the directory name."""
        return self.label or " ".join(self.overrides) or self.dir.name

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one logged metric, e.g. `train/loss` or `val/nll`."""
        points = self.history.get(key, [])
        return [s for s, _ in points], [v for _, v in points]


def read_csv_history(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning's CSVLogger file -> {metric: [(step, value), ...]} (empty cells skipped)."""
    history: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    history.setdefault(key, []).append((step, float(value)))
                except ValueError:
                    continue
    return history


def load_run(run_dir: str | Path) -> Run:
    """A run directory (from `latentlab-train`, a sweep job, or `train` above) as a `Run`."""
    run_dir = Path(run_dir)
    hydra_dir = run_dir / ".hydra"
    config = OmegaConf.load(hydra_dir / "config.yaml") if (hydra_dir / "config.yaml").is_file() else None
    overrides = [str(o) for o in OmegaConf.load(hydra_dir / "overrides.yaml")] \
        if (hydra_dir / "overrides.yaml").is_file() else []
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    csv_file = run_dir / "csv" / "metrics.csv"
    history = read_csv_history(csv_file) if csv_file.is_file() else {}
    return Run(run_dir, config, overrides, metrics, history)  # type: ignore[arg-type]


def load_sweep(sweep_dir: str | Path) -> list[Run]:
    """Every job of a multirun (directories holding `.hydra/`), in job order (job 10 after job 9)."""
    from latentlab.sweeps import job_dirs, split_overrides

    runs = [load_run(d) for d in job_dirs(sweep_dir)]
    for run, own in zip(runs, split_overrides([r.overrides for r in runs])[1]):
        run.label = " ".join(own)
    return runs
