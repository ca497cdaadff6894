"""`rsnn-paper bench --project`: the projection's arithmetic (no timing) and the CLI wiring."""
import pytest

from rsnn_paper.bench import format_projection, project
from rsnn_paper.config import get_config
from rsnn_paper.surrogates import GRADIENT_SOURCES


def _measured(t=1e-3):
    return {"batch": 2, "repeats": 1, "device": "cpu", "quick": True,
            "sec_per_image": {"ann": t, "ft": 2 * t, "e2e_at": 3 * t, "snn_rat": 4 * t, "apgd": t,
                              "pgd": {s.name: t for s in GRADIENT_SOURCES}}}


def test_projection_of_the_paper_scale_is_the_stated_formula():
    cfg = get_config("paper")
    p = project(cfg, _measured(), devices=4)
    n_train = 50000 - cfg.n_val
    assert p["n"] == {"train": n_train, "ft": n_train, "e2e": n_train, "eval": 10000}
    s = p["stages"]
    assert s["ann_pgd_at"]["seconds"] == pytest.approx(cfg.ann_epochs * n_train * 1e-3)
    assert s["finetune_kl_ce"]["seconds"] == pytest.approx(cfg.ft_epochs * n_train * 2e-3)
    assert s["e2e_at"]["seconds"] == pytest.approx(cfg.e2e_epochs * n_train * 3e-3)
    assert s["paper_protocol_x3"]["seconds"] == pytest.approx(
        3 * 10000 * (1 + cfg.eval_pgd_steps + cfg.apgd_steps) * 19 * 1e-3)
    assert p["total_seconds"] == pytest.approx(sum(v["seconds"] for v in s.values()))
    assert p["total_seconds_n_devices"] == pytest.approx(p["total_seconds"] / 4)
    table = format_projection(p)
    assert "| **total** |" in table and "4 devices" in table and "ideal scaling" in table


def test_cli_has_the_projection_flags():
    from rsnn_paper.cli import build_parser
    a = build_parser().parse_args(["bench", "--project", "paper", "--quick", "--devices", "8"])
    assert (a.project, a.quick, a.devices) == ("paper", True, 8)


def test_cli_passes_batch_and_repeats_to_the_measurement(monkeypatch, tmp_path):
    from rsnn_paper import bench, cli
    seen = {}

    def fake_measure(cfg, batch, repeats, quick, device):
        seen.update(batch=batch, repeats=repeats, quick=quick, width=cfg.width, T=cfg.T)
        return _measured()
    monkeypatch.setattr(bench, "measure_stages", fake_measure)
    out = tmp_path / "p.json"
    assert cli.main(["bench", "--project", "paper", "--batch", "16", "--repeats", "1", "--json", str(out)]) == 0
    assert seen == {"batch": 16, "repeats": 1, "quick": False, "width": 1.0, "T": 8}
    assert out.is_file()
    cli.main(["bench", "--project", "paper", "--json", str(out)])
    assert (seen["batch"], seen["repeats"]) == (32, 3)  # the defaults
