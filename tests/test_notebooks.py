"""`rsnn_paper.notebooks.run_notebooks` (re-executing notebooks and saving them with outputs) and
`rsnn_paper.store.committed_scale` (the scale whose committed results the section notebooks display)."""
import json
import subprocess
import sys

import pytest

from rsnn_paper.notebooks import SECTION_NOTEBOOKS, resolve_notebooks, run_notebooks
from rsnn_paper.store import committed_scale, figures_dir, project_root


def test_committed_scale(tmp_path):
    assert committed_scale(tmp_path) == "ci"
    (tmp_path / "results" / "cpu").mkdir(parents=True)
    assert committed_scale(tmp_path) == "ci"  # an empty folder is not a finished run
    (tmp_path / "results" / "cpu" / "summary.json").write_text("{}")
    assert committed_scale(tmp_path) == "cpu"
    # the cpu scale's later sections are sittings of their own: a section not run there yet is shown at ci
    (tmp_path / "results" / "cpu" / "attacks.json").write_text("{}")
    assert committed_scale(tmp_path, section="attacks") == "cpu"
    assert committed_scale(tmp_path, section="ablations") == "ci"


@pytest.mark.parametrize("stem,files", [
    ("10_ann_training", (("ann", "ann_table.md"), ("ann", "ann_learning_curves.png"))),
    ("11_conversion", (("conversion", "conversion_table.md"), ("conversion", "conversion_thresholds.png"),
                       ("conversion", "conversion_sweeps.png"))),
    ("12_finetuning", (("finetune", "finetune_table.md"), ("finetune", "finetune_thresholds.png"),
                       ("finetune", "finetune_curves.png"))),
    ("13_attack_ensemble", (("attacks", "attack_sources_table.md"), ("attacks", "attack_strong_table.md"),
                            ("attacks", "attack_blackbox_table.md"), ("curves", "attack_eps_curve.png"),
                            ("attacks", "../surrogates.png"))),
    ("14_baselines", (("baselines", "main_table.md"), ("baselines", "cost_table.md"), ("baselines", "spike_rates.png"),
                      ("curves", "main_eps_curve.png"), ("budgets", "budget_curve.png"))),
    ("15_ablations", (("ablations", "ablation_table.md"), ("ablations", "ablations.png"))),
    ("16_ood", (("ood", "ood_table.md"), ("ood", "ood.png"), ("ood", "../corruptions.png"))),
])
def test_section_notebooks_show_committed_results(stem, files):
    """Each section notebook displays files that are committed at the scale it shows (per section: the largest
    committed scale that ran it), and is saved with outputs."""
    for section, f in files:
        path = figures_dir(committed_scale(section=section)) / f
        assert path.is_file(), path
    nb = json.loads((project_root() / "nbs" / f"{stem}.ipynb").read_text())
    shown = [o for c in nb["cells"] for o in c.get("outputs", []) if o["output_type"] == "display_data"]
    assert sum("image/png" in o["data"] for o in shown) == sum(f.endswith(".png") for _, f in files)
    assert sum("text/markdown" in o["data"] for o in shown) == sum(f.endswith(".md") for _, f in files)
    assert all(c.get("execution_count") is None for c in nb["cells"] if c["cell_type"] == "code")  # nbdev_clean'd


def test_resolve_notebooks(tmp_path):
    for n in ("12_finetuning", "12_other", "13_attack_ensemble"):
        (tmp_path / f"{n}.ipynb").write_text("{}")
    assert resolve_notebooks("13", tmp_path) == [(tmp_path / "13_attack_ensemble.ipynb").resolve()]
    assert resolve_notebooks(["12_finetuning"], tmp_path)[0].name == "12_finetuning.ipynb"
    assert resolve_notebooks([str(tmp_path / "12_other.ipynb")])[0].name == "12_other.ipynb"
    for bad in ("12", "99"):
        with pytest.raises(ValueError, match="exactly one notebook"):
            resolve_notebooks(bad, tmp_path)
    assert [p.stem for p in resolve_notebooks()] == list(SECTION_NOTEBOOKS)


def _nb(sources):
    return {"cells": [{"cell_type": "code", "execution_count": 3, "id": f"c{i}", "metadata": {"k": 1},
                       "outputs": [{"output_type": "stream", "name": "stdout", "text": ["stale\n"]}], "source": s}
                      for i, s in enumerate(sources)], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def test_run_notebooks_saves_clean_outputs(tmp_path):
    ok = tmp_path / "ok.ipynb"
    ok.write_text(json.dumps(_nb(["import os\nprint(os.path.basename(os.getcwd()))", "#| eval: false\n1 / 0",
                                  "6 * 7", "x = 1"])))
    assert run_notebooks(["ok"], nbs_path=tmp_path) == [ok.resolve()]
    cells = json.loads(ok.read_text())["cells"]
    assert cells[0]["outputs"][0]["text"] == [tmp_path.name + "\n"]  # ran in the notebook's folder
    assert cells[1]["outputs"] == [] and cells[3]["outputs"] == []  # skipped / silent: stale outputs are gone
    assert cells[2]["outputs"][0]["data"]["text/plain"] == ["42"]
    assert all(c["execution_count"] is None and c["metadata"] == {} for c in cells)  # cleaned
    text = ok.read_text()
    run_notebooks([str(ok)])  # re-executing gives the same bytes
    assert ok.read_text() == text


def test_run_notebooks_stops_at_an_error_and_keeps_the_file(tmp_path):
    bad = tmp_path / "bad.ipynb"
    bad.write_text(json.dumps(_nb(["1 / 0", "print('never')"])))
    before = bad.read_text()
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        run_notebooks(["bad"], nbs_path=tmp_path)
    assert bad.read_text() == before


def test_module_entry_point(tmp_path):
    nb = tmp_path / "one.ipynb"
    nb.write_text(json.dumps(_nb(["print(1 + 1)"])))
    r = subprocess.run([sys.executable, "-m", "rsnn_paper.notebooks", str(nb), "--no-save"], capture_output=True,
                       text=True, cwd=project_root())
    assert r.returncode == 0, r.stderr
    assert "1 notebook(s) ran" in r.stdout and "stale" in nb.read_text()  # --no-save leaves the file alone
    r = subprocess.run([sys.executable, "-m", "rsnn_paper.notebooks", "no_such_notebook"], capture_output=True,
                       text=True, cwd=project_root())
    assert r.returncode == 1 and "exactly one notebook" in r.stderr
