"""`rsnn-paper reproduce` records each section's wall time in `results/<run>/timing.json` (one entry per sitting, summed
per section), and the report renders it as `figures/<run>/run_time_table.md`."""
import pytest

from rsnn_paper import cli
from rsnn_paper.paper import render_timing
from rsnn_paper.store import figures_dir, read_json, record_section_time, results_dir


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("RSNN_ROOT", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return tmp_path


HOST = {"cpu": "test cpu", "cpu_count": 2, "torch_threads": 2, "gpu": None, "torch": "x", "rsnn_paper": "y"}


def test_sittings_are_summed_per_section_and_rendered_with_the_headline_total(root):
    record_section_time("cpu", "2026-01-01T00:00:00", "ann", 600.0, HOST)
    record_section_time("cpu", "2026-01-01T00:00:00", "conversion", 120.0, HOST)
    # the sitting was killed during finetuning; the next sitting reloads the ANN and conversion and finishes the rest
    record_section_time("cpu", "2026-01-02T00:00:00", "ann", 6.0, HOST)
    record_section_time("cpu", "2026-01-02T00:00:00", "conversion", 3.0, HOST)
    for s, t in (("finetune", 900.0), ("attacks", 1800.0), ("baselines", 2400.0), ("ablations", 3000.0),
                 ("paper", 9.0)):
        rec = record_section_time("cpu", "2026-01-02T00:00:00", s, t, HOST)
    assert [s["started_at"] for s in rec["sittings"]] == ["2026-01-01T00:00:00", "2026-01-02T00:00:00"]
    assert rec["sections_s"]["ann"] == 606.0 and rec["sections_s"]["conversion"] == 123.0
    assert rec == read_json(results_dir("cpu") / "timing.json")
    md = render_timing("cpu").read_text()
    assert md == (figures_dir("cpu") / "run_time_table.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("|")][2:]
    names = [ln.split("|")[1].strip() for ln in lines]
    assert names[:7] == ["ann", "conversion", "finetune", "attacks", "baselines", "ablations", "paper"]
    total = lines[-1].split("|")
    assert names[-1].startswith("headline sections (ann, conversion, finetune, attacks, baselines, paper)")
    # headline total: 606 + 123 + 900 + 1800 + 2400 + 9 seconds = 97.3 min; the ablations are a further sitting
    assert float(total[2]) == pytest.approx(97.3) and int(total[3]) == 2
    assert "test cpu ×2 cores, 2 torch threads" in md


def test_reproduce_records_every_section_it_ran_and_renders_the_table_after_the_report(root, monkeypatch):
    ran = []
    fake = [(n, lambda cfg, store, progress, chosen=(), n=n: ran.append(n)) for n in ("ann", "conversion", "paper")]
    monkeypatch.setattr(cli, "_sections", lambda: fake)
    assert cli.main(["reproduce", "--scale", "ci", "--sections", "ann,paper", "--quiet"]) == 0
    assert ran == ["ann", "paper"]
    rec = read_json(results_dir("ci") / "timing.json")
    assert set(rec["sections_s"]) == {"ann", "paper"} and len(rec["sittings"]) == 1
    assert set(rec["sittings"][0]["host"]) >= {"cpu", "cpu_count", "torch_threads", "gpu", "torch", "rsnn_paper"}
    md = (figures_dir("ci") / "run_time_table.md").read_text()
    assert "| paper " in md and "| ann " in md  # the report's own time is in its table
    # a second sitting adds itself; the totals are the sums
    assert cli.main(["reproduce", "--scale", "ci", "--sections", "ann", "--quiet"]) == 0
    rec2 = read_json(results_dir("ci") / "timing.json")
    assert len(rec2["sittings"]) == 2
    assert rec2["sections_s"]["ann"] == pytest.approx(sum(s["sections"].get("ann", 0) for s in rec2["sittings"]))


def test_seeds_run_the_chosen_sections_per_seed_and_record_their_time(root, monkeypatch):
    import rsnn_paper.paper as paper
    ran = []
    fake = [(n, lambda cfg, store, progress, chosen=(), n=n: ran.append((cfg.seed, n)))
            for n in ("ann", "conversion", "finetune", "attacks", "baselines", "curves", "budgets", "ablations", "ood",
                      "paper")]
    monkeypatch.setattr(cli, "_sections", lambda: fake)
    monkeypatch.setattr(paper, "seed_spread", lambda target, runs: {"seeds": sorted(runs)})
    monkeypatch.setattr(paper, "write_claims", lambda target: [])
    (results_dir("ci")).mkdir(parents=True)
    (results_dir("ci") / "summary.json").write_text("{}")
    assert cli.main(["seeds", "--scale", "ci", "--seeds", "0,1", "--run", "--sections", "ann,baselines", "--quiet"]) == 0
    assert ran == [(1, "ann"), (1, "baselines")]  # seed 0 is the run itself
    rec = read_json(results_dir("ci+seed=1") / "timing.json")
    assert set(rec["sections_s"]) == {"ann", "baselines"}
    ran.clear()
    assert cli.main(["seeds", "--scale", "ci", "--seeds", "0,1", "--run", "--quiet"]) == 0  # default: the claim sections
    assert [n for _, n in ran] == list(cli.SEED_SECTIONS)
    assert cli.main(["seeds", "--scale", "ci", "--seeds", "0,1", "--run", "--sections", "ann,bogus"]) == 2


def test_a_fresh_run_never_adds_its_times_to_another_stores_sittings(root, monkeypatch):
    """A fresh clone holds the committed results, `timing.json` included; a run there builds its artifacts in a new
    store, and its sittings must not be added to the committed run's (another machine, another store)."""
    record_section_time("cpu", "2026-01-01T00:00:00", "ann", 600.0, HOST)  # the committed run: no store recorded
    record_section_time("cpu", "2026-01-01T00:00:00", "attacks", 900.0, HOST, store_id="other")
    rec = record_section_time("cpu", "2026-01-03T00:00:00", "ann", 50.0, HOST, store_id="mine")
    assert [s["started_at"] for s in rec["sittings"]] == ["2026-01-03T00:00:00"] and rec["sections_s"] == {"ann": 50.0}
    rec = record_section_time("cpu", "2026-01-04T00:00:00", "ann", 5.0, HOST, store_id="mine")  # resumed: adds up
    assert rec["sections_s"] == {"ann": 55.0} and all(s["store"] == "mine" for s in rec["sittings"])
    # reproduce records its store's id, which the store keeps
    fake = [(n, lambda cfg, store, progress, chosen=(), n=n: None) for n in ("ann", "paper")]
    monkeypatch.setattr(cli, "_sections", lambda: fake)
    assert cli.main(["reproduce", "--scale", "cpu", "--sections", "ann", "--quiet"]) == 0
    from rsnn_paper.store import ArtifactStore
    sid = ArtifactStore().store_id
    assert sid == ArtifactStore().store_id and len(sid) == 32
    rec = read_json(results_dir("cpu") / "timing.json")
    assert [s["store"] for s in rec["sittings"]] == [sid]


def test_a_stopped_section_records_its_partial_time_and_the_rerun_adds_to_it(root, monkeypatch):
    """`kill` (SIGTERM) or Ctrl-C during a section: its partial time is recorded as interrupted — the work it finished
    is cached, so the summed wall time of the resumed run is what the run cost — and the stop goes on (exit 143)."""
    import os
    import signal
    import time

    def stop(cfg, store, progress, chosen=()):
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill <pid>` from another shell would
        time.sleep(30)  # the handler interrupts this at once

    fake = [("ann", lambda cfg, store, progress, chosen=(): None), ("finetune", stop), ("paper", lambda *a, **k: None)]
    monkeypatch.setattr(cli, "_sections", lambda: fake)
    before = signal.getsignal(signal.SIGTERM)
    t0 = time.time()
    assert cli.main(["reproduce", "--scale", "cpu", "--sections", "ann,finetune,paper", "--quiet"]) == 143
    assert time.time() - t0 < 10 and signal.getsignal(signal.SIGTERM) == before  # the handler is restored
    rec = read_json(results_dir("cpu") / "timing.json")
    (sit,) = rec["sittings"]
    assert set(sit["sections"]) == {"ann", "finetune"} and sit["interrupted"] == ["finetune"]
    assert 0 <= sit["sections"]["finetune"] < 10 and "paper" not in rec["sections_s"]  # the stop ended the run

    def ctrl_c(cfg, store, progress, chosen=()):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_sections", lambda: [("finetune", ctrl_c)])
    with pytest.raises(KeyboardInterrupt):
        cli.main(["reproduce", "--scale", "cpu", "--sections", "finetune", "--quiet"])
    rec = read_json(results_dir("cpu") / "timing.json")
    assert [s.get("interrupted") for s in rec["sittings"]] == [["finetune"], ["finetune"]]
    # the sitting that finishes it adds its time; the stopped sittings keep their mark
    monkeypatch.setattr(cli, "_sections", lambda: [("finetune", lambda *a, **k: time.sleep(0.05))])
    assert cli.main(["reproduce", "--scale", "cpu", "--sections", "finetune", "--quiet"]) == 0
    rec = read_json(results_dir("cpu") / "timing.json")
    assert len(rec["sittings"]) == 3 and "interrupted" not in rec["sittings"][2]
    assert rec["sections_s"]["finetune"] == pytest.approx(sum(s["sections"]["finetune"] for s in rec["sittings"]))
    assert rec["sections_s"]["finetune"] >= 0.05
