"""What the notebooks share, so that their cells hold only the tutorial: quick mode, where outputs go, figures.

The test suite runs every notebook with `LATENTLAB_NOTEBOOK_SMALL=1` (seconds, not minutes), its outputs under
`LATENTLAB_NOTEBOOK_OUTPUT` and the real datasets from `LATENTLAB_NOTEBOOK_DATA`; a reader's run uses the full
settings (the ones whose outputs are committed) and writes under `outputs/notebooks/`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

#: quick settings for the test suite
SMALL: bool = os.environ.get("LATENTLAB_NOTEBOOK_SMALL") == "1"


def output_dir(notebook: str) -> Path:
    """The notebook's own output folder (created)."""
    path = Path(os.environ.get("LATENTLAB_NOTEBOOK_OUTPUT", "outputs/notebooks")).resolve() / notebook
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """The folder holding mnist/ etc.: `LATENTLAB_NOTEBOOK_DATA`, else ../../shared/data from notebooks/."""
    return Path(os.environ.get("LATENTLAB_NOTEBOOK_DATA", "../../shared/data")).resolve()


def show(fig: Any) -> None:
    """Display a figure as a PNG and close it, so one cell works in Jupyter and headless (nbclient, CI)."""
    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", dpi=90)
    plt.close(fig)
    display(Image(data=buffer.getvalue()))


def source_hash(nb: Any) -> str:
    """sha256 of the code cells' sources: the committed outputs belong to exactly these cells."""
    import hashlib

    return hashlib.sha256("\n\x00".join(c.source for c in nb.cells if c.cell_type == "code").encode()).hexdigest()


def execute_in_place(paths: list[str], timeout: int = 7200) -> None:
    """Run each notebook top to bottom at its full settings and save it with its outputs, stamped with the date,
    the machine and the wall time in its metadata (`latentlab.executed`), which the test suite checks."""
    import platform
    import time

    import nbformat
    from nbclient import NotebookClient

    for path in map(Path, paths):
        nb = nbformat.read(path, as_version=4)
        small = os.environ.pop("LATENTLAB_NOTEBOOK_SMALL", None)  # the kernel inherits the environment: full settings
        start = time.perf_counter()
        try:
            NotebookClient(nb, timeout=timeout, kernel_name="python3",
                           resources={"metadata": {"path": str(path.parent)}}).execute()
        finally:
            if small is not None:
                os.environ["LATENTLAB_NOTEBOOK_SMALL"] = small
        nb.metadata["latentlab"] = {"executed": time.strftime("%Y-%m-%d"), "settings": "full",
                                    "source_sha256": source_hash(nb),
                                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads "
                                               f"{os.environ.get('OMP_NUM_THREADS', 'default')}",
                                    "wall_s": round(time.perf_counter() - start)}
        nbformat.write(nb, path)
        print(f"{path}: executed in {nb.metadata['latentlab']['wall_s']} s")


if __name__ == "__main__":  # python -m latentlab.notebook notebooks/*.ipynb  (needs the test extra: nbclient)
    import sys

    execute_in_place(sys.argv[1:])
