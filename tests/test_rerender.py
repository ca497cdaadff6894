"""The committed results and the code cannot drift apart: re-rendering a committed scale's tables and claims from its
committed results files gives the committed tables and claims, byte for byte (`rsnn-paper render --scale S`)."""
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("scale", ["ci", "cpu"])
def test_rerendering_the_committed_results_reproduces_the_committed_tables_and_claims(scale, tmp_path, monkeypatch):
    results, figures = ROOT / "results" / scale, ROOT / "figures" / scale
    if not (results / "summary.json").is_file():
        pytest.skip(f"no committed results for scale {scale}")
    shutil.copytree(results, tmp_path / "results" / scale)
    (tmp_path / "figures").mkdir()
    monkeypatch.setenv("RSNN_ROOT", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    from rsnn_paper.cli import main
    assert main(["render", "--scale", scale]) == 0
    out = tmp_path / "figures" / scale
    rendered = sorted(p.name for p in out.iterdir() if p.suffix in (".md", ".csv"))
    committed = sorted(p.name for p in figures.iterdir() if p.suffix in (".md", ".csv"))
    assert rendered == committed
    for name in rendered:
        assert (out / name).read_bytes() == (figures / name).read_bytes(), f"figures/{scale}/{name} drifted from the code"
    claims = "claims.json"
    assert (tmp_path / "results" / scale / claims).read_bytes() == (results / claims).read_bytes()
