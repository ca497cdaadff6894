"""Sections 5-8: the SNN-RAT constraint, the ablation grid, the OOD bookkeeping, the claims and the final rendering."""
import json
import math

import pytest
import torch

from rsnn_paper import paper
from rsnn_paper.ablations import ABLATION_GROUPS, ablation_variants
from rsnn_paper.baselines import BASELINES, ParsevalHook, parseval_retraction, project_simplex
from rsnn_paper.config import config_from_dict, get_config, parse_overrides, stage_key
from rsnn_paper.models import create_model


def _gram_error(w):
    m = w.reshape(w.shape[0], -1)
    return torch.linalg.matrix_norm(m @ m.t() - torch.eye(m.shape[0], dtype=m.dtype)).item()


@pytest.mark.parametrize("shape", [(8, 20), (16, 3, 3, 3), (10, 64)])
def test_parseval_retraction_lowers_gram_error(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g, dtype=torch.float64) / math.sqrt(math.prod(shape[1:]))
    errs = [_gram_error(w)]
    for _ in range(30):
        w = parseval_retraction(w, 0.05)
        errs.append(_gram_error(w))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.3 * errs[0]


def test_parseval_retraction_formula_and_rows():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    beta = 0.01
    assert torch.allclose(parseval_retraction(w, beta), (1 + beta) * w - beta * w @ w.t() @ w)
    rows = torch.tensor([1, 4])
    out = parseval_retraction(w, beta, rows)
    keep = [0, 2, 3, 5]
    assert torch.equal(out[keep], w[keep])  # rows not chosen are untouched
    s = w[rows]
    assert torch.allclose(out[rows], (1 + beta) * s - beta * s @ s.t() @ s)


@pytest.mark.parametrize("v,expected", [([0.7, 0.6], [0.55, 0.45]), ([2.0, -1.0], [1.0, 0.0]),
                                        ([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]), ([-1.0, -1.0], [0.5, 0.5])])
def test_project_simplex(v, expected):
    p = project_simplex(torch.tensor(v, dtype=torch.float64))
    assert torch.allclose(p, torch.tensor(expected, dtype=torch.float64))
    assert abs(float(p.sum()) - 1) < 1e-12 and bool((p >= 0).all())


def test_parseval_hook_on_a_model_is_deterministic_and_touches_wide_linear_rows_only_in_part():
    torch.manual_seed(0)
    a = create_model("vgg11", width=0.125)
    b = create_model("vgg11", width=0.125)
    b.load_state_dict(a.state_dict())
    before = a.classifier[0].weight.detach().clone()  # 1024 -> 512: wide, 30% of rows
    last_before = a.classifier[-1].weight.detach().clone()  # 10 outputs: narrow, every row
    with torch.no_grad():
        ParsevalHook(0.004, seed=3)(a)
        ParsevalHook(0.004, seed=3)(b)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    changed = (a.classifier[0].weight != before).any(1)
    assert int(changed.sum()) == int(0.3 * 512)
    # the narrow layer is retracted on every row: exactly one full retraction step
    last = a.classifier[-1].weight.detach()
    assert (last != last_before).any(1).all()
    assert torch.allclose(last, parseval_retraction(last_before, 0.004), atol=1e-7)


def test_parseval_hook_projects_merge_scalars():
    net = create_model("resnet20", width=0.25)
    with torch.no_grad():
        for blk in net.blocks:
            blk.merge_a.fill_(1.2); blk.merge_b.fill_(-0.1)
        ParsevalHook(0.004)(net)
    for blk in net.blocks:
        assert float(blk.merge_a.detach()) == pytest.approx(1.0) and float(blk.merge_b.detach()) == pytest.approx(0.0)


def test_baselines_are_data_and_unknown_names_fail():
    from rsnn_paper.baselines import build_e2e
    assert set(BASELINES) == {"e2e_at", "snn_rat"}
    assert BASELINES["snn_rat"]["objective"] == "fgsm_at" and BASELINES["snn_rat"]["parseval"]
    with pytest.raises(ValueError, match="e2e_at"):
        build_e2e(get_config("ci"), "snn_xyz")
    cfg = get_config("ci")
    assert stage_key(cfg, "e2e", baseline="e2e_at") != stage_key(cfg, "e2e", baseline="snn_rat")
    assert stage_key(cfg, "e2e", baseline="e2e_at") == stage_key(cfg.replace(eps_test=1 / 255), "e2e", baseline="e2e_at")
    assert stage_key(cfg, "e2e", baseline="e2e_at") != stage_key(cfg.replace(rat_beta=0.01), "e2e", baseline="e2e_at")


@pytest.mark.parametrize("scale", ["ci", "cpu", "paper"])
def test_ablation_grid(scale):
    cfg = get_config(scale)
    vs = ablation_variants(cfg)
    assert {v["group"] for v in vs} == set(ABLATION_GROUPS)
    for g in ABLATION_GROUPS:
        rs = [v for v in vs if v["group"] == g]
        assert rs[0]["name"] == "proposed" and rs[0]["overrides"] == {} and rs[0]["ann_objective"] == "pgd_at"
        assert len(rs) >= 2, g  # every group varies something
        assert len({v["name"] for v in rs}) == len(rs)
    for v in vs:
        cfg.replace(**v["overrides"])  # every override is a valid configuration
    objs = {v["ann_objective"] for v in vs if v["group"] == "ann_objective"}
    assert objs == {"pgd_at", *cfg.ablation_ann_objectives}
    assert {v["overrides"].get("ft_objective") for v in vs if v["group"] == "objective"} == {None, "none", "at"}


def test_config_round_trip_and_tuple_overrides():
    cfg = get_config("ci")
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert parse_overrides(["ablation_T=4,16", "ood_severities=1,5", "ablation_alphas=1/255"]) == {
        "ablation_T": (4, 16), "ood_severities": (1, 5), "ablation_alphas": (1 / 255,)}


