"""The quickstart notebook runs headless (tiny setting) so it cannot rot."""
import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("TUNEJAX_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("TUNEJAX_NOTEBOOK_WORKDIR", str(tmp_path / "wd"))
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), 4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": ROOT}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "eval after:" in outputs and "answer" in outputs
  assert (tmp_path / "wd" / "curves.png").exists()
