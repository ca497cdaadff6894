"""Tests for rsnn_paper.metrics: Wilson and bootstrap intervals, and the spike rates / synaptic operations / energy
of a spiking forward, checked against independent closed formulas and brute-force Python loops."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from rsnn_paper import metrics as M
from rsnn_paper.models import SpikingNet, create_model
from rsnn_paper.neurons import IFNeuron
from rsnn_paper.surrogates import gradient_source


# ------------------------------------------------------------------------------------------------ uncertainty
def _wilson_by_hand(k, n, z=1.96):
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return c - h, c + h


@pytest.mark.parametrize("k,n", [(38, 100), (1, 7), (380, 1000), (5, 10), (999, 1000), (3, 10000)])
def test_wilson_matches_closed_formula(k, n):
    lo, hi = M.wilson_interval(k, n)
    elo, ehi = _wilson_by_hand(k, n)
    assert isinstance(lo, float) and isinstance(hi, float)
    assert lo == pytest.approx(elo, abs=1e-12) and hi == pytest.approx(ehi, abs=1e-12)
    assert 0 <= lo <= k / n <= hi <= 1


@pytest.mark.parametrize("k,n", [(0, 20), (20, 20), (38, 100), (1, 7), (999, 1000)])
def test_wilson_matches_scipy(k, n):
    stats = pytest.importorskip("scipy.stats")
    ci = stats.binomtest(k, n).proportion_ci(method="wilson")
    z = float(stats.norm.ppf(0.975))
    lo, hi = M.wilson_interval(k, n, z=z)
    assert lo == pytest.approx(ci.low, abs=1e-9) and hi == pytest.approx(ci.high, abs=1e-9)
    lo196, hi196 = M.wilson_interval(k, n)  # z = 1.96 vs 1.95996...: tiny difference
    assert abs(lo196 - ci.low) < 1e-4 and abs(hi196 - ci.high) < 1e-4


def test_wilson_edges_and_errors():
    lo, hi = M.wilson_interval(0, 30)
    assert lo == 0.0 and hi == pytest.approx(_wilson_by_hand(0, 30)[1]) and hi > 0
    lo, hi = M.wilson_interval(30, 30)
    assert hi == 1.0 and lo == pytest.approx(_wilson_by_hand(30, 30)[0]) and lo < 1
    assert M.wilson_interval(0, 0) == (0.0, 1.0)
    for k, n in [(-1, 5), (6, 5), (1, -1)]:
        with pytest.raises(ValueError):
            M.wilson_interval(k, n)
    assert M.accuracy_interval(0.38, 100) == M.wilson_interval(38, 100)
    assert M.accuracy_interval(0.3333, 3) == M.wilson_interval(1, 3)  # k = round(acc * n)
    with pytest.raises(ValueError):
        M.accuracy_interval(1.2, 10)


def test_format_acc():
    lo, hi = _wilson_by_hand(190, 500)
    assert M.format_acc(0.38, 500) == f"0.380 [{lo:.3f}, {hi:.3f}]" == "0.380 [0.339, 0.423]"
    assert M.format_acc(0.0, 10).startswith("0.000 [0.000, ")
    assert M.format_acc(1.0, 10).endswith(", 1.000]")


def _outcomes(n=800, p=0.4, seed=3):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < p


def test_bootstrap_interval_deterministic_and_covers():
    c = _outcomes()
    acc = c.float().mean().item()
    a = M.bootstrap_interval(c, generator=torch.Generator().manual_seed(5))
    b = M.bootstrap_interval(c.numpy().astype(np.int64), generator=torch.Generator().manual_seed(5))
    assert a == b and all(isinstance(v, float) for v in a)
    assert M.bootstrap_interval(c) == M.bootstrap_interval(c)  # generator=None: seeded 0, not the global RNG
    assert M.bootstrap_interval(c, generator=torch.Generator().manual_seed(6)) != a
    assert a[0] <= acc <= a[1]
    wl, wh = M.wilson_interval(int(c.sum()), c.numel())
    assert abs(a[0] - wl) < 0.012 and abs(a[1] - wh) < 0.012
    narrow = M.bootstrap_interval(c, level=0.5)
    assert a[0] < narrow[0] <= narrow[1] < a[1]
    assert M.bootstrap_interval(torch.ones(50)) == (1.0, 1.0)
    with pytest.raises(ValueError):
        M.bootstrap_interval(torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError):
        M.bootstrap_interval(torch.tensor([]))


def test_paired_bootstrap_diff():
    a = _outcomes()
    b = a.clone()
    b[a.nonzero()[:24, 0]] = False  # b loses 24 images that a gets right, and nothing else changes
    r = M.paired_bootstrap_diff(a, b, generator=torch.Generator().manual_seed(0))
    assert set(r) == {"diff", "lo", "hi"} and all(isinstance(v, float) for v in r.values())
    assert r["diff"] == pytest.approx(24 / a.numel(), abs=1e-12)
    assert 0 < r["lo"] <= r["diff"] <= r["hi"]
    assert r == M.paired_bootstrap_diff(a, b, generator=torch.Generator().manual_seed(0))
    assert M.paired_bootstrap_diff(a, a) == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    with pytest.raises(ValueError):
        M.paired_bootstrap_diff(a, a[:-1])


# ------------------------------------------------------------------------------------------------ cost
class TinyNet(SpikingNet):
    """analog image -> 1x1 conv (weights 1, 1/2) -> IF -> 3x3 conv stride 2 pad 1 (weights 1/4) -> IF -> linear
    (weights 1/10) -> IF -> linear. All currents are exact binary fractions, so spikes can be simulated by hand."""
    arch = "tiny"

    def __init__(self, size=7):
        super().__init__(2, (0.0,), (1.0,))
        self.conv1, self.act1 = nn.Conv2d(1, 2, 1, bias=False), IFNeuron(1.0)
        self.conv2, self.act2 = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False), IFNeuron(1.0)
        o = (size + 2 - 3) // 2 + 1
        self.fc1, self.act3 = nn.Linear(3 * o * o, 4, bias=False), IFNeuron(1.0)
        self.fc2 = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([1.0, 0.5]).view(2, 1, 1, 1))
            self.conv2.weight.fill_(0.25)
            self.fc1.weight.fill_(0.125)
            self.fc2.weight.fill_(1.0)

    def body(self, x, T):
        x = self.act2(self.conv2(self.act1(self.conv1(x), T)), T)
        return self.fc2(self.act3(self.fc1(x.flatten(1)), T))


def _tiny_input(B=2, size=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 0.25, 0.5, 1.0])
    return levels[torch.randint(0, 4, (B, 1, size, size), generator=g)]


def _if_loop(currents, theta=1.0):
    "Hard-reset IF over a list (time) of flat lists of currents: list of 0/1 lists."
    u = [0.0] * len(currents[0])
    out = []
    for c in currents:
        s = []
        for i, ci in enumerate(c):
            u[i] += ci
            fire = u[i] >= theta
            s.append(1 if fire else 0)
            if fire:
                u[i] = 0.0
        out.append(s)
    return out


def _brute_force(x, T):
    """Per image-batch spike counts and AC counts of TinyNet by plain Python loops (no torch ops on tensors)."""
    B, _, H, W = x.shape
    img = x.tolist()
    S, P, K, CO = 2, 1, 3, 3
    Ho = (H + 2 * P - K) // S + 1
    # layer 1: 1x1 conv, weights (1, 0.5), same current at every step (direct coding)
    res = {"spikes": {}, "neurons": {}}
    ac_conv2 = ac_fc1 = ac_fc2 = 0
    for b in range(B):
        cur1 = [img[b][0][y][xx] * w for w in (1.0, 0.5) for y in range(H) for xx in range(W)]
        s1 = _if_loop([cur1] * T)  # [T][2*H*W], index c*H*W + y*W + x
        cur2_t = []
        for t in range(T):
            cur2 = []
            for o in range(CO):
                for oy in range(Ho):
                    for ox in range(Ho):
                        acc = 0.0
                        for c in range(2):
                            for ky in range(K):
                                for kx in range(K):
                                    iy, ix = oy * S - P + ky, ox * S - P + kx
                                    if 0 <= iy < H and 0 <= ix < W and s1[t][c * H * W + iy * W + ix]:
                                        ac_conv2 += 1  # one (active input, connection) pair
                                        acc += 0.25
                        cur2.append(acc)
            cur2_t.append(cur2)
        s2 = _if_loop(cur2_t)
        cur3 = [[0.125 * sum(s2[t])] * 4 for t in range(T)]
        ac_fc1 += sum(sum(s) for s in s2) * 4
        s3 = _if_loop(cur3)
        ac_fc2 += sum(sum(s) for s in s3) * 2
        for name, s in (("act1", s1), ("act2", s2), ("act3", s3)):
            res["spikes"][name] = res["spikes"].get(name, 0) + sum(sum(v) for v in s)
            res["neurons"][name] = len(s[0])
    res["rates"] = {n: res["spikes"][n] / (B * T * res["neurons"][n]) for n in res["spikes"]}
    res["ac"] = {"conv2": ac_conv2 / B, "fc1": ac_fc1 / B, "fc2": ac_fc2 / B}
    return res


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("T", [4, 5])
def test_tiny_exact_rates_and_accumulates(T):
    net, x = TinyNet(), _tiny_input()
    bf = _brute_force(x, T)
    rates = M.spike_rates(net, x, T=T)
    assert list(rates) == ["act1", "act2", "act3"]
    for n in rates:
        assert rates[n] == pytest.approx(bf["rates"][n], abs=1e-12)
    assert 0 < rates["act1"] < 1 and 0 < rates["act2"]  # not a trivial all-or-nothing network
    ops = M.synaptic_operations(net, x, T=T)
    L = ops["layers"]
    assert L["conv1"] == {"kind": "mac", "ops": 2 * 7 * 7 * (1 * 1 * 1) * T}  # dense MACs, at each of the T steps
    for n in ("conv2", "fc1", "fc2"):
        assert L[n]["kind"] == "ac" and L[n]["ops"] == bf["ac"][n]
    assert bf["ac"]["conv2"] > 0
    assert ops["ac"] == sum(bf["ac"].values()) and ops["mac"] == 2 * 49 * T and ops["T"] == T
    assert ops["energy_pj"] == pytest.approx(0.9 * ops["ac"] + 4.6 * ops["mac"])
    assert M.ENERGY_PJ == {"ac": 0.9, "mac": 4.6}


def test_tiny_known_firing_pattern():
    "A pixel of 0.5 fires every other step in channel 0 and every fourth step in channel 1 (threshold 1)."
    net = TinyNet(size=1)
    x = torch.full((1, 1, 1, 1), 0.5)
    assert M.spike_rates(net, x, T=4)["act1"] == (2 + 1) / (2 * 4)
    assert M.spike_rates(net, x, T=8)["act1"] == (4 + 2) / (2 * 8)
    assert M.spike_rates(net, torch.ones(3, 1, 1, 1), T=6)["act1"] == (6 + 3) / (2 * 6)


def test_ann_operations_dense():
    net, x = TinyNet(), _tiny_input(B=3)
    ann = M.ann_operations(net, x)
    L = ann["layers"]
    assert all(v["kind"] == "mac" for v in L.values()) and ann["ac"] == 0 and ann["T"] == 0
    assert L["conv1"]["ops"] == 2 * 7 * 7 * 1
    assert L["conv2"]["ops"] == 3 * 4 * 4 * 2 * 3 * 3
    assert L["fc1"]["ops"] == 48 * 4 and L["fc2"]["ops"] == 4 * 2
    assert ann["energy_pj"] == pytest.approx(4.6 * ann["mac"])
    assert M.synaptic_operations(net, x, T=0) == ann


def test_grouped_dilated_conv_accumulates():
    "A grouped, dilated, strided, padded convolution fed with binary images: exact pairs by brute force."
    class Grouped(SpikingNet):
        arch = "grouped"
        def __init__(self):
            super().__init__(2, (0.0,) * 4, (1.0,) * 4)
            self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)
            self.act = IFNeuron()
        def body(self, x, T):
            return self.act(self.conv(x), T).flatten(1)

    net = Grouped()
    x = (torch.rand(2, 4, 6, 5, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    T = 3
    s, pairs = x.tolist(), 0
    Ho, Wo = (6 + 4 - 4 - 1) // 2 + 1, (5 + 4 - 4 - 1) // 2 + 1
    for b in range(2):
        for o in range(6):
            g = o // 3
            for c in range(2 * g, 2 * g + 2):
                for oy in range(Ho):
                    for ox in range(Wo):
                        for ky in range(3):
                            for kx in range(3):
                                iy, ix = oy * 2 - 2 + 2 * ky, ox * 2 - 2 + 2 * kx
                                if 0 <= iy < 6 and 0 <= ix < 5 and s[b][c][iy][ix]:
                                    pairs += 1
    assert M._active_pairs(net.conv, x) == pairs  # the exact accumulate count of a spike-fed layer
    ops = M.synaptic_operations(net, x, T=T)  # as the network's first layer it reads the "image": dense MACs
    assert ops["layers"]["conv"] == {"kind": "mac", "ops": 6 * Ho * Wo * 2 * 3 * 3 * T}


def test_ann_mode_raises_and_state_restored():
    net, x = TinyNet(), _tiny_input()
    with pytest.raises(ValueError, match="ANN"):
        M.spike_rates(net, x)  # net.T == 0
    with pytest.raises(ValueError, match="ANN"):
        M.cost_report(net, x, T=0)
    net.T = 3
    with gradient_source("ann"), pytest.raises(ValueError, match="ANN"):
        M.spike_rates(net, x)
    assert net.T == 3 and _no_hooks(net)
    # mixed train/eval flags survive; T survives; hooks gone
    net.train()
    net.act2.eval()
    before = {n: m.training for n, m in net.named_modules()}
    M.spike_rates(net, x, T=5)
    M.synaptic_operations(net, x)
    M.cost_report(net, x)
    assert {n: m.training for n, m in net.named_modules()} == before and net.T == 3 and _no_hooks(net)
    # also after an exception inside the forward
    with pytest.raises(RuntimeError):
        M.cost_report(net, torch.zeros(2, 1, 5, 5))  # wrong size for fc1
    assert {n: m.training for n, m in net.named_modules()} == before and net.T == 3 and _no_hooks(net)


def test_no_grad_inside():
    net, x = TinyNet(), _tiny_input()
    M.cost_report(net, x, T=2)
    assert all(p.grad is None for p in net.parameters())


def _calibrated(model, x, T):
    "BN running statistics of `x` at latency `T` (an untrained net's activity dies out in eval mode otherwise)."
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.T = T
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def _model(name, width, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return create_model(name, width=width)


def test_vgg11_cost_report():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    vgg = _model("vgg11", 0.125)
    vgg.T = 4
    rates = M.spike_rates(vgg, x)
    assert len(rates) == 10 and all(0.0 <= r <= 1.0 for r in rates.values())
    vgg = _calibrated(vgg, x, 4)
    rep = M.cost_report(vgg, x)
    assert json.loads(json.dumps(rep)) == rep and rep["T"] == 4 and rep["n_images"] == 4
    assert all(0.0 <= r <= 1.0 for r in rep["spike_rates"].values()) and rep["spike_rates"]["features.2"] > 0.05
    assert 0 < rep["mean_spike_rate"] < 1
    L = rep["snn"]["layers"]
    assert len(L) == 11 and L["features.0"] == {"kind": "mac", "ops": 8 * 32 * 32 * 3 * 9 * 4}  # 64 x 1/8 channels
    assert L["features.7"]["kind"] == "ac" and L["classifier.0"]["kind"] == "ac"
    ann = rep["ann"]
    assert ann["mac"] == sum(v["ops"] for v in ann["layers"].values()) and ann["ac"] == 0
    assert ann["layers"]["classifier.0"]["ops"] == 64 * 4 * 4 * 512
    assert rep["energy_ratio"] == pytest.approx(rep["snn"]["energy_pj"] / ann["energy_pj"])
    assert vgg.T == 4 and not vgg.training and _no_hooks(vgg)


@pytest.mark.parametrize("name,width", [("resnet20", 0.25), ("wrn16_4", 0.125)])
def test_resnets_shortcuts_counted(name, width):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = _calibrated(_model(name, width), x, 3)
    rep = M.cost_report(model, x)
    assert list(rep["spike_rates"]) == [n for n, m in model.named_modules() if isinstance(m, IFNeuron)]
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    L = rep["snn"]["layers"]
    assert list(L) == convs and any("shortcut" in n for n in L)
    assert L["conv1"]["kind"] == "mac" and L["fc"]["kind"] == "ac"  # analog image; pooled spikes are events
    assert all(L[n]["kind"] == "ac" for n in convs if n != "conv1")  # every other layer reads spikes
    assert all(v["kind"] == "mac" for v in rep["ann"]["layers"].values())
    assert json.loads(json.dumps(rep)) == rep and _no_hooks(model) and model.T == 3
