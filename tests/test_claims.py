"""The claims' statistics: paired tests on the same images (McNemar's exact test, paired bootstrap intervals), and
the spread over seeds folded into the verdicts (a claim is firm only if every seed gives the same verdict)."""
import json
import shutil
from pathlib import Path

import pytest

from rsnn_paper import paper
from rsnn_paper.evaluation import from_bits, to_bits
from rsnn_paper.paper import _paired, claim_blackbox, claim_ensemble, fold_seeds, mcnemar

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("a_only,b_only", [(0, 0), (6, 0), (0, 6), (10, 3), (3, 10), (25, 25), (40, 21)])
def test_mcnemar_is_the_exact_binomial_test(a_only, b_only):
    scipy_stats = pytest.importorskip("scipy.stats")
    both, neither = 7, 11
    a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    r = mcnemar(a, b)
    assert (r["n_a_only"], r["n_b_only"]) == (a_only, b_only)
    m = a_only + b_only
    if m:
        assert r["p_two_sided"] == pytest.approx(scipy_stats.binomtest(a_only, m, 0.5).pvalue, rel=1e-9)
        assert r["p_a_greater"] == pytest.approx(
            scipy_stats.binomtest(a_only, m, 0.5, alternative="greater").pvalue, rel=1e-9)
        assert r["p_b_greater"] == pytest.approx(
            scipy_stats.binomtest(b_only, m, 0.5, alternative="greater").pvalue, rel=1e-9)
    else:
        assert r["p_two_sided"] == 1.0


def test_mcnemar_needs_the_same_images():
    with pytest.raises(ValueError, match="same images"):
        mcnemar([True, False], [True])


def test_paired_intervals_contain_the_observed_difference_and_ratio():
    a = [True] * 30 + [False] * 70
    b = [True] * 15 + [False] * 85
    p = _paired(a, b)
    assert p["diff"] == pytest.approx(0.15)
    assert p["diff_ci"][0] < 0.15 < p["diff_ci"][1]
    assert p["ratio_ci"][0] < 2.0 < p["ratio_ci"][1]
    assert _paired(a, b) == p  # deterministic


def test_bits_round_trip():
    v = [True, False, False, True, True]
    assert to_bits(v) == "10011" and from_bits(to_bits(v)) == v and from_bits(v) == v


def _attacks(ens: list, single: list, white: list | None = None, blackbox: dict | None = None) -> dict:
    n = len(ens)
    white = ens if white is None else white
    rec = lambda r: {"robust_acc": sum(r) / n, "robust": list(r), "converged": True}
    return {"n_images": n, "eps": 8 / 255,
            "strong": {**rec(ens), "whitebox_acc": sum(white) / n, "clean_correct": [True] * n,
                       "broken_by": [None if w else ["pgd", "pcw_1", 0, 0] for w in white]},
            "strong_single_source": {**rec(single), "source": "pcw_1"},
            "whitebox": {"pgd": {"ensemble_acc": sum(ens) / n, "best_single_acc": sum(single) / n}},
            "blackbox": {k: rec(v) for k, v in (blackbox or {}).items()}}


def test_a_paired_difference_is_firm_where_the_wilson_intervals_overlap():
    # 100 images: the single source keeps 18, the ensemble 10, and every image the ensemble keeps the single source
    # keeps too. The two Wilson intervals overlap (0.10 [0.055, 0.174] vs 0.18 [0.117, 0.266]); the 8 discordant
    # pairs all go one way, so McNemar's p = 2 * 0.5^8 < 0.05: the ensemble is firmly stronger.
    ens = [True] * 10 + [False] * 90
    single = [True] * 18 + [False] * 82
    c = claim_ensemble({"attacks": _attacks(ens, single)})
    assert c["holds"] and c["firm"] and c["paired"]["n_a_only"] == 8
    assert not paper._apart(c["numbers"]["best_single"], c["numbers"]["ensemble"])  # Wilson alone: not firm
    assert "McNemar" in c["test"]


def test_no_difference_is_a_firm_does_not_hold_only_when_the_interval_is_narrow():
    same = [True] * 10 + [False] * 90
    c = claim_ensemble({"attacks": _attacks(same, list(same))})
    assert not c["holds"] and c["firm"]  # identical outcomes: the paired interval is [0, 0], inside ±1 point
    noisy_single = [True] * 5 + [False] * 5 + [True] * 5 + [False] * 85  # 10 vs 10, but 10 discordant pairs
    c = claim_ensemble({"attacks": _attacks(same, noisy_single)})
    assert not c["holds"] and not c["firm"]  # equal accuracies, too few images to say "no better"


def test_blackbox_claim_is_paired_against_the_whitebox_part_of_the_strong_protocol():
    white = [True] * 5 + [False] * 95
    square = [True] * 20 + [False] * 80
    c = claim_blackbox({"attacks": _attacks(white, white, white, {"square_snn": square, "transfer_from_ann": square})})
    assert c["holds"] and c["firm"] and set(c["paired"]) == {"square_snn", "transfer_from_ann"}
    stronger = [True] * 2 + [False] * 98  # keeps fewer images than the white-box attacks: does not hold
    c = claim_blackbox({"attacks": _attacks(white, white, white, {"square_snn": stronger})})
    assert not c["holds"]