def test_the_help_of_reproduce_names_every_section_in_order():
    import re
    from rsnn_paper.cli import _sections, build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command" or getattr(a, "choices", None) and
               "reproduce" in (a.choices or {}))
    help_text = " ".join(next(a.help for a in sub.choices["reproduce"]._actions if a.dest == "sections").split())
    names = [n for n, _ in _sections()]
    assert [n for n in re.findall(r"[a-z]+", help_text) if n in names] == names


def test_cli_reproduce_runs_every_section_in_order():
    from rsnn_paper.cli import _sections
    assert [n for n, _ in _sections()] == ["ann", "conversion", "finetune", "attacks", "baselines", "curves", "budgets",
                                            "ablations", "ood",
                                            "paper"]


# ---------------------------------------------------------------- claims and rendering from results files alone

def _acc_n(acc, n):
    return {"acc": acc, "n": n}


def _fake_results(robust_snn=0.30, other_snn=0.22, e2e=0.05, ens=0.10, single=0.13):
    """Minimal results files with the fields the claims read (numbers are parameters of the test)."""
    n = 500
    ann = {"dataset": "cifar10-jpeg", "test_dataset": "cifar10-exact",
           "anns": {"clean": {"clean_acc": 0.52, "pgd_acc_train_eps": 0.28},
                    "pgd_at": {"clean_acc": 0.48, "pgd_acc_train_eps": 0.32}}}
    finetune = {"snns": {"pgd_at": {"n": n, "pgd_acc_train_eps": robust_snn},
                         "clean": {"n": n, "pgd_acc_train_eps": other_snn}}}
    row = lambda acc, clean: {"strong.robust_acc": acc, "strong.converged": True, "pgd.ensemble_acc": acc + 0.05,
                              "clean_acc": clean}
    base = {"n_images": 100, "eps": 8 / 255, "models": {
        "finetuned": row(0.12, 0.45), "e2e_at": row(e2e, 0.30), "snn_rat": row(e2e / 2, 0.28)}}
    st = lambda acc: {"robust_acc": acc, "converged": True}
    attacks = {"n_images": 100, "eps": 8 / 255, "eps_train": 2 / 255,
               "whitebox": {"pgd": {"ensemble_acc": ens + 0.05, "best_single_acc": single + 0.05,
                                    "best_single_source": "pcw_1"}, "fgsm": {"ensemble_acc": 0.2}},
               "strong": {**st(ens), "whitebox_acc": ens},
               "strong_single_source": {**st(single), "source": "pcw_1"},
               "blackbox": {"square_snn": {"robust_acc": 0.2}, "transfer_from_ann": {"robust_acc": 0.25},
                            "square_ann": {"robust_acc": 0.3}}}
    fams = {"gaussian_noise": {"1": 0.4, "5": 0.2}}
    ood = {"n_images": 200, "severities": [1, 5], "clean_acc": {"ann_clean": 0.5, "ann_pgd_at": 0.45, "snn_clean": 0.45,
                                                               "snn_pgd_at": 0.42},
           "corrupted": {"ann_clean": fams, "ann_pgd_at": {"gaussian_noise": {"1": 0.42, "5": 0.35}},
                         "snn_clean": fams, "snn_pgd_at": {"gaussian_noise": {"1": 0.40, "5": 0.33}}}}
    curves = {"n_images": 100, "eps": 8 / 255, "eps_train": 2 / 255, "models": {},
              "at_eps_train": {"snn_pgd_at": st(robust_snn), "snn_clean": st(other_snn), "ann_pgd_at": st(0.32),
                               "ann_clean": st(0.28)}}
    return {"ann": ann, "finetune": finetune, "baselines": base, "attacks": attacks, "curves": curves, "ood": ood}


def test_claims_are_computed_from_the_numbers():
    R = _fake_results()
    cs = {c.__name__: c(R) for c in paper.CLAIMS}
    assert all({"claim", "holds", "firm", "numbers", "eps", "protocol", "test", "converged"} <= set(c)
               for c in cs.values())
    assert cs["claim_transfer"]["eps"] == "2/255" and cs["claim_vs_e2e"]["eps"] == "8/255"
    assert cs["claim_transfer"]["holds"]  # 0.30 > 0.22 and within 5 points of 0.32
    assert cs["claim_vs_e2e"]["holds"] and cs["claim_vs_e2e"]["numbers"]["robustness_ratio"] == pytest.approx(0.12 / 0.05)
    assert cs["claim_ensemble"]["holds"] and not cs["claim_ensemble"]["firm"]
    assert cs["claim_blackbox"]["holds"] and cs["claim_ood"]["holds"]
    # change a number, the verdict follows
    assert not paper.claim_transfer(_fake_results(robust_snn=0.20))["holds"]
    assert not paper.claim_vs_e2e(_fake_results(e2e=0.10))["holds"]
    assert not paper.claim_ensemble(_fake_results(ens=0.13))["holds"]
    R2 = _fake_results()
    R2["attacks"]["blackbox"]["square_snn"]["robust_acc"] = 0.05
    assert not paper.claim_blackbox(R2)["holds"]
    # a claim resting on an evaluation that did not converge is never firm
    R3 = _fake_results(robust_snn=0.45, other_snn=0.10)
    R3["curves"]["at_eps_train"]["ann_pgd_at"]["robust_acc"] = 0.46
    assert paper.claim_transfer(R3)["firm"]
    R3["curves"]["at_eps_train"]["snn_pgd_at"]["converged"] = False
    c = paper.claim_transfer(R3)
    assert c["holds"] and not c["firm"] and c["converged"] is False
    # a run without the curves or the corruptions yet (a further sitting): those claims are pending, the others decided
    R4 = _fake_results()
    del R4["curves"], R4["ood"]
    cs = {c["id"]: c for c in (f(R4) for f in paper.CLAIMS)}
    assert cs["transfer"]["holds"] is None and "curves" in cs["transfer"]["pending"] and not cs["transfer"]["firm"]
    assert cs["ood"]["holds"] is None and "ood" in cs["ood"]["pending"]
    assert cs["vs_e2e"]["holds"] and cs["vs_e2e"]["numbers"]["by_eps"] == {}


