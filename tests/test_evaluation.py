"""The evaluation is an upper bound: best-iterate success in every iterative attack, the strong protocol, and its
convergence check (paper §4: robustness is only as good as the strongest attack tried)."""

import pytest
import torch
from torch import nn

import rsnn_paper.attacks as A


class Band(nn.Module):
    """A 2-class model on images whose mean brightness m decides the class: class 1 (wrong for label 0) wins only
    while m lies in a narrow band; its gradient always pushes m up. PGD without random start therefore walks m up
    through the band (fooled there) and out again (correct at its last iterate)."""

    def __init__(self, lo: float, hi: float):
        super().__init__()
        self.lo, self.hi = lo, hi
        self.num_classes = 2

    def forward(self, x):
        m = x.flatten(1).mean(1)
        inside = ((m > self.lo) & (m < self.hi)).float()
        value = torch.stack([1 - 2 * inside, 2 * inside - 1], 1)  # class 1 wins inside the band
        push = torch.stack([-m, m], 1)  # straight-through gradient: raise m to raise class 1
        return value + (push - push.detach())


def test_pgd_reports_an_earlier_success_when_the_last_iterate_is_correct():
    model = Band(0.525, 0.545)
    x = torch.full((3, 1, 2, 2), 0.5)
    y = torch.zeros(3, dtype=torch.long)
    rec = {}
    x_adv = A.pgd(model, x, y, eps=0.1, steps=10, alpha=0.01, random_start=False, record=rec)
    m_last = 0.5 + 10 * 0.01
    assert not (m_last > model.lo and m_last < model.hi)  # the last iterate is correct ...
    assert (model(x_adv).argmax(1) != y).all()  # ... but the attack returns the earlier, fooling iterate
    assert rec["iterate"].tolist() == [3, 3, 3] and rec["restart"].tolist() == [0, 0, 0]
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6


