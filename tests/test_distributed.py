"""Data-parallel training and evaluation: N gloo processes on CPU give what one process gives.

Every training stage of the chain (robust ANN, KL+CE finetuning, end-to-end PGD-AT, SNN-RAT with its Parseval hook)
is run under `torchrun --nproc_per_node=2` and in one process on the same global batches: the weights must agree to
float tolerance. The 19-source ensemble split across 2 ranks (`distributed_ensemble`) must give the per-image record
of one `run_ensemble`."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

HERE = Path(__file__).parent

CHAIN = textwrap.dedent(f"""
    import json, os, sys, torch
    sys.path.insert(0, {str(HERE)!r})
    from test_pipeline import _tiny_data
    from rsnn_paper.config import get_config
    from rsnn_paper.store import ArtifactStore
    from rsnn_paper.ann import build_ann
    from rsnn_paper.conversion import build_converted
    from rsnn_paper.finetune import build_finetuned
    from rsnn_paper.baselines import build_e2e
    torch.set_num_threads(1)
    out, root = sys.argv[1], sys.argv[2]
    rank = int(os.environ.get("RANK", 0))
    # NCHW (channels_last=False): see GRADS below
    cfg = get_config("ci", device="cpu", workers=1, width=1 / 16, channels_last=False, T=2, n_train=None,
                     ann_epochs=1, ann_batch_size=16, train_attack_steps=1, T_search=4, search_batches=1, search_batch_size=16,
                     bn_calib_batches=1, ft_epochs=1, ft_batch_size=16, ft_n_train=None, e2e_epochs=1,
                     e2e_batch_size=16, e2e_n_train=None, e2e_attack_steps=1, val_attack_steps=1, n_val_eval=None)
    data = _tiny_data(64)
    train, val = data.subset(range(48)), data.subset(range(48, 64))
    store = ArtifactStore(root + f"/rank{{rank}}")  # each rank its own store: every rank trains, none loads
    ann, am = build_ann(cfg, "pgd_at", store, (train, val, val), progress=False)
    conv, cm = build_converted(cfg, ann, am["key"], train, store, progress=False)
    ft, _ = build_finetuned(cfg, conv, cm["key"], train, val, store, progress=False)
    nets = {{"ann": ann, "finetuned": ft}}
    for kind in ("e2e_at", "snn_rat"):
        nets[kind] = build_e2e(cfg, kind, store, (train, val, val), progress=False)[0]
    torch.save({{k: {{n: t.detach().cpu() for n, t in m.state_dict().items()}} for k, m in nets.items()}},
               out + f".rank{{rank}}")
""")


def _run(args, env, tmp_path):
    r = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_every_training_stage_two_ranks_equals_one_process(tmp_path):
    script = tmp_path / "chain.py"
    script.write_text(CHAIN)
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _run([sys.executable, str(script), str(one), str(tmp_path / "a1")], _env(), tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
          str(script), str(two), str(tmp_path / "a2")], _env(), tmp_path)
    a = torch.load(f"{one}.rank0")
    b0, b1 = torch.load(f"{two}.rank0"), torch.load(f"{two}.rank1")
    for stage in ("ann", "finetuned", "e2e_at", "snn_rat"):
        for name, t in a[stage].items():
            assert torch.equal(b0[stage][name], b1[stage][name]), (stage, name, "ranks differ")
            if t.is_floating_point():
                assert torch.allclose(t, b0[stage][name], rtol=1e-4, atol=1e-5), \
                    (stage, name, float((t - b0[stage][name]).abs().max()))
            else:
                assert torch.equal(t, b0[stage][name]), (stage, name)


# The chain above runs in NCHW: in channels-last, oneDNN picks its convolution kernels by batch size, so a rank's
# half batch rounds differently from one process's whole batch, and the training's PGD/RFGSM adversaries (sign of the
# input gradient) amplify that rounding to 1e-3 in the weights within three steps. That DDP itself is exact in
# channels-last (the `paper` preset's layout) is shown on the gradient, before any sign is taken:
GRADS = textwrap.dedent(f"""
    import os, sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from rsnn_paper.models import create_model
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    r = dist.get_rank()
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        m = create_model("vgg11", width=1 / 16, dropout=0.0).to(memory_format=fmt).train()
        x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=fmt)
        d = DDP(m, find_unused_parameters=True)
        d(x[8 * r:8 * (r + 1)]).logsumexp(1).sum().backward()
        if r == 0:
            torch.save({{n: p.grad for n, p in m.named_parameters() if p.grad is not None}},
                       sys.argv[1] + ("-nhwc" if fmt == torch.channels_last else "-nchw"))
    dist.destroy_process_group()