def test_claim_vs_e2e_reports_every_eps_of_the_curves_but_decides_at_eps_test():
    R = _fake_results()
    assert paper.claim_vs_e2e(R)["numbers"]["by_eps"] == {}  # results without curves: no by-ε numbers
    curve = lambda *a: {f"{e / 255:.6f}": v for e, v in zip((0, 2, 8), a)}
    m = R["curves"]["models"]
    m["finetuned"] = {"strong_curve": curve(0.45, 0.30, 0.12)}
    m["e2e_at"] = {"strong_curve": curve(0.30, 0.10, 0.05)}
    m["snn_rat"] = {"strong_curve": curve(0.28, 0.0, 0.025)}
    c = paper.claim_vs_e2e(R)
    by = c["numbers"]["by_eps"]
    assert list(by) == ["2/255", "8/255"]  # ε = 0 (clean) is not a robustness comparison
    assert by["2/255"]["ours"]["acc"] == 0.30 and by["2/255"]["ratio"] == pytest.approx(3.0)
    assert c["numbers"]["best_e2e"] == "e2e_at" and c["holds"]  # decided at ε_test as before
    m["snn_rat"]["strong_curve"]["0.007843"] = 0.15  # at each ε the comparison is with the stronger baseline there
    by = paper.claim_vs_e2e(R)["numbers"]["by_eps"]
    assert by["2/255"]["e2e_model"] == "snn_rat" and by["2/255"]["ratio"] == pytest.approx(2.0)
    assert by["8/255"]["e2e_model"] == "e2e_at"
    m["e2e_at"]["strong_curve"]["0.007843"] = m["snn_rat"]["strong_curve"]["0.007843"] = 0.0
    assert "ratio" not in paper.claim_vs_e2e(R)["numbers"]["by_eps"]["2/255"]  # never inf or NaN


def test_the_curves_are_rendered_with_intervals(tmp_path, monkeypatch):
    from rsnn_paper.baselines import CURVE_MODELS, render_curves
    monkeypatch.setenv("RSNN_ROOT", str(tmp_path))
    curve = {f"{e / 255:.6f}": a for e, a in ((0, 0.4), (4, 0.2), (8, 0.1))}
    st = {"robust_acc": 0.3, "converged": True, "robust": "1100"}
    out = {"scale": "ci", "n_images": 100, "eps": 8 / 255, "eps_train": 2 / 255, "T": 4,
           "models": {k: {"label": k, "strong_curve": curve} for k in CURVE_MODELS},
           "at_eps_train": {k: st for k in ("snn_pgd_at", "snn_clean", "ann_pgd_at", "ann_clean")}}
    paths = render_curves(out)
    assert [p.name for p in paths] == ["curve_table.md", "main_eps_curve.png", "attack_eps_curve.png"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    table = paths[0].read_text()
    assert "8/255" in table and "at ε_train: snn_clean" in table and "0.300 [" in table
    assert "Square" not in table  # no along-ε rows without along-ε evaluations
    out["along_eps"] = {f"{4 / 255:.6f}": {"whitebox_acc": 0.2, "blackbox": {"square_snn": {"robust_acc": 0.45}},
                                            "single_source": {"robust_acc": 0.25}},
                        f"{8 / 255:.6f}": {"transfer": {"snn_clean": {"robust_acc": 0.0}, "ann_clean": {"robust_acc": 0.01}}}}
    table = render_curves(out)[0].read_text()
    row = next(ln for ln in table.splitlines() if "finetuned SNN: Square" in ln)
    assert "0.450 [" in row and row.count("[") == 1  # one ε measured, the others left empty
    assert "strong protocol with the single strongest source" in table and "ANN, clean training" in table
    assert "transfer from the PGD-AT ANN" not in table  # not measured: no row


def test_render_all_fails_on_a_missing_results_file(tmp_path, monkeypatch):
    monkeypatch.setenv("RSNN_ROOT", str(tmp_path))
    (tmp_path / "results" / "ci").mkdir(parents=True)
    for s in paper.SECTIONS:
        if s != "baselines":  # a headline section missing: an error naming it
            (tmp_path / "results" / "ci" / f"{s}.json").write_text("{}")
    with pytest.raises(paper.MissingResultError, match="baselines.json"):
        paper.render_all("ci")
    with pytest.raises(paper.MissingResultError, match="rsnn-paper reproduce"):
        paper.compute_claims("ci")


def test_render_all_skips_and_names_the_sections_of_a_later_sitting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RSNN_ROOT", str(tmp_path))
    (tmp_path / "results" / "ci").mkdir(parents=True)
    for s in paper.HEADLINE_SECTIONS:
        (tmp_path / "results" / "ci" / f"{s}.json").write_text("{}")
    rendered = []

    def fake(s):
        def render(out):
            rendered.append(s)
            for f in paper.SECTIONS[s][1]:
                (tmp_path / "figures" / "ci").mkdir(parents=True, exist_ok=True)
                (tmp_path / "figures" / "ci" / f).write_text("x")
        return render
    monkeypatch.setattr(paper, "_renderer", fake)
    paper.render_all("ci")
    assert rendered == list(paper.HEADLINE_SECTIONS)
    assert paper.pending_sections("ci") == ["curves", "budgets", "ablations", "ood"]
    assert "--sections curves,budgets,ablations,ood,paper" in capsys.readouterr().out


def test_render_all_fails_when_a_renderer_leaves_an_output_out(tmp_path, monkeypatch):
    monkeypatch.setenv("RSNN_ROOT", str(tmp_path))
    (tmp_path / "results" / "ci").mkdir(parents=True)
    for s in paper.SECTIONS:
        (tmp_path / "results" / "ci" / f"{s}.json").write_text("{}")
    monkeypatch.setattr(paper, "_renderer", lambda s: (lambda out: None))  # renders nothing
    with pytest.raises(paper.MissingResultError, match="not rendered"):
        paper.render_all("ci")


def test_committed_ci_claims_match_the_committed_results():
    """The committed claims file is what `write_claims` computes from the committed results files."""
    from rsnn_paper.store import project_root
    rdir = project_root() / "results" / "ci"
    if not (rdir / "claims.json").is_file():
        pytest.skip("no committed ci claims")
    saved = json.loads((rdir / "claims.json").read_text())
    fresh = paper.compute_claims("ci")
    assert [c["claim"] for c in saved] == [c["claim"] for c in fresh]
    assert [c["holds"] for c in saved] == [c["holds"] for c in fresh]


def test_update_readme_fills_only_its_block(tmp_path, monkeypatch):
    monkeypatch.setenv("RSNN_ROOT", str(tmp_path))
    fdir = tmp_path / "figures" / "ci"
    fdir.mkdir(parents=True)
    (fdir / "main_table.md").write_text("**main**\n\n| a |\n|---|\n| 1 |\n")
    (fdir / "claims_table.md").write_text("**claims**\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:ci:start -->\nold\n<!-- results:ci:end -->\noutro\n")
    assert paper.update_readme("ci", readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("<!-- results:ci:end -->\noutro\n")
    assert "old" not in text and "**main**" in text and "**claims**" in text
    assert not paper.update_readme("ci", readme)  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="results:ci:start"):
        paper.update_readme("ci", readme)


def test_variant_keys_are_distinct_and_shared_by_the_proposed_rows():
    from rsnn_paper.ablations import variant_key
    cfg = get_config("ci")
    vs = ablation_variants(cfg)
    keys = [variant_key(cfg, v) for v in vs]
    assert len(set(keys)) == len(vs) - len(ABLATION_GROUPS) + 1
    assert len({k for k, v in zip(keys, vs) if v["name"] == "proposed"}) == 1


def test_run_parallel_runs_notebook_functions_here():
    from rsnn_paper.training import run_parallel
    def local(v):
        return v + 1
    local.__module__ = "__main__"  # as a function defined in a notebook: spawned workers could not import it
    assert run_parallel([(local, (1,)), (local, (2,))], workers=2) == [2, 3]
    assert run_parallel([(pow, (2, 5)), (abs, (-3,))], workers=2) == [32, 3]


def test_initial_weights_depend_on_the_configuration_only(tmp_path):
    """PyTorch seeds each new process's global RNG randomly; the ANN's and the baselines' initial weights must not
    depend on it: they are drawn from a seed derived from the run's seed and the artifact's address."""
    from rsnn_paper.ann import build_ann
    from rsnn_paper.baselines import build_e2e
    from rsnn_paper.store import ArtifactStore
    from rsnn_paper.training import seed_from_key
    assert seed_from_key(0, "ann-656ecdc3e7c26a4e") != seed_from_key(1, "ann-656ecdc3e7c26a4e")
    cfg = get_config("ci", dataset="cifar10-exact", n_train=300, n_val=100, n_test=100, ann_epochs=1, e2e_epochs=1, e2e_n_train=64, n_val_eval=50,
                     workers=1)
    for build, arg in ((build_ann, "clean"), (build_e2e, "snn_rat")):
        torch.manual_seed(1)
        a, _ = build(cfg, arg, ArtifactStore(tmp_path / f"a-{arg}"), progress=False)
        torch.manual_seed(2)
        b, _ = build(cfg, arg, ArtifactStore(tmp_path / f"b-{arg}"), progress=False)
        for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), k


