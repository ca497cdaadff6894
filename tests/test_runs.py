"""Runs that survive their users: workers die with their parent, one output folder per run, readable errors,
heartbeats, and the summary comparison of CI."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rsnn_paper import cli
from rsnn_paper.config import get_config, stage_key
from rsnn_paper.store import (ArtifactStore, compare_summaries, figures_dir, format_comparison, results_dir, run_name,
                              update_summary)

try:
    import psutil
except ImportError:  # /proc instead
    psutil = None


# ---------------------------------------------------------------- processes
def _children(pid: int) -> list[int]:
    "Every descendant of `pid`."
    if psutil is not None:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    "Running (a zombie, dead but not yet reaped, is not)."
    if psutil is not None:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _snapshot(root: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.iterdir())}


_JOBS = '''
import sys
import torch
from rsnn_paper.data import ImageDataset
from rsnn_paper.models import create_model
from rsnn_paper.store import ArtifactStore
from rsnn_paper.training import TrainStep, fit

EPOCHS = 30  # long enough that no job can finish between the first resume files and the kill


def job(root, key):
    "Train a tiny VGG for EPOCHS epochs with a resume file in the store at `root`; save it as artifact `key`."
    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 10
    x = (torch.rand(96, 3, 32, 32, generator=g) * 120 + y.view(-1, 1, 1, 1) * 12).to(torch.uint8)
    data = ImageDataset(x, y, name="cifar10-exact", split="train", classes=[str(i) for i in range(10)])
    torch.manual_seed(ord(key))
    model = create_model("vgg11", width=1 / 16)
    store = ArtifactStore(root)
    fit(TrainStep(model, "pgd_at", eps=2 / 255, steps=1), data, data.subset(range(20)), epochs=EPOCHS, batch_size=16,
        lr=0.05, seed=3, store=store, key=key, progress=False, desc=f"job {key}")
    store.save(key, model.state_dict(), {"arch": "vgg11"})
    return key
'''


@pytest.mark.skipif(not sys.platform.startswith("linux") and psutil is None, reason="needs /proc or psutil")
def test_workers_die_with_their_parent_and_the_rerun_resumes(tmp_path):
    (tmp_path / "killjobs.py").write_text(_JOBS)
    script = tmp_path / "run.py"
    # the jobs live in an importable module (a spawned worker cannot import a script's __main__)
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import killjobs
        from rsnn_paper.training import run_parallel
        if __name__ == "__main__":  # spawned workers import this file too
            print(run_parallel([(killjobs.job, (r, k)) for r in sys.argv[1:] for k in "ab"], workers=2), flush=True)
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    killed.mkdir()
    parent = subprocess.Popen([sys.executable, str(script), str(killed)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while not all((killed / f"{k}.resume.pt").is_file() for k in "ab"):  # both workers are past epoch 1
            assert parent.poll() is None, parent.stdout.read().decode()
            assert time.time() - t0 < 90, "the workers never wrote a resume file"
            time.sleep(0.1)
        workers = _children(parent.pid)
        assert len(workers) >= 2, workers
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
    finally:
        if parent.poll() is None:
            parent.kill()
    t_kill = time.time()
    while any(_alive(p) for p in workers) and time.time() - t_kill < 10:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), "a worker outlived its parent by 10 s"
    before = _snapshot(killed)
    assert not any(n.endswith(".json") for n in before), before  # killed mid-training: no artifact finished
    time.sleep(2)  # an orphaned worker would finish an epoch (and rewrite its resume file) in about 1 s
    assert _snapshot(killed) == before

    ref.mkdir()
    out = subprocess.run([sys.executable, str(script), str(killed), str(ref)], env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    for k in "ab":
        assert f"{k} resumed from epoch " in out.stdout, out.stdout
        assert f"job {k} epoch 30/30" in out.stdout  # one line per epoch with progress off
    for k in "ab":
        a, _ = ArtifactStore(killed).load(k)
        b, _ = ArtifactStore(ref).load(k)
        for name, v in a.items():
            assert torch.equal(v, b[name]), (k, name)


# ---------------------------------------------------------------- one output folder per run
TINY = ["dataset=cifar10-exact", "test_dataset=cifar10-exact", "n_train=100", "n_val=40", "n_test=20", "width=0.0625",
        "ann_epochs=1", "ann_batch_size=32", "train_attack_steps=1", "val_attack_steps=1", "n_val_eval=20",
        "eval_pgd_steps=1", "eval_batch_size=20", "workers=1"]


def _sets(items):
    return [a for item in items for a in ("--set", item)]


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_run_names_are_readable_safe_and_leave_artifact_keys_alone():
    ci = get_config("ci")
    assert run_name(ci) == "ci" and run_name(get_config("ci", workers=2)) == "ci"  # the preset's own value
    assert run_name(ci.replace(seed=1)) == "ci+seed=1"
    assert run_name(ci.replace(T=8, eps_test=4 / 255)) == "ci+T=8+eps_test=4_255"
    long = run_name(get_config("ci", **parse_tiny()))
    assert len(long) <= 80 and long.startswith("ci+workers=1+dataset=cifar10-exact+") and "/" not in long
    assert long == run_name(get_config("ci", **parse_tiny())) != run_name(get_config("ci", **parse_tiny(), seed=1))
    assert run_name(ci.replace(dataset="../x y")).startswith("ci+dataset=.._x_y+h")  # sanitised, so hashed
    out = ci.replace(out_dir="/tmp/somewhere")
    assert run_name(out) == "ci" and results_dir(out) == figures_dir(out) == Path("/tmp/somewhere")
    assert "out_dir" not in ci.to_dict()
    for stage, extra in (("ann", {"objective": "pgd_at"}), ("convert", {"parent": "ann-x"}),
                         ("finetune", {"parent": "convert-x"}), ("e2e", {"kind": "snn_rat"})):
        assert stage_key(ci, stage, **extra) == stage_key(out, stage, **extra)


def test_a_run_with_overrides_never_touches_the_preset_folders(tmp_path, monkeypatch, capsys):
    proj = tmp_path / "proj"
    for sub in ("results/ci", "figures/ci"):
        (proj / sub).mkdir(parents=True)
    (proj / "results/ci/summary.json").write_text('{"scale": "ci"}\n')
    (proj / "figures/ci/ann_table.md").write_text("committed\n")
    monkeypatch.setenv("RSNN_ROOT", str(proj))
    monkeypatch.setenv("RSNN_ARTIFACTS", str(tmp_path / "artifacts"))
    committed = _tree(proj)

    assert cli.main(["reproduce", "--sections", "ann", "--quiet", *_sets(TINY)]) == 0
    name = run_name(get_config("ci", **parse_tiny()))
    assert name.startswith("ci+") and "workers=1" in name
    out = capsys.readouterr().out
    assert f"results: {proj / 'results' / name}" in out and f"tables and figures: {proj / 'figures' / name}" in out
    assert {p.name for p in (proj / "results" / name).iterdir()} == {"ann.json", "summary.json", "timing.json"}
    assert {"ann_table.md", "ann_table.csv", "ann_learning_curves.png"} <= {p.name for p in (proj / "figures" / name).iterdir()}
    summary = json.loads((proj / "results" / name / "summary.json").read_text())
    assert summary["scale"] == "ci" and "ann.pgd_at.clean_acc" in summary

    dest = tmp_path / "elsewhere"  # --out: everything of the run in one folder (the artifacts are reused)
    assert cli.main(["reproduce", "--sections", "ann", "--quiet", "--out", str(dest), *_sets(TINY)]) == 0
    assert f"results: {dest}" in capsys.readouterr().out
    assert {"ann.json", "summary.json", "ann_table.md", "ann_learning_curves.png"} <= {p.name for p in dest.iterdir()}
    assert json.loads((dest / "ann.json").read_text())["config"]["out_dir"] == str(dest)

    assert sorted(p.name for p in (proj / "results").iterdir()) == sorted(["ci", name])
    after = _tree(proj)
    assert {k: v for k, v in after.items() if k.split("/")[1] == "ci"} == committed  # results/ci, figures/ci untouched


# ---------------------------------------------------------------- errors a user can read
def parse_tiny():
    from rsnn_paper.config import parse_overrides
    return parse_overrides(TINY)


def _one_error_line(capsys, argv, *names):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    assert rc == 2, (cap.out, cap.err)
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("rsnn-paper: error: "), lines[0]
    assert "Traceback" not in cap.err + cap.out
    for n in names:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize("argv,names", [
    (["train-ann", "--set", "ann_epochs=abc"], ["ann_epochs", "'abc'", "an integer"]),
    (["reproduce", "--set", "eps_test=eight"], ["eps_test", "a number"]),
    (["train-ann", "--set", "learn_thresholds=maybe"], ["learn_thresholds", "true or false"]),
    (["train-ann", "--set", "ann_epochs"], ["ann_epochs", "key=value"]),
    (["train-ann", "--set", "epochs=3"], ["unknown configuration key", "'epochs'", "did you mean"]),
    (["reproduce", "--sections", "ann,nosuch"], ["'nosuch'", "--sections", "known sections: ann"]),
    (["reproduce", "--scale", "huge"], ["--scale", "'huge'", "choose from"]),
    (["nosuchcommand"], ["'nosuchcommand'", "rsnn-paper --help"]),
    (["render", "--readme", "--set", "seed=1"], ["--readme"]),
])
def test_user_errors_are_one_line(capsys, argv, names):
    _one_error_line(capsys, argv, *names)


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="ann_epochs"):
        cli.main(["--debug", "train-ann", "--set", "ann_epochs=abc"])
    with pytest.raises(ValueError, match="ann_epochs"):
        cli.main(["train-ann", "--debug", "--set", "ann_epochs=abc"])


def test_missing_and_corrupt_dataset_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RSNN_DATA", str(tmp_path))
    argv = ["train-ann", "--quiet", *_sets(TINY)]
    _one_error_line(capsys, argv, str(tmp_path))
    (tmp_path / "cifar10_exact_subset.npz").write_bytes(b"not a zip file")
    _one_error_line(capsys, argv, "cifar10_exact_subset.npz")


def test_corrupt_and_mismatched_checkpoints_are_one_line(tmp_path, monkeypatch, capsys):
    from rsnn_paper.models import create_model
    monkeypatch.setenv("RSNN_ARTIFACTS", str(tmp_path))
    cfg = get_config("ci", **parse_tiny())
    key = stage_key(cfg, "ann", objective="pgd_at")
    store = ArtifactStore(tmp_path)
    argv = ["train-ann", "--quiet", *_sets(TINY)]

    resume = store.resume_path(key)  # an interrupted training whose resume file is truncated
    resume.write_bytes(b"\x80\x02 truncated")
    _one_error_line(capsys, argv, str(resume), "Delete it")
    torch.save({"something": "else"}, resume)  # readable, but not a training state
    _one_error_line(capsys, argv, str(resume), "delete it")
    resume.unlink()

    store.save(key, create_model("resnet20", width=0.0625).state_dict(), {"arch": "resnet20", "num_classes": 10})
    _one_error_line(capsys, argv, key, "'resnet20' model", "--force")  # another model under this address
    pt, _ = store.paths(key)
    pt.write_bytes(pt.read_bytes()[:100])  # truncated checkpoint
    _one_error_line(capsys, argv, str(pt), "Delete it")


# ---------------------------------------------------------------- resume line and heartbeat
def test_fit_prints_epochs_heartbeats_and_where_it_resumed(tmp_path, capsys):
    from rsnn_paper.data import ImageDataset
    from rsnn_paper.models import create_model
    from rsnn_paper.training import TrainStep, fit
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 10
    data = ImageDataset((torch.rand(64, 3, 32, 32, generator=g) * 255).to(torch.uint8), y, name="cifar10-exact",
                        split="train", classes=[str(i) for i in range(10)])
    store = ArtifactStore(tmp_path)
    run = lambda epochs: fit(TrainStep(create_model("vgg11", width=1 / 16), "clean", eps=0), data, data.subset(range(16)),
                             epochs=epochs, batch_size=16, lr=0.01, store=store, key="ann-0123abcd", progress=False,
                             desc="tiny", heartbeat_s=1e-9)
    run(1)
    out = capsys.readouterr().out
    assert "tiny epoch 1/1: 2/4 batches" in out and "tiny epoch 1/1: loss=" in out
    run(2)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ann-0123abcd resumed from epoch 1 of 2")
    assert any(l.startswith("tiny epoch 2/2: loss=") for l in out)


# ---------------------------------------------------------------- summary comparison
def test_compare_summaries_key_by_key():
    old = {"a": 0.5, "b": 0.25, "gone": 1.0, "scale": "ci", "flag": True}
    new = {"a": 0.5, "b": 0.375, "new": 3, "scale": "ci", "flag": False}
    rows = {r["key"]: r for r in compare_summaries(old, new)}
    assert [r for r in rows] == ["a", "b", "flag", "gone", "new", "scale"]
    assert (rows["a"]["status"], rows["a"]["diff"]) == ("same", 0.0)
    assert (rows["b"]["status"], rows["b"]["diff"]) == ("changed", 0.125)
    assert (rows["gone"]["status"], rows["gone"]["new"], rows["gone"]["diff"]) == ("removed", None, None)
    assert (rows["new"]["status"], rows["new"]["old"]) == ("added", None)
    assert rows["flag"]["status"] == "changed" and rows["flag"]["diff"] is None  # booleans are not numbers
    assert rows["scale"]["diff"] is None
    lines = format_comparison(list(rows.values()))
    assert lines[0].split() == ["key", "committed", "new", "|diff|"]
    assert lines[2].split() == ["b", "0.2500", "0.3750", "0.1250", "changed"]
    assert lines[-1] == "6 keys: 2 same, 2 changed, 1 added, 1 removed; largest |diff| 0.1250 (b)"


def test_compare_command_fails_only_when_a_key_disappears(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RSNN_ROOT", str(tmp_path))
    update_summary("ci", {"a": 0.5, "b": 0.25, "scale": "ci"})
    committed = tmp_path / "committed.json"
    committed.write_text(json.dumps({"a": 0.5, "b": 0.5, "scale": "ci"}))
    assert cli.main(["compare", "--scale", "ci", "--against", str(committed)]) == 0
    out = capsys.readouterr().out
    assert "b" in out and "0.2500" in out and "changed" in out
    committed.write_text(json.dumps({"a": 0.5, "b": 0.5, "c": 1.0, "scale": "ci"}))
    assert cli.main(["compare", "--scale", "ci", "--against", str(committed)]) == 1
    assert "missing" in capsys.readouterr().err
    _one_error_line(capsys, ["compare", "--scale", "ci", "--against", "no-such-revision"], "no-such-revision")


def test_run_parallel_runs_a_program_read_from_stdin(tmp_path):
    """A spawned worker re-runs the parent's __main__, which a program read from stdin does not have as a file: such a
    program gets its jobs run in-process instead of a broken process pool."""
    prog = "from rsnn_paper.training import run_parallel\nimport operator\nprint(run_parallel([(operator.add, (1, 2)), (operator.mul, (3, 4))], workers=2))\n"
    out = subprocess.run([sys.executable, "-"], input=prog, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[3, 12]"


@pytest.mark.skipif(not sys.platform.startswith("linux") and psutil is None, reason="needs /proc or psutil")
@pytest.mark.parametrize("when", ["jobs running", "workers starting"])
def test_a_stopped_run_ends_its_workers_at_once(tmp_path, when):
    """Ctrl-C (or SIGTERM, which `rsnn-paper reproduce` turns into the same stop) while workers run their jobs, or
    while the pool is still starting them: the parent ends them and exits within seconds, instead of waiting for their
    jobs to finish (here: ten minutes of sleep). The limit below is generous (a loaded machine starts Python slowly);
    waiting for the jobs would take ten times longer."""
    script = tmp_path / "run.py"
    # a program started in the background by a non-interactive shell (`.ci/run &`, nohup) inherits SIGINT ignored,
    # and Python then keeps it ignored: the script takes Ctrl-C's default, as in a terminal (this test used to hang so)
    script.write_text(textwrap.dedent("""
        import signal, time
        from rsnn_paper.training import run_parallel
        if __name__ == "__main__":
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print("started", flush=True)
            run_parallel([(time.sleep, (600,)), (time.sleep, (601,))], workers=2)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = set()  # every descendant of the parent seen while it ran: the workers (and multiprocessing's helpers)

    def look():
        if parent.poll() is None:
            try:
                seen.update(_children(parent.pid))
            except Exception:  # the parent ended while we looked
                pass
    try:
        assert parent.stdout.readline().decode().strip() == "started"
        t0 = time.time()
        while len(seen) < (1 if when == "workers starting" else 2):
            assert parent.poll() is None and time.time() - t0 < 120, "the workers never started"
            time.sleep(0.05)
            look()
        if when == "jobs running":
            t1 = time.time()
            while time.time() - t1 < 5:  # the workers import torch before they take a job
                look()
                time.sleep(0.1)
        t_stop = time.time()
        os.kill(parent.pid, signal.SIGINT)  # the parent only, as `rsnn-paper reproduce` gets SIGTERM from `kill`
        while parent.poll() is None and time.time() - t_stop < 60:
            look()
            time.sleep(0.05)
        assert parent.poll() is not None, f"the parent still runs {time.time() - t_stop:.0f} s after the stop"
    finally:
        if parent.poll() is None:
            parent.kill()
    out = parent.stdout.read().decode()
    assert parent.returncode != 0 and "KeyboardInterrupt" in out, out
    t_kill = time.time()
    while any(_alive(p) for p in seen) and time.time() - t_kill < 10:
        time.sleep(0.1)
    assert not any(_alive(p) for p in seen), "a worker outlived the stop"
