"""The speed benchmarks of issue 14 still run and print their tables (tiny budgets; no timings are checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run(repo_root: Path, script: str, *args: str, tmp: Path | None = None) -> str:
    """Run a benchmark; given `tmp`, as its temp folder, which it must leave empty (run folders, worker logs,
    data files: the old scripts left ~16-190 MB each in /tmp per run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"TMPDIR": str(tmp)} if tmp else {})}
    result = subprocess.run([sys.executable, str(repo_root / "benchmarks" / script), *args], capture_output=True,
                            text=True, timeout=600, cwd=repo_root, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    if tmp is not None:
        # torch's own cache folder (torchinductor_<user>) is shared by all runs: not a leftover of this one
        assert sorted(p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")) == []
    return result.stdout


@pytest.mark.slow
def test_vae_benchmark_prints_the_table_and_equal_epoch_nlls(repo_root: Path, shared_data_dir: Path, tmp_path: Path) -> None:
    out = _run(repo_root, "vae_mnist.py", "--data-dir", str(shared_data_dir), "--train-subset", "512", "--epochs", "2",
               "--nll-n", "20", "--nll-k", "10", "--override", "callbacks.progress_bar=null", tmp=tmp_path)
    assert "hand " in out and "latentlab " in out and "after 2 epochs each" in out
    assert "hand script " in out and "latentlab / hand script:" in out  # the same loop as a script of its own


@pytest.mark.slow
def test_vae_benchmark_counts_host_syncs(repo_root: Path, shared_data_dir: Path) -> None:
    out = _run(repo_root, "vae_mnist.py", "--data-dir", str(shared_data_dir), "--train-subset", "2560",
               "--count-syncs", "6", "--override", "callbacks.progress_bar=null")
    assert "aten::_local_scalar_dense" in out


@pytest.mark.slow
def test_estimator_benchmark_prints_both_tables(repo_root: Path, shared_data_dir: Path, tmp_path: Path) -> None:
    out = _run(repo_root, "estimators_speed.py", "--data-dir", str(shared_data_dir), "--is-n", "20", "--batch", "10",
               "--k", "20", "--ais-n", "10", "--ais-steps", "3", "--rounds", "1", tmp=tmp_path)
    assert "hand-written vectorised" in out and "floor: (leapfrog+1) fwd+bwd" in out


@pytest.mark.slow
def test_score_sampling_benchmark_prints_its_three_tables(repo_root: Path, shared_data_dir: Path, tmp_path: Path) -> None:
    out = _run(repo_root, "score_sampling.py", "--data-dir", str(shared_data_dir), "--epochs", "1", "--almond-vae-epochs",
               "0", "--train-subset", "300", "--samples", "100", "--inpaint", "4", "--prior-steps", "20",
               "--out", str(tmp_path))
    assert out.count("| (") == 5 and "| almond |" in out and "mean image MSE" in out  # (a)-(e), energy, inpainting
    assert (tmp_path / "vae" / "checkpoints" / "latent_prior.pt").is_file()