def test_budgets_follow_every_training_and_reuse_the_main_tables_record(tmp_path, monkeypatch):
    """The budget points: ours starts at the converted SNN (ANN + conversion time), then one point per finetuning
    snapshot; each baseline one per snapshot; the selected epoch is the main table's record on the budget images."""
    import rsnn_paper.ann as ann_mod
    import rsnn_paper.attack_section as att
    import rsnn_paper.baselines as B
    import rsnn_paper.conversion as conv_mod
    import rsnn_paper.evaluation as ev
    import rsnn_paper.finetune as ft_mod
    import rsnn_paper.training as tr
    from rsnn_paper.models import create_model
    from rsnn_paper.store import ArtifactStore, save_torch
    monkeypatch.setenv("RSNN_ROOT", str(tmp_path))
    store = ArtifactStore(tmp_path / "artifacts")
    store.root.mkdir()
    cfg = get_config("ci", n_budget=4)
    n = 10
    x, y = torch.rand(n, 3, 32, 32), torch.arange(n) % 10
    net = create_model("vgg11", width=1 / 16)

    def meta(key, epochs, best, t_epoch=10.0):
        for e in range(1, epochs + 1):
            save_torch(store.snapshot_path(key, e), {"model": net.state_dict(), "epoch": e})
        return {"key": key, "train_time_s": epochs * t_epoch, "best_epoch": best,
                "snapshots": [{"epoch": e, "train_time_s": e * t_epoch} for e in range(1, epochs + 1)]}
    import rsnn_paper.pipeline as pipe
    fake_keys = {"ann": "ann", "convert": "conv", "finetune": "ft"}
    monkeypatch.setattr(pipe, "chain_keys", lambda cfg, objective="pgd_at", upto="finetune": {
        k: v for k, v in fake_keys.items() if pipe.CHAIN_STAGES.index(k) <= pipe.CHAIN_STAGES.index(upto)})
    monkeypatch.setattr(tr, "load_splits", lambda cfg: (None, None, None))
    monkeypatch.setattr(ev, "eval_images", lambda cfg, test: (x, y))
    monkeypatch.setattr(ann_mod, "build_ann", lambda *a, **k: (net, {"key": "ann", "train_time_s": 100.0}))
    monkeypatch.setattr(conv_mod, "build_converted", lambda *a, **k: (net, {"key": "conv", "convert_time_s": 5.0}))
    monkeypatch.setattr(ft_mod, "build_finetuned", lambda *a, **k: (net, meta("ft", 3, best=3)))
    monkeypatch.setattr(B, "build_e2e", lambda cfg, kind, *a, **k: (net, meta(f"e2e-{kind}", 4, best=2)))
    final = {"robust": [i % 2 == 0 for i in range(n)], "clean_correct": [True] * n, "converged": True}
    monkeypatch.setattr(att, "evaluate_protocols", lambda m, key, *a, **k: ({}, final))
    seen = []

    def fake_strong(model, key, xb, yb, eps, cfg, store, **k):
        seen.append(key)
        assert len(yb) == 4 and eps == cfg.eps_test
        return {"robust": [False] * len(yb), "clean_correct": [True] * len(yb), "converged": True}
    monkeypatch.setattr(ev, "strong", fake_strong)
    out = B.run_budgets_section(cfg, store, progress=False)
    ours = out["methods"]["finetuned"]["points"]
    assert [p["epoch"] for p in ours] == [0, 1, 2, 3]
    assert [p["train_time_s"] for p in ours] == [105.0, 115.0, 125.0, 135.0]
    assert [p["final"] for p in ours] == [False, False, False, True]
    idx = B._budget_subset(cfg, y)
    assert ours[-1]["robust_acc"] == sum(final["robust"][i] for i in idx.tolist()) / 4  # the main table's, sliced
    at = out["methods"]["e2e_at"]["points"]
    assert [(p["epoch"], p["train_time_s"], p["final"]) for p in at] == [(1, 10.0, False), (2, 20.0, True),
                                                                          (3, 30.0, False), (4, 40.0, False)]
    assert sorted(seen) == sorted(["conv", "ft@epoch1", "ft@epoch2", *[f"e2e-{k}@epoch{e}" for k in B.BASELINES
                                                                      for e in (1, 3, 4)]])
    from rsnn_paper.store import figures_dir, results_dir
    assert (figures_dir(cfg) / "budget_curve.png").is_file() and (results_dir(cfg) / "budgets.json").is_file()
    assert "selected" in (figures_dir(cfg) / "budget_table.md").read_text()


