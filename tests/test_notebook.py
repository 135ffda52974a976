"""examples/quickstart.ipynb runs from top to bottom (so it cannot rot) and is stored without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parents[1] / "examples" / "quickstart.ipynb"


def test_the_notebook_is_stored_without_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


def test_the_quickstart_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="the dev extra installs nbformat/nbclient")
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = {i: c["outputs"] for i, c in enumerate(nb.cells) if c["cell_type"] == "code"}
    assert not [o for out in outputs.values() for o in out if o.get("output_type") == "error"]
    text = json.dumps(outputs)
    assert "Prepared(" in text and "Evaluation(" in text and "verdict" in text and "image/png" in text
    assert (tmp_path / "quickstart-work" / "study" / "report.md").is_file()