def test_run_ensemble_counts_best_iterate_breaks_and_records_the_iterate():
    model = Band(0.525, 0.545)
    x = torch.full((4, 1, 2, 2), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    fn = lambda m, x, y, eps, generator=None, record=None: A.pgd(m, x, y, eps, steps=10, alpha=0.01,
                                                                  random_start=False, record=record)
    res = A.run_ensemble(model, x, y, fn, 0.1, sources=("pcw_1",), progress=False, sanity=False)
    assert res["clean_acc"] == 1.0 and res["ensemble_acc"] == 0.0
    assert res["broken_by"] == [["pcw_1", 3, 0]] * 4


@pytest.mark.parametrize("name", ["apgd-ce", "rfgsm"])
def test_other_iterative_attacks_keep_their_first_success(name):
    # clean images are correct; random starts land in the band for some, and later steps leave it again
    model = Band(0.505, 0.56)
    x = torch.full((8, 1, 4, 4), 0.5)
    y = torch.zeros(8, dtype=torch.long)
    rec = {}
    x_adv = A.ATTACKS[name](model, x, y, 0.2, generator=torch.Generator().manual_seed(0), record=rec)
    fooled = model(x_adv).argmax(1) != y
    assert (model(x).argmax(1) == y).all()
    assert ((rec["iterate"] >= 0) == fooled).all()  # every recorded success is returned, and only those
    assert fooled.any()


# ---------------------------------------------------------------- the strong protocol
from rsnn_paper.config import get_config
from rsnn_paper.evaluation import (convergence_stages, paper_stages, run_protocol, stage, strong, strong_stages,
                                   whitebox)
from rsnn_paper.models import create_model
from rsnn_paper.store import ArtifactStore


def _tiny(T=2, seed=0):
    torch.manual_seed(seed)
    net = create_model("vgg11", width=1 / 16, threshold=0.3).eval()
    net.T = T
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(24, 3, 32, 32, generator=g)
    y = A.true_logits(net, x).argmax(1)  # every image clean-correct
    return net, x, y


SMALL = dict(eval_pgd_steps=3, apgd_steps=3, strong_steps=5, strong_restarts=1, strong_targets=2, square_queries=20)


def test_strong_protocol_is_never_weaker_per_image_than_the_paper_protocol():
    net, x, y = _tiny()
    cfg = get_config("ci", **SMALL)
    srcs = ("pcw_1", "rect_1", "ann")
    paper = [A.run_ensemble(net, x, y, s.attack, 2 / 255, sources=srcs, progress=False, sanity=False, **s.kw)
             for s in paper_stages(cfg)]
    st = run_protocol(net, x, y, strong_stages(cfg), 2 / 255, sources=srcs, prior=paper, check=convergence_stages(cfg),
                      sanity=False, long_sources=2)
    rows = [r for r in st["per_stage"] if r.get("kind") == "stage"]
    assert [len(r["sources"]) for r in rows] == [3, 3, 2, 2, 2, 0]  # the long attacks: the 2 strongest sources
    for r in paper:
        assert all(p or not s for s, p in zip(st["robust"], r["robust"])), r["attack"]
    assert st["robust_acc"] <= min(r["ensemble_acc"] for r in paper)
    broken = [i for i, r in enumerate(st["robust"]) if not r]
    assert all(st["broken_by"][i] is not None for i in broken)  # every break says which stage/source/iterate
    assert all(st["broken_by"][i] is None for i, r in enumerate(st["robust"]) if r)
    assert st["per_stage"][-1]["robust_acc"] >= st["robust_acc"] - 1e-12


def test_convergence_flag_trips_when_the_protocol_is_cut_to_one_weak_step():
    net, x, y = _tiny(T=0)
    weak = (stage("pgd", steps=1, alpha=1e-4),)
    with pytest.warns(A.UnreliableEvaluationWarning, match="not converged"):
        res = run_protocol(net, x, y, weak, 8 / 255, sources=("pcw_1",), check=(stage("apgd-ce", steps=20),),
                           sanity=False)
    assert res["converged"] is False and res["reliable"] is False
    assert res["convergence"]["newly_broken"] > 0.01 * len(y)
    assert res["robust_acc"] < res["before_check_acc"]  # what the check broke still counts
    ok = run_protocol(net, x, y, (stage("apgd-ce", steps=20),), 1.0, sources=("pcw_1",),
                      check=(stage("apgd-ce", steps=20),), sanity=False)
    assert ok["converged"] is True and ok["robust_acc"] == 0.0


def test_cached_evaluations_are_keyed_by_the_images_and_every_attack_parameter(tmp_path):
    net, x, y = _tiny(T=0)
    store = ArtifactStore(tmp_path)
    cfg = get_config("ci", **SMALL)
    a = whitebox(net, "model-key", x[:12], y[:12], "pgd", 8 / 255, cfg, store, sources=("pcw_1",))
    y_other = (y[12:] + 1) % 10  # other images and labels: every clean prediction is now wrong
    b = whitebox(net, "model-key", x[12:], y_other, "pgd", 8 / 255, cfg, store, sources=("pcw_1",))
    assert a["clean_acc"] == 1.0 and b["clean_acc"] == 0.0  # never served the result cached for other images
    c = whitebox(net, "model-key", x[:12], y[:12], "pgd", 8 / 255, cfg.replace(eval_pgd_steps=4), store,
                 sources=("pcw_1",))
    assert c["attack_kwargs"]["steps"] == 4
    s1 = strong(net, "model-key", x[:12], y[:12], 8 / 255, cfg, store, sources=("pcw_1",), quiet=True)
    s2 = strong(net, "model-key", x[:12], y[:12], 8 / 255, cfg.replace(strong_steps=6), store, sources=("pcw_1",),
                quiet=True)
    assert any("steps=6" in s for s in s2["stages"]) and not any("steps=6" in s for s in s1["stages"])
    assert len(list(tmp_path.glob("strong-*.json"))) == 2


def _tiny_snn(seed=0):
    import torch
    from rsnn_paper.models import create_model
    torch.manual_seed(seed)
    m = create_model("vgg11", width=1 / 16).eval()
    m.T = 2
    for u in m.spiking_units():
        u.threshold.data.fill_(0.05)
    return m


def test_pgd_and_apgd_stop_attacking_broken_images_without_changing_any_outcome():
    # a broken image leaves the batch (best-iterate success keeps its first fooling iterate); every other image's
    # trajectory is its own, so the outcome and the returned image of every sample are those of the full-batch attack
    import torch
    from rsnn_paper.attacks import _apgd_run, ce_loss, eval_mode, pgd
    m = _tiny_snn()
    x = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), eval_mode(m):
        y = m(x).argmax(1)  # every image starts correct
    with eval_mode(m):
        for eps in (1 / 255, 8 / 255):
            ra, rb = {}, {}
            a = pgd(m, x, y, eps, steps=6, generator=torch.Generator().manual_seed(2), record=ra)
            b = pgd(m, x, y, eps, steps=6, generator=torch.Generator().manual_seed(2), record=rb, compact=False)
            assert torch.equal(ra["iterate"], rb["iterate"]) and torch.allclose(a, b, atol=1e-6)
            assert 0 < int((ra["iterate"] >= 0).sum()) < len(y) or eps == 8 / 255  # some broken, some not (1/255)
            loss = lambda idx: (lambda z: ce_loss(z, y[idx]))
            full = _apgd_run(m, x, y, eps, 6, loss(torch.arange(24)), 0.75, torch.Generator().manual_seed(3))
            cut = _apgd_run(m, x, y, eps, 6, loss(torch.arange(24)), 0.75, torch.Generator().manual_seed(3),
                            subset_loss=loss)
            still_f, still_c = full[1], cut[1]
            assert torch.equal(still_f, still_c) and torch.equal(full[4], cut[4])  # who was broken, and when
            assert torch.allclose(full[3][~still_f], cut[3][~still_c], atol=1e-6)  # the first fooling iterates
            assert torch.allclose(full[0][still_f], cut[0][still_c], atol=1e-6)  # the best-loss points of survivors