def test_a_claim_is_firm_only_if_every_seed_gives_the_same_verdict():
    claims = [{"id": "x", "claim": "x", "holds": True, "firm": True, "numbers": {}},
              {"id": "y", "claim": "y", "holds": False, "firm": True, "numbers": {}}]
    run = lambda seed, hx, hy: {"seed": seed, "run": f"ci+seed={seed}",
                                "claims": {"x": {"holds": hx, "firm": True, "accs": {"a": 0.1 * seed}},
                                           "y": {"holds": hy, "firm": True, "accs": {"a": 0.2}}}}
    folded = fold_seeds(claims, {"runs": [run(0, True, False), run(1, False, False), run(2, True, False)]})
    x, y = folded
    assert x["holds"] and not x["firm"] and not x["holds_every_seed"] and x["seeds"]["holds"] == [True, False, True]
    assert x["seeds"]["spread"] == {"a": [0.0, pytest.approx(0.2)]}
    assert not y["holds"] and y["firm"] and y["same_verdict_every_seed"]
    assert fold_seeds(claims, None) == claims


def test_seed_spread_reads_the_seed_runs_and_write_claims_folds_it_in(tmp_path, monkeypatch):
    src = ROOT / "results" / "ci"
    if not (src / "attacks.json").is_file():
        pytest.skip("no committed ci results")
    monkeypatch.setenv("RSNN_ROOT", str(tmp_path))
    for run in ("ci", "ci+seed=1"):
        (tmp_path / "results" / run).mkdir(parents=True)
        for s in (*paper.CLAIM_SECTIONS, "summary"):
            shutil.copy(src / f"{s}.json", tmp_path / "results" / run / f"{s}.json")
    # seed 1: the ANN of the transfer claim is much less robust, and another summary number moved
    p = tmp_path / "results" / "ci+seed=1"
    a = json.loads((p / "curves.json").read_text())
    a["at_eps_train"]["ann_pgd_at"]["robust_acc"] = 0.0
    (p / "curves.json").write_text(json.dumps(a))
    s = json.loads((p / "summary.json").read_text())
    s["eval.snn.finetuned.clean_acc"] += 0.05
    (p / "summary.json").write_text(json.dumps(s))
    out = paper.seed_spread("ci", {0: "ci", 1: "ci+seed=1"})
    assert out["seeds"] == [0, 1]
    k = out["keys"]["eval.snn.finetuned.clean_acc"]
    assert k["max"] - k["min"] == pytest.approx(0.05)
    assert (tmp_path / "results" / "ci" / "seeds.json").is_file()
    assert (tmp_path / "figures" / "ci" / "seeds_table.md").is_file()
    claims = paper.write_claims("ci")
    by_id = {c["id"]: c for c in claims}
    assert by_id["transfer"]["seeds"]["seeds"] == [0, 1]
    assert all(not c["firm"] or c["same_verdict_every_seed"] for c in claims if "seeds" in c)
    table = (tmp_path / "figures" / "ci" / "claims_table.md").read_text()
    assert "over seeds" in table


def test_seeds_command_errors_are_one_line(capsys):
    from rsnn_paper.cli import main
    assert main(["seeds", "--scale", "ci", "--seeds", "0"]) == 2
    assert "at least two seeds" in capsys.readouterr().err
    assert main(["seeds", "--scale", "ci", "--seeds", "0,x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsnn-paper: error:") and "comma-separated integers" in err and "Traceback" not in err


def test_a_seed_run_reports_its_own_seed_only():
    # a run whose seed is not among the preset's headline seeds is one seed of `rsnn-paper seeds`: it must not build
    # the other seeds' chains (it would retrain the whole preset inside a seed run)
    from rsnn_paper.baselines import BASELINES, headline_seeds
    from rsnn_paper.config import get_config
    first = {k: {"clean_acc": 0.5, "strong.robust_acc": 0.1} for k in ("finetuned", *BASELINES)}
    rows = headline_seeds(get_config("ci", seed=1), first, None, None, store=None)
    assert [r["seed"] for r in rows] == [1]


def test_the_claims_table_shows_the_one_sided_p_values_a_verdict_reads():
    """A directional verdict reads McNemar's one-sided p-value: 5 vs 0 discordant images is p = 1/32 one-sided (firm
    at 0.05) but 1/16 two-sided — the table must show the former, or a firm verdict reads as contradicting its test."""
    from rsnn_paper.paper import _fmt_paired
    a = [True] * 5 + [False] * 95
    b = [False] * 100
    line = _fmt_paired(_paired(a, b))
    assert "5 vs 0 discordant, one-sided p=0.0312 / 1 (two-sided 0.0625)" in line


def test_the_command_line_never_reports_an_unmeasured_claim_as_failing():
    from rsnn_paper.cli import _verdict
    assert _verdict({"holds": None, "firm": False}) == "not measured yet"
    assert _verdict({"holds": False, "firm": True}) == "FAILS, firm"
    assert _verdict({"holds": True, "firm": False}) == "holds"
