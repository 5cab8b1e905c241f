"""`latentlab-reproduce`: every paper table runs end to end at `--budget smoke`, so its code paths stay alive."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from latentlab.reproduce import registry, reproduce


def test_list_names_every_table() -> None:
    proc = subprocess.run([sys.executable, "-m", "latentlab.reproduce", "--list"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("almond_normal_means", "avb_toy", "mnist_methods"):
        assert name in proc.stdout


def test_unknown_table_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "latentlab.reproduce", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "latentlab: error: unknown table" in proc.stderr


@pytest.mark.parametrize("name", sorted(registry()))
def test_table_runs_at_smoke_budget(name: str, tmp_path: Path, shared_data_dir: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # the datasets by link, so the classifier that sample quality trains is cached here, not in ../shared
    data = tmp_path / "data"
    for folder in shared_data_dir.iterdir():
        if folder.is_dir():
            (data / folder.name).mkdir(parents=True)
            for f in folder.iterdir():
                (data / folder.name / f.name).symlink_to(f)
    monkeypatch.setenv("LATENTLAB_DATA_DIR", str(data))
    report = reproduce(name, budget="smoke", repeats=1, out=tmp_path)
    text = (tmp_path / name / f"{name}.md").read_text()
    assert "Budget `smoke`" in text and "wall time" in text and "| ---" in text
    first_row = text.split("| ---", 1)[1].splitlines()[1]
    assert "n/a" not in first_row, first_row  # every number of the first row was measured
    assert report.figure is not None and report.figure.exists()