def test_the_baselines_run_the_paper_protocol_in_full_only_for_the_configured_attacks(monkeypatch):
    import rsnn_paper.attack_section as att
    seen = {}

    def fake_whitebox(model, key, x, y, attack, eps, cfg, store, sources=None, mode="full", sanity=False, progress=False):
        seen[(key, attack)] = mode
        return {"attack": attack, "robust": [True], "clean_correct": [True]}
    monkeypatch.setattr(att, "whitebox", fake_whitebox)
    monkeypatch.setattr(att, "strong", lambda *a, **k: {})
    cpu = get_config("cpu")
    for key in ("e2e-abc", "finetune-abc", "ann-abc"):
        att.evaluate_protocols(None, key, None, None, cpu, None)
    assert cpu.e2e_full_attacks == ("pgd",)
    assert {a: seen[("e2e-abc", a)] for a in ("fgsm", "pgd", "apgd-ce")} == {"fgsm": "cascade", "pgd": "full",
                                                                            "apgd-ce": "cascade"}
    assert all(seen[(k, a)] == "full" for k in ("finetune-abc", "ann-abc") for a in ("fgsm", "pgd", "apgd-ce"))
    att.evaluate_protocols(None, "e2e-abc", None, None, get_config("ci"), None)  # ci and paper: everything in full
    assert get_config("ci").e2e_full_attacks == get_config("paper").e2e_full_attacks == ("fgsm", "pgd", "apgd-ce")
    for bad in (("fgsm",), ("pgd", "square")):
        with pytest.raises(ValueError, match="e2e_full_attacks"):
            att.evaluate_protocols(None, "e2e-abc", None, None, cpu.replace(e2e_full_attacks=bad), None)


def _bits(k: int, n: int = 100) -> str:
    "Per-image outcomes: the first `k` of `n` images robust."
    return "1" * k + "0" * (n - k)


