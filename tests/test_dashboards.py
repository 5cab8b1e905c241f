"""W&B and TensorBoard as a user meets them: one W&B run per sweep job with real pictures, dashboard extras
that leave a run's numbers unchanged, TensorBoard's HParams tab, and comparison tables that say what they compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from latentlab import api
from latentlab.compare import comparison_table, find_runs, write_comparison
from test_workflow import TINY

#: the tiny run of test_workflow, with the pictures on and the logger chosen per test
SMALL = [o for o in TINY if not o.startswith(("logger=", "callbacks.image_grid"))] + ["callbacks.image_grid.n=16"]


def test_wandb_multirun_gives_one_named_run_per_job_with_real_pictures(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-m", "latentlab.train", "-m", "model=vae,almond", "logger=wandb", "eval/nll=fast", *SMALL,
                           f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "will reuse this run" not in proc.stderr
    runs = {job: list((sweep / job / "wandb").glob("offline-run-*")) for job in ("0", "1")}
    assert all(len(found) == 1 for found in runs.values()), runs  # each job has its own run folder
    ids = {found[0].name.rsplit("-", 1)[1] for found in runs.values()}
    assert len(ids) == 2
    for job, method in (("0", "vae"), ("1", "almond")):
        records = next(runs[job][0].glob("run-*.wandb")).read_bytes()
        assert sweep.name.encode() in records and method.encode() in records  # group = sweep, name = method
        pngs = list((runs[job][0] / "files" / "media" / "images").rglob("*.png"))
        assert {p.name.split("_")[0] for p in pngs} >= {"samples", "scatter"}
        for png in pngs:
            pixels = np.asarray(Image.open(png).convert("L"))
            assert len(np.unique(pixels)) > 8 and pixels.max() > 100, png  # a picture, not black 0/1 values

    # the comparison of the sweep names the methods and how each test/nll was obtained
    out = subprocess.run([sys.executable, "-m", "latentlab.compare", str(sweep), "-o", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "comparison.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert "nll estimator" in lines[0] and "nll budget" in lines[0]
    for job, method in (("0", "vae"), ("1", "almond")):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        row = next(line for line in lines if line.startswith(f"| {job}: model={method} |")
                   or line.startswith(f"| {job} | {method} |"))
        assert f"| {method} |" in row and f"| {metrics.get('test/nll_estimator', '?')} |" in row
    assert "Data: digits" in table


def _hparams_metrics(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    names: set[str] = set()
    for events in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        try:
            contents = acc.PluginTagToContent("hparams").values()
        except KeyError:  # this event file (a writer of an earlier stage) holds no HParams data
            continue
        for content in contents:
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            names |= {m.name.tag for m in data.experiment.metric_infos}
    return names


def test_dashboard_extras_leave_the_result_unchanged_and_fill_the_hparams_tab(tmp_path: Path) -> None:
    """AVB: its implicit posterior is sampled for the latent scatter; the pictures every epoch build test
    loaders. None of it may move a random stream training or testing draws from."""
    run = [*SMALL, "model=avb", "trainer.max_epochs=2", "logger=tensorboard", "eval/nll=fast"]
    plain, _ = api.train([*run, "callbacks.dashboard=null"], run_dir=tmp_path / "plain")
    extras, extras_dir = api.train([*run, "callbacks.image_grid.every_n_epochs=1"], run_dir=tmp_path / "extras")
    assert (extras_dir / "latent_scatter.png").is_file() and (extras_dir / "samples_epoch000.png").is_file()
    assert extras["test/nll"] == plain["test/nll"] and extras["train/loss"] == plain["train/loss"]
    assert {"test/nll", "val/nll"} <= _hparams_metrics(extras_dir)  # the final metrics beside the config


def test_comparison_groups_datasets_names_overrides_and_marks_ties(tmp_path: Path) -> None:
    jobs = {"0": ("mnist", ["model=vae", "data=mnist"], {"test/nll": 100.0, "test/nll_se": 0.5}),
            "1": ("mnist", ["model=almond", "data=mnist"], {"test/nll": 100.6, "test/nll_se": 0.5,
                                                            "test/nll_estimator": "ais", "test/nll_budget": "500x4",
                                                            "test/nll_half_gap": 0.3}),
            "2": ("digits", ["model=vae", "data=digits"], {"test/nll": 27.0, "test/nll_se": 0.1})}
    for job, (data, overrides, metrics) in jobs.items():
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (tmp_path / job / ".hydra" / "hydra.yaml").write_text(
            yaml.safe_dump({"hydra": {"runtime": {"choices": {"data": data}}}}))
        (tmp_path / job / "metrics.json").write_text(json.dumps(metrics))
    md, js = write_comparison(tmp_path, find_runs([tmp_path]), root=tmp_path)
    table = md.read_text()
    mnist, digits = table.split("### Data: mnist")[1].split("### Data: digits")
    # 100.6 - 100.0 < 2 * sqrt(0.5^2 + 0.5^2): a tie, both bold; digits is ranked alone (no bold)
    assert "| 0: data=mnist | vae | **100.0000 ± 0.5000** (tie) | ? | ? | ? |" in mnist
    assert "| 1: data=mnist | almond | **100.6000 ± 0.5000** (tie) | ais | 500x4 | 0.300 (!) |" in mnist
    assert "| 2: data=digits | vae | 27.0000 ± 0.1000 |" in digits.split("nats per example")[0]
    assert json.loads(js.read_text())["2: data=digits"]["data"] == "digits"
    apart = comparison_table({"a": {"test/nll": 1.0, "test/nll_se": 0.1}, "b": {"test/nll": 2.0, "test/nll_se": 0.1}})
    assert "| a | **1.0000 ± 0.1000** |" in apart and "| b | 2.0000 ± 0.1000 |" in apart


@pytest.mark.parametrize("kind", ["wandb", "tensorboard"])
def test_the_logger_brings_the_dashboard(kind: str) -> None:
    cfg = api.compose([f"logger={kind}"], output_dir="/tmp/run")
    assert cfg.callbacks.dashboard._target_.endswith("Dashboard")
    assert api.compose(["logger=csv"], output_dir="/tmp/run").callbacks.get("dashboard") is None


def test_pictures_leave_the_global_random_streams_where_they_were(tmp_path: Path) -> None:
    """A model whose sampler draws from the global streams (torch, numpy, Python) still leaves them untouched
    when ImageGrid draws it: training after the picture draws what it would have drawn without it."""
    import random
    from types import SimpleNamespace

    import torch

    from latentlab.callbacks import ImageGrid

    class Greedy(torch.nn.Module):
        image_shape = (1, 2, 2)
        device = torch.device("cpu")

        def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
            np.random.rand(), random.random()
            return torch.rand(n, 4)  # ignores the generator on purpose

    trainer = SimpleNamespace(is_global_zero=True, datamodule=None, loggers=[], global_step=0)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    ImageGrid(str(tmp_path), n=4, nrow=2)._write(trainer, Greedy())  # type: ignore[arg-type]
    assert torch.equal(torch.get_rng_state(), states[0]) and np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2] and (tmp_path / "samples.png").is_file()