class _Labels(nn.Module):
    "Predicts the label written in the image's first pixel (every image is clean-correct)."
    num_classes = 10

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].round().long(), 10).float()


def test_the_long_attacks_and_the_check_use_the_sources_that_break_most_on_their_own(monkeypatch):
    """The sources of the long attacks and of the convergence round are ranked by what each breaks alone in a
    full-mode ensemble, not by first breaks in grid order (a cascade, or a full-mode record's `broken_by`, credits the
    first source of the grid with every image several sources break — the cpu run's check used such a source and
    passed while the strongest source alone broke 1.8% more)."""
    import rsnn_paper.evaluation as E
    n = 8
    y = torch.arange(n) % 10
    x = y.float().view(n, 1, 1, 1).expand(n, 3, 2, 2).clone()
    calls = []

    def fake_stage(model, xb, yb, st, eps, sources, seed, batch_size, path, sanity, progress, mode="cascade"):
        names = [s.name for s in sources]
        calls.append((st.label, names, mode))
        m = len(yb)
        hit = {nm: [] for nm in names}
        if st.label.startswith("pgd(steps=") and mode == "full":  # the first stage: rect_1 alone breaks the most
            hit.update({"pcw_1": [0], "rect_1": [0, 1, 2]} if "rect_1" in hit else {})
        broken = set(i for v in hit.values() for i in v)
        return {"attack": st.attack, "mode": mode, "robust": [i not in broken for i in range(m)],
                "clean_correct": [True] * m, "fooled_by": hit,
                "broken_by": [None if i not in broken else [next(nm for nm in names if i in hit[nm]), 1, 0]
                              for i in range(m)]}
    monkeypatch.setattr(E, "_run_stage", fake_stage)
    cfg = get_config("ci", **SMALL)
    srcs = ("pcw_1", "exp_1", "rect_1")
    # no prior: the first stage runs in full mode and ranks the sources
    res = run_protocol(_Labels(), x, y, strong_stages(cfg), 8 / 255, sources=srcs, check=convergence_stages(cfg),
                       check_sources=1, sanity=False, long_sources=1)
    assert calls[0][2] == "full" and calls[0][1] == list(srcs)
    assert res["solo_breaks"] == {"pcw_1": 0.5, "exp_1": 0.0, "rect_1": 2.5}  # image 0: broken by two, ½ each
    long = [c for c in calls[2:] if not c[0].startswith("square")]
    assert len(long) == 5 and all(c[1] == ["rect_1"] and c[2] == "cascade" for c in long)  # long attacks and check: rect_1
    assert res["convergence"]["sources"] == ["rect_1"]
    # with a full-mode prior: pcw_1 is credited first in grid order with images both break, rect_1 breaks more alone
    calls.clear()
    prior = {"attack": "pgd", "mode": "full", "robust": [False] * 4 + [True] * 4, "clean_correct": [True] * n,
             "fooled_by": {"pcw_1": [0, 1], "exp_1": [], "rect_1": [0, 1, 2, 3]},
             "broken_by": [["pcw_1", 1, 0]] * 2 + [["rect_1", 1, 0]] * 2 + [None] * 4}
    res = run_protocol(_Labels(), x, y, strong_stages(cfg), 8 / 255, sources=srcs, prior=[prior],
                       check=convergence_stages(cfg), check_sources=1, sanity=False, long_sources=1)
    assert res["convergence"]["sources"] == ["rect_1"]
    assert all(c[1] == ["rect_1"] for c in calls[2:] if not c[0].startswith("square"))
    # the first-breaker count alone (the old ranking) would have tied 2–2 and picked pcw_1, first in the grid
    assert E._rank_sources(prior["broken_by"], list(srcs))[0] == "pcw_1"
    assert E._rank_sources(prior["broken_by"], list(srcs), E._solo_counts([prior], srcs))[0] == "rect_1"