""")


def test_ddp_gradients_are_the_same_in_channels_last(tmp_path):
    script = tmp_path / "grads.py"
    script.write_text(GRADS)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29543",
          str(script), str(tmp_path / "g")], _env(), tmp_path)
    a, b = torch.load(tmp_path / "g-nchw"), torch.load(tmp_path / "g-nhwc")
    assert set(a) == set(b) and len(a) > 10
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-5 * float(a[n].abs().max())), n


ENSEMBLE = textwrap.dedent(f"""
    import json, sys, torch
    from rsnn_paper.models import create_model
    from rsnn_paper.evaluation import distributed_ensemble
    from rsnn_paper.surrogates import GRADIENT_SOURCES
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("resnet20", width=1 / 16, threshold=0.3).eval()
    model.T = 2
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 32, 32, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::4] = (y[::4] + 1) % 10  # two clean-wrong images, never attacked
    res = distributed_ensemble(model, x, y, "pgd", 64 / 255, sources=GRADIENT_SOURCES,
                               generator=torch.Generator().manual_seed(3), batch_size=2, progress=False,
                               steps=1, sanity=False, state_dir=sys.argv[2])
    if torch.distributed.get_rank() == 0:
        json.dump(res, open(sys.argv[1], "w"))
""")

PER_IMAGE = ("robust", "clean_correct", "broken_by", "fooled_by", "per_source", "cumulative", "ensemble_acc",
             "clean_acc", "best_single_acc", "best_single_source", "attacked_n", "zero_grad_frac", "checks", "n",
             "sources", "attack", "base_seed", "warnings")


def test_distributed_ensemble_two_ranks_equals_run_ensemble(tmp_path):
    from rsnn_paper.attacks import run_ensemble
    from rsnn_paper.models import create_model
    from rsnn_paper.surrogates import GRADIENT_SOURCES
    script = tmp_path / "ens.py"
    script.write_text(ENSEMBLE)
    out = tmp_path / "two.json"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29542",
          str(script), str(out), str(tmp_path / "state")], _env(), tmp_path)
    two = json.loads(out.read_text())
    # the same evaluation in this process, with run_ensemble itself
    torch.manual_seed(0)
    model = create_model("resnet20", width=1 / 16, threshold=0.3).eval()
    model.T = 2
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 32, 32, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::4] = (y[::4] + 1) % 10
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_ensemble(model, x, y, "pgd", 64 / 255, sources=GRADIENT_SOURCES,
                           generator=torch.Generator().manual_seed(3), batch_size=2, progress=False, steps=1,
                           sanity=False)
    finally:
        torch.set_num_threads(threads)
    one = json.loads(json.dumps(one))
    assert two["distributed"]["world"] == 2
    for k in PER_IMAGE:
        assert two[k] == one[k], k
    assert 0 < sum(one["robust"]) < sum(one["clean_correct"]) < 8  # some broken, some not: a real comparison
    assert len({b[0] for b in one["broken_by"] if b}) > 1  # broken by several sources, in batches of both ranks


def test_distributed_ensemble_single_process_is_run_ensemble():
    "Without a process group it is `run_ensemble` (plus a `distributed` note)."
    from rsnn_paper.attacks import run_ensemble
    from rsnn_paper.evaluation import distributed_ensemble
    from rsnn_paper.models import create_model
    torch.manual_seed(0)
    model = create_model("resnet20", width=1 / 16, threshold=0.3).eval()
    model.T = 2
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    a = distributed_ensemble(model, x, y, "fgsm", 8 / 255, sources=("pcw_1", "ste"), progress=False, sanity=False)
    b = run_ensemble(model, x, y, "fgsm", 8 / 255, sources=("pcw_1", "ste"), progress=False, sanity=False)
    assert a["distributed"] == {"world": 1, "rank_batches": None}
    assert {k: v for k, v in a.items() if k not in ("elapsed_s", "distributed")} == \
        {k: v for k, v in b.items() if k != "elapsed_s"}


def test_a_group_joined_by_the_library_is_left_at_exit(monkeypatch):
    """`_dist_setup` joins the process group under torchrun and registers `_dist_teardown` at exit, which leaves it (a
    gloo group left to the interpreter's teardown aborted finished ranks now and then)."""
    import atexit
    import torch.distributed as dist
    from rsnn_paper import training
    calls, registered = [], []
    joined = {"on": False}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: joined["on"])
    monkeypatch.setattr(dist, "init_process_group", lambda backend: (calls.append(("init", backend)),
                                                                     joined.update(on=True)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: (calls.append(("destroy",)), joined.update(on=False)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(atexit, "register", registered.append)
    assert training._dist_setup(torch.device("cpu")) == (1, 2)
    assert training._dist_setup(torch.device("cpu")) == (1, 2)  # joined once, registered once
    assert calls == [("init", "gloo")] and registered == [training._dist_teardown]
    registered[0]()
    assert calls[-1] == ("destroy",) and not joined["on"]
    registered[0]()  # nothing left to leave: a no-op
    assert calls.count(("destroy",)) == 1
