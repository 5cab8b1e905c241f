"""The notebooks run end to end (nbclient, small settings) and are committed with the outputs of a full run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # as in conftest.py

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_notebooks_exist() -> None:
    assert [p.stem for p in NOTEBOOKS] == ["01_quickstart", "02_posteriors", "03_compare_runs",
                                           "04_scores_and_inverse_problems"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_the_outputs_of_a_full_run_of_these_very_cells(path: Path) -> None:
    """They read on GitHub: committed with the outputs of one top-to-bottom run at the full settings
    (`python -m latentlab.notebook notebooks/*.ipynb` stamps metadata.latentlab), of the cells as they are now."""
    from latentlab.notebook import source_hash

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    stamp = nb.metadata.get("latentlab", {})
    rerun = f"rerun python -m latentlab.notebook {path.relative_to(path.parents[1])}"
    assert stamp.get("settings") == "full" and stamp.get("executed"), f"{path.name} is not executed: {rerun}"
    assert stamp.get("source_sha256") == source_hash(nb), f"{path.name}'s cells changed after it was executed: {rerun}"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # one kernel, top to bottom
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the kernel inherits this environment: small settings, outputs in tmp_path, this interpreter first on PATH
    monkeypatch.setenv("LATENTLAB_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("LATENTLAB_NOTEBOOK_OUTPUT", str(tmp_path / "out"))
    monkeypatch.setenv("LATENTLAB_NOTEBOOK_DATA", str(SHARED_DATA))  # read-only: MNIST sections write under tmp_path
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert figures, "the notebook shows no figure"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    if path.stem == "02_posteriors":
        markdown = "".join(o["data"].get("text/markdown", "") for o in outputs if o.output_type == "display_data")
        assert "test/inference_gap" in markdown and "std ratio" in text
        assert len(figures) >= 3  # one posterior picture per method
    if path.stem == "03_compare_runs":
        assert (tmp_path / "out" / "03_compare_runs" / "sweep" / "sweep_summary.md").is_file()
        assert text.count("test/nll =") == 4
    if path.stem == "04_scores_and_inverse_problems":
        assert "relative score error" in text and "inpaint/mse" in text and len(figures) >= 3
        if (SHARED_DATA / "mnist").is_dir():  # section 4: the latent prior on MNIST, both energy distances printed
            assert "fit_prior/energy_distance_learned" in text and len(figures) >= 5