def test_a_strong_result_of_an_older_procedure_is_never_served(tmp_path, monkeypatch):
    import rsnn_paper.evaluation as E
    net, x, y = _tiny(T=0)
    store = ArtifactStore(tmp_path)
    cfg = get_config("ci", **SMALL)
    strong(net, "model-key", x[:6], y[:6], 8 / 255, cfg, store, sources=("pcw_1",), quiet=True)
    monkeypatch.setattr(E, "STRONG_VERSION", E.STRONG_VERSION + 1)
    strong(net, "model-key", x[:6], y[:6], 8 / 255, cfg, store, sources=("pcw_1",), quiet=True)
    assert len(list(tmp_path.glob("strong-*.json"))) == 2


def test_the_source_ranking_weighs_each_break_by_its_rarity():
    """The easy images every source breaks must not decide which source runs the long attacks: an image that k sources
    break counts 1/k (on the cpu run the unweighted count put exp_2 first — FGSM's favourite — while pcw_0.5 led the
    iterative attacks on the images few sources break)."""
    import rsnn_paper.evaluation as E
    easy = list(range(12))
    rec = {"mode": "full", "fooled_by": {"a": easy, "b": easy[:9] + [20, 21], "c": easy}}
    sc = E._solo_counts([rec], ["a", "b", "c"])
    assert sc["a"] == pytest.approx(9 / 3 + 3 / 2) and sc["b"] == pytest.approx(9 / 3 + 2)
    assert E._rank_sources([None] * 22, ["a", "b", "c"], sc)[0] == "b"  # unweighted: a (12) before b (11)
    assert E._solo_counts([{**rec, "mode": "cascade"}], ["a", "b"]) == {"a": 0.0, "b": 0.0}  # cascade counts depend on order


