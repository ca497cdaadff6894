"""Mechanism tests for the spiking core: surrogates, gradient sources, neurons, models."""
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from rsnn_paper import surrogates as S
from rsnn_paper.models import MODELS, create_model
from rsnn_paper.neurons import THRESHOLD_FLOOR, IFNeuron, integrate_and_fire, integrate_and_fire_reference

FORMULAS = {
    "pcw": lambda z, g: torch.clamp(g - z.abs(), min=0) / g**2,
    "expd": lambda z, g: 0.3 * torch.exp(-g * z.abs()),
    "exp": lambda z, g: torch.exp(-g * z.abs()),
    "rect": lambda z, g: (z.abs() < g / 2).to(z.dtype) / g,
    "ste": lambda z, g: torch.ones_like(z),
}
BPTT = [s for s in S.GRADIENT_SOURCES if s.kind == "bptt"]


# ---------------------------------------------------------------- surrogates / sources
def test_grid_is_the_papers():
    names = [s.name for s in S.GRADIENT_SOURCES]
    assert len(names) == 19 == len(set(names))
    assert names[:5] == ["pcw_1", "pcw_2", "pcw_3", "pcw_0.5", "pcw_0.25"]
    assert names[-2:] == ["bptr", "ann"] and names[-3] == "ste"
    assert sum(s.kind == "bptt" for s in S.GRADIENT_SOURCES) == 17