def test_every_claim_is_also_decided_at_every_eps_of_the_curve():
    """With the `curves` section's along-ε evaluations, the transfer, ensemble and black-box claims get a verdict at
    every ε (`numbers.by_eps`, ascending, each naming its ε, firm only where that point converged); the headline
    verdict stays at the paper's reading point."""
    R = _fake_results()
    e = lambda k: f"{k / 255:.6f}"
    pt = lambda acc, bits, conv=True: {"robust_acc": acc, "robust": bits, "converged": conv}
    R["curves"]["models"] = {
        "finetuned": {"strong_curve": {e(0): 0.45, e(2): 0.30, e(4): 0.20, e(8): 0.12},
                      "strong_curve_robust": {e(2): _bits(30), e(4): _bits(20), e(8): _bits(12)},
                      "strong_curve_converged": {e(0): True, e(2): True, e(4): True, e(8): True}},
        "ann_pgd_at": {"strong_curve": {e(2): 0.30, e(4): 0.25, e(8): 0.15},
                       "strong_curve_robust": {e(2): _bits(30), e(4): _bits(25), e(8): _bits(15)},
                       "strong_curve_converged": {e(2): True, e(4): True, e(8): True}}}
    bb = lambda acc: {"attack": "square", "robust_acc": acc, "robust": _bits(round(acc * 100))}
    R["curves"]["along_eps"] = {
        e(2): {"single_source": {**pt(0.35, _bits(35)), "source": "pcw_1"},
               "whitebox_robust": _bits(32), "whitebox_acc": 0.32,
               "blackbox": {"square_snn": bb(0.6), "transfer_from_ann": bb(0.7), "transfer_from_other_snn": bb(0.8)},
               "transfer": {"snn_clean": pt(0.05, _bits(5)), "ann_clean": pt(0.10, _bits(10))}},
        e(4): {"single_source": {**pt(0.26, _bits(26), conv=False), "source": "pcw_1"},
               "whitebox_robust": _bits(21), "whitebox_acc": 0.21,
               "blackbox": {"square_snn": bb(0.15), "transfer_from_ann": bb(0.5), "transfer_from_other_snn": bb(0.6)},
               "transfer": {"snn_clean": pt(0.01, _bits(1)), "ann_clean": pt(0.02, _bits(2))}},
        e(8): {"transfer": {"snn_clean": pt(0.0, _bits(0)), "ann_clean": pt(0.0, _bits(0))}}}
    ens = paper.claim_ensemble(R)
    by = ens["numbers"]["by_eps"]
    assert list(by) == ["2/255", "4/255", "8/255"]  # ε_test from the attack section's own records
    assert by["2/255"]["holds"] and by["2/255"]["firm"] and by["2/255"]["converged"] is True
    assert by["2/255"]["paired"]["n_a_only"] == 5  # five images only the single source leaves robust
    assert by["4/255"]["holds"] and not by["4/255"]["firm"] and by["4/255"]["converged"] is False
    assert (by["8/255"]["holds"], by["8/255"]["firm"]) == (ens["holds"], ens["firm"])
    bbc = paper.claim_blackbox(R)["numbers"]["by_eps"]
    assert bbc["2/255"]["holds"] and bbc["2/255"]["firm"]
    assert not bbc["4/255"]["holds"]  # Square (0.15) beats the white-box stages (0.21) there
    assert bbc["4/255"]["firm"]  # McNemar: 6 images only the white-box attacks leave robust, none the other way
    tr = paper.claim_transfer(R)["numbers"]["by_eps"]
    assert list(tr) == ["2/255", "4/255", "8/255"]
    assert tr["2/255"]["holds"] and tr["2/255"]["firm"] and tr["2/255"]["gap_to_ann"] == pytest.approx(0.0)
    assert tr["4/255"]["holds"] and tr["4/255"]["gap_to_ann"] == pytest.approx(0.05)
    assert not tr["8/255"]["holds"] or tr["8/255"]["snn_from_clean_ann"]["acc"] == 0.0
    # without along-ε evaluations (`curve_claims=()`, or no curves yet) the claims have no by-ε verdicts
    R["curves"]["along_eps"] = {}
    assert all(f(R)["numbers"]["by_eps"] == {} for f in (paper.claim_ensemble, paper.claim_blackbox,
                                                          paper.claim_transfer))
    # vs_e2e: a point whose evaluation did not converge is reported, never firm
    m = R["curves"]["models"]
    m["e2e_at"] = {"strong_curve": {e(2): 0.05, e(8): 0.05}, "strong_curve_robust": {e(2): _bits(5), e(8): _bits(5)},
                   "strong_curve_converged": {e(2): False, e(8): True}}
    m["snn_rat"] = {"strong_curve": {e(2): 0.04, e(8): 0.02}, "strong_curve_converged": {e(2): True, e(8): True}}
    m["finetuned"]["strong_curve"] = {e(2): 0.30, e(8): 0.12}
    v = paper.claim_vs_e2e(R)["numbers"]["by_eps"]
    assert v["2/255"]["holds"] and not v["2/255"]["firm"] and v["2/255"]["converged"] is False
    assert v["8/255"]["converged"] is True


def test_along_eps_evaluates_each_configured_claim_at_every_eps(monkeypatch):
    import rsnn_paper.baselines as B
    import rsnn_paper.evaluation as ev
    from rsnn_paper.surrogates import GRADIENT_SOURCES
    n = 4
    x, y = torch.rand(n, 3, 8, 8), torch.arange(n)
    calls = []

    def fake_strong(model, key, xb, yb, eps, cfg, store, sources=GRADIENT_SOURCES, **k):
        calls.append((key, round(eps * 255), len(sources)))
        robust = [True, key == "ft", False, False]
        return {"protocol": "strong", "eps": eps, "n": n, "robust_acc": sum(robust) / n, "robust": robust,
                "clean_correct": [True] * n, "converged": True,
                "broken_by": [None, None if key == "ft" else ["pgd", "pcw_1", 1], ["square", None, -1],
                              ["pgd", "pcw_1", 0]]}

    def fake_blackbox(model, key, xb, yb, attack, eps, cfg, store, source=None, **k):
        robust = [True, False, False, False] if attack == "square" else [True] * n
        return {"attack": attack, "eps": eps, "n": n, "clean_acc": 1.0, "robust_acc": sum(robust) / n,
                "robust": robust}
    monkeypatch.setattr(ev, "strong", fake_strong)
    monkeypatch.setattr(ev, "blackbox", fake_blackbox)
    M = {k: (None, k2) for k, k2 in (("snn_pgd_at", "ft"), ("ann_pgd_at", "ann"), ("snn_clean", "ftc"),
                                     ("ann_clean", "annc"))}
    cfg = get_config("cpu")
    assert cfg.curve_claims == B.CURVE_CLAIMS and get_config("ci").curve_claims == ()
    out = B.along_eps(cfg, M, x, y, None, "pcw_0.5")
    assert list(out) == [f"{e:.6f}" for e in cfg.eps_curve if e > 0]
    at_test = out[f"{cfg.eps_test:.6f}"]
    assert set(at_test) == {"transfer"}  # at ε_test the attack section's records decide the other claims
    p1 = out[f"{1 / 255:.6f}"]
    assert set(p1) == {"single_source", "whitebox_robust", "whitebox_acc", "blackbox", "warnings", "transfer"}
    assert p1["single_source"]["source"] == "pcw_0.5" and ("ft", 1, 1) in calls  # one source only
    assert ("ft", 1, len(GRADIENT_SOURCES)) in calls  # the curve's own point, for its white-box outcomes
    assert ("ftc", 1, len(GRADIENT_SOURCES)) in calls and ("annc", 1, 1) in calls
    assert p1["whitebox_robust"] == "1110" and p1["whitebox_acc"] == 0.75  # Square's break is not white-box
    assert set(p1["blackbox"]) == {"square_snn", "transfer_from_ann", "transfer_from_other_snn"}
    assert p1["blackbox"]["square_snn"]["robust"] == "1000"
    assert len(p1["warnings"]) == 1 and "square_snn" in p1["warnings"][0]  # stronger than the white-box attacks
    only = B.along_eps(cfg.replace(curve_claims=("ensemble",)), M, x, y, None, "pcw_1")
    assert all(set(v) <= {"single_source"} for v in only.values())
    assert B.along_eps(get_config("ci"), M, x, y, None, "pcw_1") == {}  # ci: curve_claims=()
    only = B.along_eps(cfg.replace(curve_claims=("blackbox",)), M, x, y, None, "pcw_1")
    assert f"{cfg.eps_test:.6f}" not in only  # nothing to evaluate at ε_test: no point
    with pytest.raises(ValueError, match="unknown curve_claims"):
        B.along_eps(cfg.replace(curve_claims=("bogus",)), M, x, y, None, "pcw_1")


