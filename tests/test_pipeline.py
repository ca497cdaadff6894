"""Mechanism tests of the pipeline: configuration, artifact store, training engine (resume, DDP), conversion."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rsnn_paper.config import Config, get_config, parse_overrides, stage_key
from rsnn_paper.conversion import percentile, search_thresholds, transfer_parameters
from rsnn_paper.models import SpikingNet, create_model
from rsnn_paper.neurons import IFNeuron
from rsnn_paper.store import (ArtifactStore, CheckpointMismatchError, CorruptArtifactError, load_into, load_torch,
                              update_summary, write_json)
from rsnn_paper.training import OBJECTIVES, TrainStep, fit


def _tiny_data(n=96, seed=0):
    from rsnn_paper.data import ImageDataset
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = (torch.rand(n, 3, 32, 32, generator=g) * 120 + y.view(-1, 1, 1, 1) * 12).to(torch.uint8)
    return ImageDataset(x, y, name="cifar10-exact", split="train", classes=[str(i) for i in range(10)])


# ---------------------------------------------------------------- configuration
def test_presets_and_overrides():
    assert get_config("paper") == Config(scale="paper")
    p = get_config("paper")
    assert (p.ann_epochs, p.ft_epochs, p.T, p.T_search, p.percentile, p.threshold_scale) == (200, 60, 8, 100, 99.7, 0.3)
    assert (p.ft_eps, p.ft_alpha, p.ft_beta, p.eps_test) == (2 / 255, 1 / 255, 2.0, 8 / 255)
    assert get_config("ci", T=4).T == 4 and get_config("ci").scale == "ci"
    with pytest.raises(ValueError, match="unknown configuration key.*known keys"):
        get_config("ci", epochs=3)
    with pytest.raises(ValueError, match="unknown scale 'huge'.*ci"):
        get_config("huge")
    assert parse_overrides(["width=0.5", "ft_objective=at"]) == {"width": 0.5, "ft_objective": "at"}


def test_stage_keys_depend_on_their_fields_only():
    c = get_config("ci")
    k = stage_key(c, "ann", objective="pgd_at")
    assert k == stage_key(c.replace(eps_test=0.1, ft_lr=1.0), "ann", objective="pgd_at")
    assert k != stage_key(c.replace(ann_epochs=7), "ann", objective="pgd_at")
    assert k != stage_key(c, "ann", objective="clean")
    f = stage_key(c, "finetune", parent="convert-x")
    assert f != stage_key(c.replace(ft_alpha=0.5 / 255), "finetune", parent="convert-x")
    assert f != stage_key(c, "finetune", parent="convert-y")


# ---------------------------------------------------------------- store
def test_store_roundtrip_and_mismatch_errors(tmp_path):
    store = ArtifactStore(tmp_path)
    m = create_model("vgg11", width=1 / 16)
    store.save("a", m.state_dict(), {"arch": "vgg11", "num_classes": 10})
    sd, meta = store.load("a")
    assert meta["version"] and meta["key"] == "a"
    load_into(create_model("vgg11", width=1 / 16), sd, meta)
    with pytest.raises(CheckpointMismatchError, match="'vgg11' model, but the model is 'resnet20'"):
        load_into(create_model("resnet20", width=1 / 16), sd, meta)
    with pytest.raises(CheckpointMismatchError, match="trained for 10 classes, but the model has 100"):
        load_into(create_model("vgg11", num_classes=100, width=1 / 16), sd, meta)
    with pytest.raises(CheckpointMismatchError, match="does not fit"):
        load_into(create_model("vgg11", width=1 / 8), sd, None)  # wrong width, no sidecar to tell


def test_truncated_checkpoint_is_a_clear_error_and_kept(tmp_path):
    store = ArtifactStore(tmp_path)
    store.save("a", create_model("vgg11", width=1 / 16).state_dict(), {"arch": "vgg11"})
    pt, _ = store.paths("a")
    data = pt.read_bytes()
    pt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptArtifactError, match=r"cannot read checkpoint .*a\.pt.*Delete it"):
        store.load("a")
    assert pt.read_bytes() == data[: len(data) // 2]  # not overwritten
    store.move_aside("a")
    assert not store.exists("a") and list(tmp_path.glob("a.pt.corrupt-*"))


def test_results_refuse_nan(tmp_path):
    with pytest.raises(ValueError, match="non-finite"):
        write_json(tmp_path / "r.json", {"acc": float("nan")})
    assert not (tmp_path / "r.json").exists()


def test_summary_is_flat_and_merged(tmp_path, monkeypatch):
    monkeypatch.setenv("RSNN_ROOT", str(tmp_path))
    update_summary("ci", {"ann.clean.clean_acc": torch.tensor(0.5)})
    s = update_summary("ci", {"snn.finetuned.clean_acc": 0.25, "scale": "ci"})
    assert s == {"ann.clean.clean_acc": 0.5, "scale": "ci", "snn.finetuned.clean_acc": 0.25}
    assert json.loads((tmp_path / "results/ci/summary.json").read_text()) == s


# ---------------------------------------------------------------- training engine
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_gives_a_finite_differentiable_loss(objective):
    torch.manual_seed(0)
    m = create_model("vgg11", width=1 / 16)
    m.T = 2 if objective in ("kl_ce", "at") else 0
    step = TrainStep(m, objective, eps=2 / 255, steps=2, alpha=1 / 255, beta=2.0, adversary="rfgsm")
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    loss, logits = step(x, y, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (6, 10) and m.training
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad and p.dim() > 1)


def _fit(tmp_path, epochs, crash_after_batches=None):
    torch.manual_seed(123)  # model init only; fit itself uses explicit generators
    model = create_model("vgg11", width=1 / 16)
    data = _tiny_data()
    step = TrainStep(model, "pgd_at", eps=2 / 255, steps=1)
    if crash_after_batches is not None:
        calls = {"n": 0}
        orig = step.forward

        def crashing(*a, **k):
            calls["n"] += 1
            if calls["n"] > crash_after_batches:
                raise KeyboardInterrupt("killed")
            return orig(*a, **k)
        step.forward = crashing
    out = fit(step, data, data.subset(range(20)), epochs=epochs, batch_size=16, lr=0.05, seed=3, cutout=8,
              store=ArtifactStore(tmp_path), key="run", progress=False)
    return model, out


def test_resume_after_kill_gives_identical_weights(tmp_path):
    ref, ref_out = _fit(tmp_path / "a", epochs=3)
    # 6 batches per epoch: die in the middle of epoch 2, after epoch 1 was saved
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "b", epochs=3, crash_after_batches=9)
    saved = load_torch(ArtifactStore(tmp_path / "b").resume_path("run"))
    assert saved["state"]["epoch"] == 1
    resumed, out = _fit(tmp_path / "b", epochs=3)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r["train_loss"] for r in out["history"]] == [r["train_loss"] for r in ref_out["history"]]


def test_fit_keeps_snapshots_with_their_budget_and_trains_the_same(tmp_path):
    ref, _ = _fit(tmp_path / "a", epochs=3)
    torch.manual_seed(123)
    model = create_model("vgg11", width=1 / 16)
    data = _tiny_data()
    store = ArtifactStore(tmp_path / "b")
    out = fit(TrainStep(model, "pgd_at", eps=2 / 255, steps=1), data, data.subset(range(20)), epochs=3, batch_size=16,
              lr=0.05, seed=3, cutout=8, store=store, key="run", progress=False, snapshot_every=1)
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k  # keeping snapshots changes nothing that is trained
    snaps = out["snapshots"]
    assert [s["epoch"] for s in snaps] == [1, 2, 3]
    times = [s["train_time_s"] for s in snaps]
    assert times == sorted(times) and times[-1] == pytest.approx(out["train_time_s"]) and times[0] > 0
    best = load_torch(store.snapshot_path("run", out["best_epoch"]))
    assert best["epoch"] == out["best_epoch"]
    for k, v in model.state_dict().items():  # the selected epoch's snapshot holds the final weights
        assert torch.equal(best["model"][k], v.cpu()), k
    other = ArtifactStore(tmp_path / "c")
    fit(TrainStep(create_model("vgg11", width=1 / 16), "clean", eps=0.0), data, data.subset(range(20)), epochs=3,
        batch_size=16, lr=0.05, seed=3, store=other, key="run", progress=False, snapshot_every=2)
    assert sorted(p.name for p in other.root.glob("run.epoch*.pt")) == ["run.epoch2.pt"]


@pytest.mark.parametrize("objective", ["clean", "pgd_at"])
def test_fit_leaves_global_rng_alone(tmp_path, objective):
    "Training (shuffling, augmentation, Cutout, the attack's random start, checkpoints) draws from its own generators."
    model = create_model("vgg11", width=1 / 16)
    data = _tiny_data(32)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    fit(TrainStep(model, objective, eps=2 / 255, steps=1), data, data.subset(range(16)), epochs=2, batch_size=16,
        lr=0.01, cutout=8, store=ArtifactStore(tmp_path), key="run", progress=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_ddp_two_processes_gloo_matches_one_process(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_pipeline import _tiny_data
        from rsnn_paper.models import create_model
        from rsnn_paper.training import TrainStep, fit
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = create_model("vgg11", width=1 / 16)
        data = _tiny_data(128)
        out = fit(TrainStep(model, "clean", eps=0), data, data.subset(range(32)), epochs=4, batch_size=32,
                  lr=0.05, seed=1, progress=False)
        if int(os.environ.get("RANK", 0)) == 0:
            json.dump([r["train_loss"] for r in out["history"]], open(sys.argv[1], "w"))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, str(script), str(one)], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                    str(script), str(two)], check=True, env=env, timeout=300)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert len(a) == len(b) == 4
    assert a[-1] < a[0] and b[-1] < b[0]  # both curves fall
    assert np.allclose(a, b, rtol=0.25), (a, b)  # same shape: each rank sees half of every global batch


# ---------------------------------------------------------------- conversion
class TwoLayer(SpikingNet):
    arch = "two_layer"

    def __init__(self):
        super().__init__(2, (0.0,), (1.0,))
        self.fc1, self.act1 = nn.Linear(4, 6, bias=False), IFNeuron()
        self.fc2, self.act2 = nn.Linear(6, 2, bias=False), IFNeuron()

    def forward(self, x):  # x is already [T*B, 4]: T copies of a batch
        T = max(self.T, 1)
        return self.act2(self.fc2(self.act1(self.fc1(x), T)), T)


def test_percentile_matches_numpy():
    x = torch.randn(1001) ** 3
    for q in (0.0, 50.0, 99.7, 100.0):
        assert percentile(x, q).item() == pytest.approx(np.percentile(x.numpy(), q), rel=1e-6, abs=1e-6)


def test_threshold_search_layer_by_layer_by_hand():
    torch.manual_seed(0)
    net = TwoLayer()
    T = 3
    data = [torch.randn(20, 4).repeat(T, 1) for _ in range(2)]
    th = search_thresholds(net, data, T=T, q=99.7)
    w1, w2 = net.fc1.weight.detach(), net.fc2.weight.detach()
    th1 = max(np.percentile((d @ w1.T).numpy(), 99.7) for d in data)
    assert th[0] == pytest.approx(th1, abs=1e-5)
    # layer 2 sees the spikes of layer 1 *with θ1 already set*
    def spikes(cur):
        u, out = torch.zeros_like(cur[:20]), []
        for t in range(T):
            u = u + cur[t * 20:(t + 1) * 20]
            s = (u >= th1).float(); out.append(s); u = u * (1 - s)
        return torch.cat(out)
    th2 = max(np.percentile((spikes(d @ w1.T) @ w2.T).numpy(), 99.7) for d in data)
    assert th[1] == pytest.approx(th2, abs=1e-5)
    assert net.act1.threshold.item() == pytest.approx(th1, abs=1e-5)


def test_threshold_search_runs_without_dropout_and_draws_no_random_numbers():
    "Dropout (VGG's classifier has two) must be off: the search is deterministic and leaves the global RNG alone."
    torch.manual_seed(0)
    snn = transfer_parameters(create_model("vgg11", width=0.125)).eval()
    data = [torch.rand(4, 3, 32, 32) for _ in range(2)]
    state = torch.random.get_rng_state()
    th1 = search_thresholds(snn, data, T=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    th2 = search_thresholds(snn, data, T=2)
    assert th1 == th2 and len(th1) == len(snn.spiking_units())
    assert not any(m.training for m in snn.modules())  # eval mode restored on every module


def test_transfer_copies_weights_not_bn_statistics():
    ann = create_model("resnet20", width=0.25)
    for m in ann.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(3.0); m.weight.data.fill_(2.0)
    snn = transfer_parameters(ann)
    bn = next(m for m in snn.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.all(bn.weight == 2.0) and torch.all(bn.running_mean == 0.0)
    assert torch.equal(snn.conv1.weight, ann.conv1.weight)
    assert snn.fc.bias is not None and torch.all(snn.fc.bias == 0)


# ---------------------------------------------------------------- the chain in one place
def test_build_chain_builds_each_stage_on_its_parent_and_reuses_the_store(tmp_path, monkeypatch):
    import rsnn_paper.ann as ann_mod
    from rsnn_paper.pipeline import build_chain, chain_keys
    torch.set_num_threads(1)
    cfg = Config(scale="ci", device="cpu", arch="vgg11", width=1 / 16, ann_epochs=1, ann_batch_size=32,
                 train_attack_steps=1, T_search=2, search_batches=1, search_batch_size=16, bn_calib_batches=1, T=2,
                 ft_epochs=1, ft_n_train=32, ft_batch_size=16, ft_pgd_steps=1, val_attack_steps=1, n_val_eval=16)
    data = _tiny_data(64)
    splits = (data, data.subset(range(32)), data.subset(range(16)))
    store = ArtifactStore(tmp_path)
    chain = build_chain(cfg, "pgd_at", store, splits)
    keys = chain_keys(cfg, "pgd_at")
    assert {s: m["key"] for s, (_, m) in chain.items()} == keys
    assert chain["convert"][1]["parent"] == keys["ann"] and chain["finetune"][1]["parent"] == keys["convert"]
    assert all(store.exists(k) for k in keys.values())
    calls = []
    monkeypatch.setattr(ann_mod, "fit", lambda *a, **k: calls.append("fit"))  # a second build trains nothing
    again = build_chain(cfg, "pgd_at", store, splits)
    assert calls == [] and {s: m["created"] for s, (_, m) in again.items()} == {s: m["created"] for s, (_, m) in chain.items()}
    for (k, a), b in zip(chain["finetune"][0].state_dict().items(), again["finetune"][0].state_dict().values()):
        assert torch.equal(a, b), k
    upto = build_chain(cfg, "pgd_at", store, splits, upto="convert")
    assert list(upto) == ["ann", "convert"]
    with pytest.raises(ValueError, match="the chain's stages"):
        build_chain(cfg, "pgd_at", store, splits, upto="e2e")