def test_the_convergence_check_escalates_while_it_still_breaks_images(monkeypatch):
    """A convergence round that still breaks more than `tol` of the images is followed by one with twice the iterations
    and one more source (up to `conv_rounds`); the protocol is converged once a round breaks at most `tol`, and every
    round's breaks count (on the cpu run one round of 2× effort broke 1.1% more and the number stood unconverged)."""
    import rsnn_paper.evaluation as E
    n = 40
    y = torch.arange(n) % 10
    x = y.float().view(n, 1, 1, 1).expand(n, 3, 2, 2).clone()
    calls = []

    def fake_stage(breaks_per_check):
        def run(model, xb, yb, st, eps, sources, seed, batch_size, path, sanity, progress, mode="cascade"):
            names = [s.name for s in sources]
            kind = path.name if path is not None else ""
            calls.append((st.label, names, st.kw))
            m = len(yb)
            # the protocol's first stage breaks 10 images, each convergence round `breaks_per_check` more
            k = 10 if mode == "full" else 0
            if st.label.startswith("apgd-ce(n_restarts=2"):
                k = min(m, breaks_per_check.pop(0))
            hit = {nm: (list(range(k)) if nm == names[0] else []) for nm in names}
            return {"attack": st.attack, "mode": mode, "robust": [i >= k for i in range(m)],
                    "clean_correct": [True] * m, "fooled_by": hit,
                    "broken_by": [[names[0], 1, 0] if i < k else None for i in range(m)], "kind": kind}
        return run

    cfg = get_config("ci", **SMALL).replace(conv_rounds=3, conv_sources=1)
    srcs = ("pcw_1", "exp_1", "rect_1")
    monkeypatch.setattr(E, "_run_stage", fake_stage([3, 0]))  # round 1 breaks 3 (7.5%), round 2 none: converged
    res = run_protocol(_Labels(), x, y, strong_stages(cfg), 8 / 255, sources=srcs, check=E.convergence_rounds(cfg),
                       check_sources=1, tol=0.01, sanity=False)
    rounds = res["convergence"]["rounds"]
    assert [r["newly_broken"] for r in rounds] == [3, 0] and res["converged"] is True
    assert [len(r["sources"]) for r in rounds] == [1, 2]  # one more source each round
    checks = [c for c in calls if c[0].startswith(("apgd-ce(n_restarts=2", "pgd(n_restarts=2"))]
    steps = [dict(c[2])["steps"] for c in checks]
    assert steps == [2 * cfg.strong_steps] * 2 + [4 * cfg.strong_steps] * 2  # twice the iterations each round
    assert res["robust_acc"] == pytest.approx((n - 10 - 3) / n)  # round 1's breaks count
    assert res["convergence"]["newly_broken"] == 3 and res["convergence"]["delta"] == 0.0
    calls.clear()
    monkeypatch.setattr(E, "_run_stage", fake_stage([3, 2, 2]))  # every round breaks more than 1%: not converged
    with pytest.warns(A.UnreliableEvaluationWarning, match="last of 3 convergence round"):
        res = run_protocol(_Labels(), x, y, strong_stages(cfg), 8 / 255, sources=srcs,
                           check=E.convergence_rounds(cfg), check_sources=1, tol=0.01, sanity=False)
    assert res["converged"] is False and len(res["convergence"]["rounds"]) == 3
    assert res["convergence"]["newly_broken"] == 7 and res["robust_acc"] == pytest.approx((n - 17) / n)
    assert [len(r["sources"]) for r in res["convergence"]["rounds"]] == [1, 2, 3]
    # one round given as a plain sequence of stages stays one round
    monkeypatch.setattr(E, "_run_stage", fake_stage([3]))
    with pytest.warns(A.UnreliableEvaluationWarning):
        res = run_protocol(_Labels(), x, y, strong_stages(cfg), 8 / 255, sources=srcs,
                           check=E.convergence_stages(cfg), check_sources=1, sanity=False)
    assert len(res["convergence"]["rounds"]) == 1 and res["converged"] is False