# ---------------------------------------------------------------- pipelining: no core idles while a longer job runs

class _Jobs(Exception):
    pass


def _capture_jobs(jobs, workers):
    raise _Jobs(jobs)


def test_the_ann_section_builds_the_clean_snn_chain_where_the_clean_ann_trained(monkeypatch, tmp_path):
    """The clean ANN trains in about half the time of the PGD-AT one; its process goes on to convert and finetune the
    clean ANN's SNN (which the finetuning section needs) instead of leaving a core idle — only when asked."""
    import rsnn_paper.ann as A
    import rsnn_paper.pipeline as P
    from rsnn_paper.store import ArtifactStore
    monkeypatch.setattr(A, "load_splits", lambda cfg: (None, None, None))
    monkeypatch.setattr(A, "run_parallel", _capture_jobs)
    store = ArtifactStore(tmp_path)
    cfg = get_config("ci")
    with pytest.raises(_Jobs) as e:
        A.run_ann_section(cfg, store=store, chain_ahead=("clean",))
    assert {a[1]: a[3] for _, a in e.value.args[0]} == {"clean": True, "pgd_at": False}
    with pytest.raises(_Jobs) as e:
        A.run_ann_section(cfg, store=store)
    assert {a[1]: a[3] for _, a in e.value.args[0]} == {"clean": False, "pgd_at": False}
    built = []
    monkeypatch.setattr(A, "build_ann", lambda cfg, o, store, **k: built.append(("ann", o)) or (None, {"key": "k"}))
    monkeypatch.setattr(P, "build_chain", lambda cfg, o, store, upto: built.append((upto, o)))
    assert A._ann_job(cfg, "clean", str(tmp_path), True) == "k"
    assert built == [("ann", "clean"), ("finetune", "clean")]
    built.clear()
    A._ann_job(cfg, "pgd_at", str(tmp_path))
    assert built == [("ann", "pgd_at")]


def test_reproduce_chains_the_clean_snn_ahead_only_when_the_finetuning_section_runs(monkeypatch):
    import rsnn_paper.ann as A
    from rsnn_paper.cli import _sections
    seen = []
    monkeypatch.setattr(A, "run_ann_section", lambda cfg, store=None, progress=True, chain_ahead=(): seen.append(
        tuple(chain_ahead)))
    run = dict(_sections())["ann"]
    run(get_config("ci"), None, False, ["ann", "conversion", "finetune"])
    run(get_config("ci"), None, False, ["ann"])
    run(get_config("ci"), None, False)
    assert seen == [("clean",), (), ()]


def test_each_baseline_process_evaluates_its_model_after_training(monkeypatch, tmp_path):
    """The two end-to-end trainings run in parallel and each process then evaluates its model (the shorter training
    frees its core for that); the section reads the cached evaluations back."""
    import rsnn_paper.baselines as B
    import rsnn_paper.evaluation as ev
    import rsnn_paper.pipeline as P
    import rsnn_paper.training as tr
    calls = []
    x, y = torch.zeros(2, 3, 32, 32), torch.tensor([0, 1])
    monkeypatch.setattr(B, "build_e2e", lambda cfg, kind, store, **k: ("model", {"key": f"e2e-{kind}"}))
    monkeypatch.setattr(tr, "load_splits", lambda cfg: (None, None, "test"))
    monkeypatch.setattr(ev, "eval_images", lambda cfg, test: (x, y))
    monkeypatch.setattr(P, "build_chain", lambda cfg, o, store, splits, upto: {"ann": ("ann", {"key": f"ann-{o}"})})
    monkeypatch.setattr(B, "evaluate_snn", lambda m, key, xb, yb, cfg, store, ann: calls.append((m, key, ann)))
    cfg = get_config("ci")
    assert B._e2e_job(cfg, "snn_rat", str(tmp_path), True) == "e2e-snn_rat"
    assert calls == [("model", "e2e-snn_rat", ("ann", "ann-pgd_at"))]  # transfer from the PGD-AT ANN, as the table
    calls.clear()
    B._e2e_job(cfg, "snn_rat", str(tmp_path))
    assert calls == []
    import rsnn_paper.attack_section as att
    monkeypatch.setattr(att, "section_models", lambda *a, **k: {"ann_pgd_at": ("ann", "ann-k"),
                                                                "snn_pgd_at": ("snn", "ft-k")})
    monkeypatch.setattr(B, "run_parallel", _capture_jobs)
    from rsnn_paper.store import ArtifactStore
    with pytest.raises(_Jobs) as e:
        B.run_baselines_section(cfg, ArtifactStore(tmp_path), progress=False)
    assert sorted((a[1], a[3]) for _, a in e.value.args[0]) == [("e2e_at", True), ("snn_rat", True)]