@pytest.mark.parametrize("src", BPTT, ids=lambda s: s.name)
def test_surrogate_backward_equals_formula(src):
    z = torch.linspace(-5, 5, 2001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(S.spike(z, src.surrogate).sum(), z)
    expected = FORMULAS[src.surrogate.family](z.detach(), src.surrogate.gamma)
    torch.testing.assert_close(g, expected)
    zero = expected == 0
    assert torch.all(g[zero] == 0)  # exactly zero where the formula is zero
    assert torch.equal(S.spike(z, src.surrogate), (z >= 0).to(z.dtype))


def test_unknown_source_lists_known():
    with pytest.raises(ValueError, match=r"unknown gradient source 'pcw_7'.*pcw_1.*bptr.*ann"):
        S.get_gradient_source("pcw_7")
    with pytest.raises(ValueError, match="known sources"):
        with S.gradient_source("nope"):
            pass


def test_context_restores_after_exception_and_nests():
    assert S.current_gradient_source() is S.DEFAULT_SOURCE
    with S.gradient_source("exp_2"):
        with pytest.raises(KeyError):
            with S.gradient_source("bptr"):
                assert S.current_gradient_source().name == "bptr"
                raise KeyError("inside")
        assert S.current_gradient_source().name == "exp_2"
    assert S.current_gradient_source() is S.DEFAULT_SOURCE


def test_custom_surrogate_source():
    with S.gradient_source(S.PCW(1.5)) as src:
        assert src.kind == "bptt" and src.surrogate.gamma == 1.5 and src.name == "pcw_1.5"


# ---------------------------------------------------------------- neurons
@pytest.mark.parametrize("reset,steps", [("hard", [4, 8]), ("soft", [4, 7])])
def test_constant_current_spike_times(reset, steps):
    s = integrate_and_fire(torch.full((8, 1), 0.3), torch.tensor(1.0), reset=reset)
    assert s.shape == (8, 1) and set(s.unique().tolist()) <= {0.0, 1.0}
    assert (s.flatten().nonzero().flatten() + 1).tolist() == steps


def test_reset_is_not_detached():
    # With a hard reset the surrogate gradient also flows through u*(1-s): d s[2]/d I[0] is non-zero only then.
    I = torch.tensor([[0.9], [0.2], [0.9]], requires_grad=True)
    s = integrate_and_fire_reference(I, torch.tensor(1.0), "hard", S.PCW(1.0))
    (g,) = torch.autograd.grad(s[2].sum(), I)
    # u1=0.9 (no spike), u2=1.1 (spike, reset), u3=0.9: s3 depends on I through the reset of step 2
    assert g[0].item() != 0 and g[1].item() != 0
    # by hand: u_post[t] = (1-s[t])*u[t] and d u_post/d u = (1-s) - u*sg(z) at every step, so
    # ds3/dI1 = sg(z3) * [(1-s2) - u2*sg(z2)] * [(1-s1) - u1*sg(z1)]
    sg = lambda z: max(0.0, 1 - abs(z))
    expected = sg(-0.1) * ((1 - 1) - 1.1 * sg(0.1)) * ((1 - 0) - 0.9 * sg(-0.1))
    assert g[0].item() == pytest.approx(expected, abs=1e-6)


def test_bptr_backward_is_grad_times_fired():
    torch.manual_seed(0)
    I = (torch.rand(6, 50) * 0.6 - 0.1).requires_grad_()
    th = torch.tensor(1.0, requires_grad=True)
    s = integrate_and_fire(I, th, source="bptr")
    ref = integrate_and_fire(I.detach(), th.detach(), source="pcw_1")
    assert torch.equal(s, ref)  # the forward is the exact spiking run
    w = torch.randn_like(s)
    (s * w).sum().backward()
    fired = (s.sum(0) > 0).float()
    assert 0 < fired.mean() < 1  # the test data exercises both cases
    torch.testing.assert_close(I.grad, w * fired)
    assert th.grad is None or torch.all(th.grad == 0)


def test_threshold_gets_gradient_only_when_learned():
    x = torch.randn(4 * 8, 20) * 0.5 + 0.4
    learned, fixed = IFNeuron(1.0, learn_threshold=True), IFNeuron(1.0, learn_threshold=False)
    learned(x, 4).sum().backward()
    assert learned.threshold.grad is not None and learned.threshold.grad.abs() > 0
    assert [n for n, _ in fixed.named_parameters()] == [] and [n for n, _ in fixed.named_buffers()] == ["threshold"]
    # switching keeps the value and the state_dict key
    learned.set_learn_threshold(False)
    assert "threshold" in learned.state_dict() and not learned.learn_threshold


def test_threshold_floor_is_functional():
    unit = IFNeuron(0.001, learn_threshold=True)
    assert unit.effective_threshold().item() == pytest.approx(THRESHOLD_FLOOR)
    assert unit.threshold.item() == pytest.approx(0.001)  # never edited in place
    x = torch.full((2 * 3, 4), 0.02)
    unit(x, 2).sum().backward()
    assert unit.threshold.grad is not None  # straight-through: the parameter keeps learning


def test_unknown_reset():
    with pytest.raises(ValueError, match="hard"):
        integrate_and_fire(torch.zeros(2, 1), 1.0, reset="leaky")


def test_ann_source_is_model_level():
    with pytest.raises(ValueError, match="T=0"):
        integrate_and_fire(torch.zeros(2, 1), 1.0, source="ann")


# ---------------------------------------------------------------- models
def test_vgg11_parameter_count():
    m = create_model("vgg11", num_classes=10, width=1.0)
    n = sum(p.numel() for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))
            for p in mod.parameters(recurse=False))
    assert n == 61_365_824


def test_unknown_model_lists_known():
    with pytest.raises(ValueError, match=r"unknown model 'nosuch'.*vgg11.*resnet20.*wrn16_4"):
        create_model("nosuch")


def _plain_vgg(m):
    "An independent plain ReLU network that reuses the model's weights."
    layers = []
    for mod in m.features:
        layers.append(nn.ReLU() if mod.__class__.__name__ == "IFNeuron" else mod)
    cls = [nn.ReLU() if mod.__class__.__name__ == "IFNeuron" else mod for mod in m.classifier]
    return nn.Sequential(*layers, nn.Flatten(), *cls)


