"""The notebooks: each runs top to bottom at the quick size, and is committed without outputs.

Each notebook is executed with nbclient in a fresh kernel of this interpreter
(``sys.executable``), with ``notebooks/`` as its working directory and
``MAML_FUNC_NB_SCALE=quick``; a cell that raises, or one of the notebook's own
``assert`` cells, fails the test.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # runs the notebooks in a kernel
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SHARED_OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
OMNIGLOT_PARTS = ("images_background", "images_evaluation")
# Generous for the quick size (the longest cell, the quickstart's meta-training, takes about 30 s on 2 cores).
CELL_TIMEOUT_S = 600


def _has_omniglot(folder: Path) -> bool:
    return all((folder / f"{part}.zip").is_file() or (folder / part).is_dir() for part in OMNIGLOT_PARTS)


def execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run ``notebooks/<name>`` top to bottom in a fresh kernel, at the quick size; return what it printed."""
    # A kernelspec of our own makes "python3" this interpreter, whatever kernels the user has installed.
    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MAML_FUNC_NB_SCALE", "quick")
    # Figures render inline even where the environment asks for a headless backend such as Agg.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError, naming the cell, when a cell raises
    return "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def offline_omniglot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point a notebook at the offline Omniglot archives and a data cache outside the checkout (or skip, saying why)."""
    omniglot = Path(os.environ.get("MAML_FUNC_OMNIGLOT", SHARED_OMNIGLOT)).resolve()
    if not _has_omniglot(omniglot):
        pytest.skip(f"the Omniglot archives (images_background.zip, images_evaluation.zip) are not at {omniglot}; "
                    "set MAML_FUNC_OMNIGLOT to the folder that holds them")
    monkeypatch.setenv("MAML_FUNC_OMNIGLOT", str(omniglot))
    monkeypatch.setenv("MAML_FUNC_DATA_ROOT", str(tmp_path / "data"))  # the decoded cache, never in the checkout


@pytest.mark.slow
def test_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offline_omniglot(tmp_path, monkeypatch)
    printed = execute("01_quickstart.ipynb", tmp_path, monkeypatch)
    # The notebook asserts this itself; checked here too, from its printed summaries.
    trained = re.search(r"meta-trained: +5-way 1-shot: ([0-9.]+)%", printed)
    untrained = re.search(r"not meta-trained: 5-way 1-shot: ([0-9.]+)%", printed)
    assert trained and untrained, printed[-2000:]
    assert float(trained.group(1)) > 60.0 and float(trained.group(1)) > float(untrained.group(1)) + 20


@pytest.mark.slow
def test_your_model_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offline_omniglot(tmp_path, monkeypatch)
    monkeypatch.setenv("MAML_FUNC_RUN_DIR", str(tmp_path / "run"))  # the checkpoints, never in the checkout
    printed = execute("03_your_model.ipynb", tmp_path, monkeypatch)
    # The notebook asserts this itself; checked here too, from its printed summary.
    converted = re.search(r"exact_model converted (\d+) layers to TaskBatchNorm", printed)
    accuracy = re.search(r"your model: 5-way 1-shot: ([0-9.]+)% ± ([0-9.]+) \(chance 20%\)", printed)
    assert converted and accuracy, printed[-2000:]
    assert int(converted.group(1)) == 20  # every BatchNorm2d of torchvision's ResNet-18
    assert float(accuracy.group(1)) > 45.0
    assert (tmp_path / "run" / "last.pt").is_file()


def test_functional_core_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    printed = execute("02_functional_core.ipynb", tmp_path, monkeypatch)
    after = re.search(r"query MSE after 0 / 1 / 10 steps: ([0-9.]+) / ([0-9.]+) / ([0-9.]+)", printed)
    assert after, printed[-2000:]
    assert float(after.group(3)) < 0.25 * float(after.group(1))


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_functional_core.ipynb", "03_your_model.ipynb"])
def test_committed_without_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, f"{name} has no code cells"
    for i, cell in enumerate(code):
        assert cell.outputs == [] and cell.execution_count is None, (
            f"{name}: code cell {i} has outputs or an execution count; clear them before committing "
            f"(jupyter nbconvert --clear-output --inplace notebooks/{name})")