def _fake_curve_world(monkeypatch, tmp_path):
    """The curves section on stand-ins: `strong`/`blackbox` record what they are asked (model key, ε in 255ths,
    sources or attack), models are (None, key) pairs, nothing is trained or attacked."""
    import rsnn_paper.attack_section as S
    import rsnn_paper.baselines as B
    import rsnn_paper.evaluation as ev
    import rsnn_paper.training as TR
    from rsnn_paper.surrogates import DEFAULT_SOURCE, GRADIENT_SOURCES
    n, calls = 4, []
    rec = lambda acc: {"protocol": "strong", "n": n, "robust_acc": acc, "robust": [True, False, False, False],
                       "clean_acc": 1.0, "clean_correct": [True] * n, "converged": True,
                       "broken_by": [None, ["pgd", "pcw_1", 0], ["pgd", "pcw_1", 0], ["pgd", "pcw_1", 0]]}

    def fake_strong(model, key, x, y, eps, cfg, store, sources=GRADIENT_SOURCES, **k):
        calls.append(("strong", key, round(eps * 255, 6), tuple(getattr(s, "name", s) for s in sources)))
        return rec(0.25)

    def fake_blackbox(model, key, x, y, attack, eps, cfg, store, source=None, **k):
        calls.append(("blackbox", key, round(eps * 255, 6), attack, None if source is None else source[1]))
        return {"attack": attack, "eps": eps, "n": n, "clean_acc": 1.0, "robust_acc": 0.25,
                "robust": [True, False, False, False]}
    M = {k: (None, k) for k in ("snn_pgd_at", "ann_pgd_at", "snn_clean", "ann_clean")}
    nets = {"finetuned": (M["snn_pgd_at"], GRADIENT_SOURCES), "e2e_at": ((None, "e2e-at"), GRADIENT_SOURCES),
            "snn_rat": ((None, "e2e-rat"), GRADIENT_SOURCES), "ann_pgd_at": (M["ann_pgd_at"], (DEFAULT_SOURCE,))}
    assert set(nets) == {"finetuned", *BASELINES, "ann_pgd_at"}
    monkeypatch.setattr(ev, "strong", fake_strong)
    monkeypatch.setattr(ev, "blackbox", fake_blackbox)
    monkeypatch.setattr(ev, "eval_images", lambda cfg, test: (torch.zeros(n, 3, 8, 8), torch.arange(n)))
    monkeypatch.setattr(TR, "load_splits", lambda cfg: (None, None, None))
    monkeypatch.setattr(B, "_curve_nets", lambda cfg, store, splits, progress=False: (M, nets))
    monkeypatch.setattr(S, "evaluate_protocols", lambda m, key, x, y, cfg, store, sources=None, progress=False: (
        {"pgd": {"best_single_source": "pcw_0.5"}}, rec(0.25)))
    monkeypatch.setattr(B, "render_curves", lambda out: [])
    monkeypatch.setattr(B, "write_json", lambda path, obj: None)
    return B, calls


@pytest.mark.parametrize("scale", ["ci", "cpu"])
def test_curve_jobs_are_exactly_the_evaluations_the_curves_section_reads(monkeypatch, tmp_path, scale):
    """The `curves` section first runs `curve_jobs` side by side (cfg.workers processes), then assembles its results
    from the cache: the jobs must compute every evaluation the assembly asks for — else the main process computes
    it alone, after the parallel phase — each once (two jobs computing the same cached record would race)."""
    B, calls = _fake_curve_world(monkeypatch, tmp_path)
    cfg = get_config(scale)
    out = B.run_curves_section(cfg.replace(workers=1), store=None, progress=False)
    read = {c for c in calls if not (c[0] == "strong" and abs(c[2] - cfg.eps_test * 255) < 1e-6 and
                                     c[1] in ("snn_pgd_at", "ann_pgd_at", "e2e-at", "e2e-rat"))}
    # (the main table's points at ε_test are the attack and baseline sections' records, not the curves')
    calls.clear()
    jobs = B.curve_jobs(cfg, "pcw_0.5")
    for j in jobs:
        B._curve_job(cfg, j, str(tmp_path))
    done = list(calls)
    assert len(done) == len(set(done)) and set(done) == read
    off = [e for e in cfg.eps_curve if e > 0 and abs(e - cfg.eps_test) > 1e-12]
    assert sum(1 for c in done if c[0] == "blackbox") == (3 * len(off) if "blackbox" in cfg.curve_claims else 0)
    assert set(out["along_eps"]) == ({f"{e:.6f}" for e in cfg.eps_curve if e > 0} if cfg.curve_claims else set())
    assert jobs[0][:2] == ("strong", "finetuned") and jobs[0][2] == min(float(e) for e in cfg.eps_curve if e > 0)
    if scale == "ci":  # 2/255 = ε_train: the curve points of the PGD-AT chain are the transfer claim's as well
        assert sorted(j[1] for j in jobs) == sorted(["finetuned", "e2e_at", "snn_rat", "ann_pgd_at", "snn_clean",
                                                     "ann_clean"])


def test_the_curves_section_runs_its_jobs_in_cfg_workers_processes(monkeypatch, tmp_path):
    import rsnn_paper.training as TR
    B, calls = _fake_curve_world(monkeypatch, tmp_path)
    monkeypatch.setattr(TR, "run_parallel", _capture_jobs)
    cfg = get_config("cpu")
    with pytest.raises(_Jobs) as e:
        B.run_curves_section(cfg, store=None, progress=False)
    jobs = e.value.args[0]
    assert [a[1] for _, a in jobs] == B.curve_jobs(cfg, "pcw_0.5") and all(f is B._curve_job for f, _ in jobs)
    calls.clear()
    B.run_curves_section(cfg.replace(workers=1), store=None, progress=False)  # one worker: no pool, same results