def test_T0_equals_plain_relu_network():
    torch.manual_seed(0)
    m = create_model("vgg11", width=0.125).eval()
    for mod in m.modules():  # non-trivial BN statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2); mod.running_var.uniform_(0.5, 1.5)
    x = torch.rand(5, 3, 32, 32)
    plain = _plain_vgg(m)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    m.T = 0
    torch.testing.assert_close(m(x), plain((x - mean) / std), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_modes_share_parameters_and_are_deterministic(name):
    torch.manual_seed(0)
    m = create_model(name, width=0.25).eval()
    keys0 = list(m.state_dict())
    x = torch.rand(3, 3, 32, 32)
    a = m(x)
    m.T = 4
    s1, s2 = m(x), m(x)
    assert list(m.state_dict()) == keys0
    assert a.shape == s1.shape == (3, 10)
    assert torch.equal(s1, s2)  # no state leaks between calls
    with S.gradient_source("ann"):
        torch.testing.assert_close(m(x), a, rtol=0, atol=0)  # the ANN proxy = the same weights with T=0
    assert m.mean.shape == (1, 3, 1, 1) and "mean" in m.state_dict() and "std" in m.state_dict()


def test_ann_proxy_gradient_equals_T0_gradient():
    torch.manual_seed(1)
    m = create_model("resnet20", width=0.25).eval()
    x = torch.rand(2, 3, 32, 32)
    y = torch.tensor([1, 2])

    def input_grad():
        xx = x.clone().requires_grad_()
        nn.functional.cross_entropy(m(xx), y).backward()
        return xx.grad
    m.T = 0
    g_ann = input_grad()
    m.T = 8
    with S.gradient_source("ann"):
        g_proxy = input_grad()
    g_snn = input_grad()
    torch.testing.assert_close(g_proxy, g_ann)
    assert not torch.allclose(g_snn, g_ann)


def test_time_merged_into_batch_bn_over_T_times_B():
    # In train mode BN normalises the merged [T*B] tensor: its batch statistics span time and batch.
    m = create_model("vgg11", width=0.125).train()
    m.T = 4
    seen = {}
    bn = m.features[1]
    h = bn.register_forward_hook(lambda mod, i, o: seen.update(shape=i[0].shape))
    m(torch.rand(3, 3, 32, 32))
    h.remove()
    assert seen["shape"][0] == 12


def test_dropout_mask_differs_per_timestep():
    m = create_model("vgg11", width=0.125).train()
    m.T = 2
    seen = {}
    drop = m.classifier[2]
    h = drop.register_forward_hook(lambda mod, i, o: seen.update(i=i[0], o=o))
    torch.manual_seed(0)
    m(torch.rand(2, 3, 32, 32))
    h.remove()
    mask = (seen["o"] != 0).float().unflatten(0, (2, 2))
    assert not torch.equal(mask[0], mask[1])


def test_bias_option_and_spiking_units():
    m = create_model("vgg11", width=0.125, bias=True)
    assert all(l.bias is not None and torch.all(l.bias == 0) for l in m.classifier if isinstance(l, nn.Linear))
    r = create_model("resnet20", width=0.25, bias=True)
    assert r.fc.bias is not None and all(c.bias is None for c in r.modules() if isinstance(c, nn.Conv2d))
    assert len(create_model("vgg11", width=0.125).spiking_units()) == 10
    assert len(r.spiking_units()) == 1 + 9 * 2
    assert len(create_model("wrn16_4", width=0.25).spiking_units()) == 6 * 2 + 1


def test_snn_input_gradient_flows_for_every_bptt_source():
    torch.manual_seed(0)
    m = create_model("vgg11", width=0.125).eval()
    m.T = 4
    with torch.no_grad():  # thresholds at a converted network's scale: at θ = 1 an untrained network's potentials stay
        for u in m.spiking_units():  # outside most surrogates' support and the input gradient is exactly zero
            u.threshold.fill_(0.3)
    x = torch.rand(2, 3, 32, 32)
    for src in S.GRADIENT_SOURCES:
        xx = x.clone().requires_grad_()
        with S.gradient_source(src):
            m(xx).sum().backward()
        assert xx.grad is not None and torch.isfinite(xx.grad).all(), src.name
        assert xx.grad.abs().sum() > 0, f"{src.name}: the input gradient is zero"


def test_no_cuda_calls_in_package():
    root = Path(__file__).resolve().parents[1]
    hits = [str(p) for d in ("rsnn_paper", "nbs") for p in (root / d).rglob("*")
            if p.suffix in (".py", ".ipynb") and re.search(r"\.cuda\(\)", p.read_text(encoding="utf-8"))]
    assert hits == []
