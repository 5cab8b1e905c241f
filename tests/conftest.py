"""Shared test setup: one torch thread per process (CI has 2 cores and may run 2 workers),
W&B offline, and the path of the checked datasets in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """../shared/data: MNIST, Fashion-MNIST and binarized MNIST, md5-checked."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def decoder_tables(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every `DecoderTable.around` result (a table, or None where none verified) while the test runs, in order."""
    from latentlab.decoder_table import DecoderTable

    built: list = []
    around = DecoderTable.around.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(DecoderTable, "around", classmethod(lambda cls, *a, **k: built.append(around(cls, *a, **k)) or built[-1]))
    return built


@pytest.fixture(autouse=True)
def no_flush_outlives_a_run():
    """A run flushes subnormals to zero in every thread while its Trainer runs (`flush_denormal`) and must give the
    process its setting back, also when it raises or is interrupted: no test may leave the flag on behind it."""
    from latentlab.callbacks.torch_switches import flushing_denormals

    yield
    assert not flushing_denormals(), "the process still flushes subnormals after this test: a run did not give it back"
