"""Execute examples/depthwise_separable.ipynb so that it cannot rot (needs the `examples` extra)."""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "depthwise_separable.ipynb")


def test_depthwise_separable_notebook_trains():
    nbformat = pytest.importorskip("nbformat", reason="the examples extra (nbformat) is not installed")
    nbclient = pytest.importorskip("nbclient", reason="the examples extra (nbclient) is not installed")
    pytest.importorskip("ipykernel", reason="the examples extra (ipykernel) is not installed")
    pytest.importorskip("matplotlib", reason="the examples extra (matplotlib) is not installed")

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Run from the repository root so the kernel imports this checkout's nbdw.
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": ROOT}})
    client.execute()

    texts = [out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
             for out in cell.get("outputs", []) if out.get("output_type") == "stream"]
    lines = [line for text in texts for line in text.splitlines() if line.startswith("NBDW_NOTEBOOK_SUMMARY ")]
    assert len(lines) == 1, texts
    summary = json.loads(lines[0].split(" ", 1)[1])
    assert summary["last_loss"] < 0.7 * summary["first_loss"], summary
    assert summary["test_accuracy"] > 0.5, summary  # chance is 0.25
    images = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
              if "image/png" in out.get("data", {})]
    assert len(images) == 3  # examples, loss curve, learned filters
