"""The fused integrate-and-fire node equals the reference loop: spikes bitwise, gradients to float rounding.

Every gradient source of kind bptt/bptr, both resets, T in {1, 4, 8}, a learned threshold, currents crowded around
the threshold, a channels-last conv-shaped input, float64, the no-grad path, the compiled step kernels (and their
fallback), and a whole VGG-11 (width 1/8, T=4) with gradients w.r.t. the input and every parameter."""
import warnings

import pytest
import torch

import rsnn_paper.fused as fused
from rsnn_paper.fused import (IMPLEMENTATIONS, current_implementation, integrate_and_fire_fused, reset_implementation,
                              set_implementation, use_implementation)
from rsnn_paper.neurons import _BPTRFn, integrate_and_fire, integrate_and_fire_reference
from rsnn_paper.surrogates import GRADIENT_SOURCES, gradient_source

SOURCES = [s for s in GRADIENT_SOURCES if s.kind in ("bptt", "bptr")]
assert len(SOURCES) == 18


def reference(current, threshold, reset, src):
    if src.kind == "bptr":
        return _BPTRFn.apply(current, threshold.detach(), reset)
    return integrate_and_fire_reference(current, threshold, reset, src.surrogate)


def run(fn, cur, th, w, th_grad=True):
    "Spikes and the gradients of sum(w * spikes) w.r.t. the current and (when learned) the threshold."
    c = cur.detach().clone().requires_grad_()
    t = th.detach().clone().requires_grad_(th_grad)
    out = fn(c, t)
    grads = torch.autograd.grad((out * w).sum(), (c, t) if th_grad else (c,), allow_unused=True)
    return out.detach(), grads[0], (grads[1] if th_grad else None)


def currents(T, shape=(5, 4, 3), channels_last=False, dtype=torch.float32, seed=0):
    """Currents that put many potentials near the threshold 0.7: mostly in [0.1, 0.5] per step, plus a share
    placed so that the potential lands within ±0.05 of the threshold at the first step."""
    g = torch.Generator().manual_seed(seed)
    cur = 0.1 + 0.4 * torch.rand(T, *shape, generator=g, dtype=dtype)
    near = torch.rand(shape, generator=g) < 0.3
    cur[0][near] = (0.7 + 0.1 * (torch.rand(shape, generator=g, dtype=dtype) - 0.5))[near]
    if channels_last:  # [T, B, C, H, W] whose per-step slices are channels-last, as IFNeuron builds it
        cur = cur.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (T, shape[0]))
    return cur


def close(a, b, tol):
    "Equal up to `tol` relative to the scale of the reference (plus an absolute floor)."
    if a is None or b is None:
        return a is None and b is None
    return (a - b).abs().max().item() <= tol * max(1.0, a.abs().max().item())


@pytest.mark.parametrize("T", [1, 4, 8])
@pytest.mark.parametrize("reset", ["hard", "soft"])
@pytest.mark.parametrize("src", SOURCES, ids=lambda s: s.name)
def test_fused_equals_reference(src, reset, T):
    for cl, shape in ((False, (6, 5, 4)), (True, (2, 3, 4, 5))):
        cur = currents(T, shape, channels_last=cl, seed=T)
        w = torch.randn(cur.shape, generator=torch.Generator().manual_seed(1))
        th = torch.tensor(0.7)
        ref = run(lambda c, t: reference(c, t, reset, src), cur, th, w)
        fus = run(lambda c, t: integrate_and_fire_fused(c, t, reset, src), cur, th, w)
        assert torch.equal(ref[0], fus[0]), "spikes differ"
        assert ref[0].any() and not ref[0].all()
        assert close(ref[1], fus[1], 1e-5), f"input grad: {(ref[1] - fus[1]).abs().max()}"
        if src.kind == "bptr":
            assert ref[2] is None and fus[2] is None  # BPTR gives the threshold no gradient
        else:
            assert close(ref[2], fus[2], 1e-5), f"threshold grad: {ref[2]} vs {fus[2]}"
        if cl:  # the memory format is kept, for the spikes and for the input gradient
            for x in (fus[0], fus[1]):
                assert x.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("reset", ["hard", "soft"])
def test_float64_exact_math(reset):
    "In float64 the hand-written backward matches autograd of the reference loop to 1e-12: the algebra is right."
    cur = currents(8, (7, 9), dtype=torch.float64)
    w = torch.randn(cur.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    th = torch.tensor(0.7, dtype=torch.float64)
    for src in SOURCES:
        ref = run(lambda c, t: reference(c, t, reset, src), cur, th, w)
        fus = run(lambda c, t: integrate_and_fire_fused(c, t, reset, src), cur, th, w)
        assert torch.equal(ref[0], fus[0])
        assert close(ref[1], fus[1], 1e-12) and close(ref[2], fus[2], 1e-12), src.name


def test_threshold_without_grad_and_current_without_grad():
    cur, th = currents(4), torch.tensor(0.7)
    w = torch.randn(cur.shape)
    for reset in ("hard", "soft"):
        ref = run(lambda c, t: reference(c, t, reset, GRADIENT_SOURCES[0]), cur, th, w, th_grad=False)
        fus = run(lambda c, t: integrate_and_fire_fused(c, t, reset, "pcw_1"), cur, th, w, th_grad=False)
        assert torch.equal(ref[0], fus[0]) and close(ref[1], fus[1], 1e-5)
        # only the threshold learns (the current is a constant)
        t_ref = th.clone().requires_grad_(); t_fus = th.clone().requires_grad_()
        (g_ref,) = torch.autograd.grad((reference(cur, t_ref, reset, GRADIENT_SOURCES[0]) * w).sum(), t_ref)
        (g_fus,) = torch.autograd.grad((integrate_and_fire_fused(cur, t_fus, reset, "pcw_1") * w).sum(), t_fus)
        assert close(g_ref, g_fus, 1e-5)


def test_no_grad_path_and_odd_layouts():
    cur, th = currents(8, (4, 6)), torch.tensor(0.7)
    expected = integrate_and_fire_reference(cur, th, "hard", GRADIENT_SOURCES[0].surrogate)
    with torch.no_grad():
        assert torch.equal(integrate_and_fire_fused(cur, th, "hard"), expected)
    assert torch.equal(integrate_and_fire_fused(cur, 0.7, "hard"), expected)          # float threshold
    odd = cur.transpose(1, 2).contiguous().transpose(1, 2)                            # not time-major dense
    assert torch.equal(integrate_and_fire_fused(odd, th, "hard"), expected)
    assert torch.equal(integrate_and_fire_fused(cur[:, :, 0], th), expected[:, :, 0])  # a strided slice
    assert torch.equal(integrate_and_fire_fused(cur[:, 0, 0], th), expected[:, 0, 0])  # 1-D: [T]
    # an expanded upstream gradient (stride 0), as `out.sum().backward()` produces
    c = cur.clone().requires_grad_()
    integrate_and_fire_fused(c, th).sum().backward()
    c2 = cur.clone().requires_grad_()
    integrate_and_fire_reference(c2, th, "hard", GRADIENT_SOURCES[0].surrogate).sum().backward()
    assert close(c2.grad, c.grad, 1e-5)


def test_errors():
    cur = currents(2)
    with pytest.raises(ValueError, match="reset"):
        integrate_and_fire_fused(cur, 1.0, "leaky")
    with pytest.raises(ValueError, match="ANN proxy"):
        integrate_and_fire_fused(cur, 1.0, "hard", "ann")
    with pytest.raises(ValueError, match="scalar threshold"):
        integrate_and_fire_fused(cur, torch.ones(3), "hard")


def test_saves_one_tensor():
    "The fused node keeps the potentials [T, ...] (and the 0-dim threshold) for backward, nothing else."
    cur = currents(8, (16, 8)).requires_grad_()
    th = torch.tensor(0.7, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        integrate_and_fire_fused(cur, th)
    assert sorted(saved) == [1, cur.numel()]


def test_implementation_context():
    assert current_implementation() == "fused" and IMPLEMENTATIONS == ("fused", "reference")
    with use_implementation("reference"):
        assert current_implementation() == "reference"
        with pytest.raises(RuntimeError):
            with use_implementation("fused"):
                assert current_implementation() == "fused"
                raise RuntimeError
        assert current_implementation() == "reference"
    token = set_implementation("reference")
    assert current_implementation() == "reference"
    reset_implementation(token)
    assert current_implementation() == "fused"
    with pytest.raises(ValueError, match="unknown implementation"):
        set_implementation("cuda")


def test_integrate_and_fire_dispatch():
    "`integrate_and_fire` follows the implementation context; both give the same spikes and gradients."
    cur, th, w = currents(4), torch.tensor(0.7), torch.randn(4, 5, 4, 3)
    for name in ("pcw_1", "bptr"):
        with gradient_source(name):
            with use_implementation("reference"):
                ref = run(lambda c, t: integrate_and_fire(c, t), cur, th, w)
            fus = run(lambda c, t: integrate_and_fire(c, t), cur, th, w)
        assert torch.equal(ref[0], fus[0]) and close(ref[1], fus[1], 1e-5) and close(ref[2], fus[2], 1e-5)


def _compiler_works() -> bool:
    try:
        return torch.compile(lambda x: x + 1, dynamic=False)(torch.zeros(2)).sum().item() == 2
    except Exception:
        return False


@pytest.mark.slow
def test_compiled_kernels():
    "The torch.compile'd step kernels give the same results (a few sources; compiling every one takes minutes)."
    if not _compiler_works():
        pytest.skip("torch.compile does not work here")
    old = dict(fused._COMPILE)
    fused.set_compile(True)
    try:
        for reset in ("hard", "soft"):
            for name in ("pcw_1", "bptr"):
                src = next(s for s in SOURCES if s.name == name)
                cur = currents(4, (2, 3, 4, 5), channels_last=True)
                w = torch.randn(cur.shape)
                th = torch.tensor(0.7)
                ref = run(lambda c, t: reference(c, t, reset, src), cur, th, w)
                fus = run(lambda c, t: integrate_and_fire_fused(c, t, reset, src), cur, th, w)
                assert torch.equal(ref[0], fus[0])
                assert close(ref[1], fus[1], 1e-5) and close(ref[2], fus[2], 1e-5)
        assert fused._COMPILE["failed"] is None, fused._COMPILE["failed"]
    finally:
        fused._COMPILE.update(old)


def test_compile_failure_falls_back(monkeypatch):
    "A compiler that fails is caught once, warned about, remembered; the eager kernels give the result."
    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no compiler here")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(fused, "_COMPILE", {"enabled": True, "failed": None})
    cur, th, w = currents(4), torch.tensor(0.7), torch.randn(4, 5, 4, 3)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        fus = run(lambda c, t: integrate_and_fire_fused(c, t, "hard"), cur, th, w)
    assert fused._COMPILE["failed"] and not fused.compile_enabled()
    ref = run(lambda c, t: reference(c, t, "hard", GRADIENT_SOURCES[0]), cur, th, w)
    assert torch.equal(ref[0], fus[0]) and close(ref[1], fus[1], 1e-5) and close(ref[2], fus[2], 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        run(lambda c, t: integrate_and_fire_fused(c, t, "hard"), cur, th, w)


@pytest.mark.parametrize("channels_last", [False, True])
def test_whole_model_gradients(channels_last):
    "VGG-11 (width 1/8, T=4): gradients w.r.t. the input and every parameter agree, fused vs reference."
    from rsnn_paper.models import create_model
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # threshold 0.2: every layer spikes (with 1.0 the random classifier layers stay silent)
    model = create_model("vgg11", width=1 / 8, threshold=0.2).to(memory_format=fmt).train()
    model.T = 4
    x = torch.rand(3, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.tensor([1, 4, 7])
    names = [n for n, _ in model.named_parameters()]

    def grads(impl, source):
        torch.manual_seed(1)  # same dropout masks
        xa = x.clone().requires_grad_()
        with use_implementation(impl), gradient_source(source):
            logits = model(xa)
            loss = torch.nn.functional.cross_entropy(logits, y)
            g = torch.autograd.grad(loss, [xa] + list(model.parameters()), allow_unused=True)
        return logits.detach(), dict(zip(["input"] + names, g))

    for source in ("pcw_1", "rect_0.5", "bptr"):
        (l_ref, g_ref), (l_fus, g_fus) = grads("reference", source), grads("fused", source)
        assert torch.equal(l_ref, l_fus)
        assert g_ref["input"].abs().max() > 0
        for k in g_ref:
            assert close(g_ref[k], g_fus[k], 1e-4), f"{source} {k}: {(g_ref[k] - g_fus[k]).abs().max()}"


# ---------------------------------------------------------------- time-loop settings: chosen explicitly, not at import
def test_importing_reads_no_environment_variable():
    "RSNN_IF_IMPL / RSNN_COMPILE in the environment change nothing in the library; only the command line reads them."
    import os
    import subprocess
    import sys
    code = ("import rsnn_paper.fused as f, rsnn_paper.neurons, rsnn_paper.training; "
            "print(f.current_implementation(), f.compile_enabled())")
    env = {**os.environ, "RSNN_IF_IMPL": "reference", "RSNN_COMPILE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["fused", "False"]


def test_runtime_context_sets_and_restores():
    before = fused.runtime_settings()
    assert before == {"implementation": "fused", "compile": False}
    with fused.runtime(implementation="reference", compile=True) as s:
        assert s == {"implementation": "reference", "compile": True} == fused.runtime_settings()
        assert current_implementation() == "reference"
        with fused.runtime(compile=False):  # None keeps the other setting
            assert fused.runtime_settings() == {"implementation": "reference", "compile": False}
    assert fused.runtime_settings() == before
    with pytest.raises(ValueError, match="unknown implementation"), fused.runtime(implementation="cuda"):
        pass


def test_cli_reads_the_environment_once_and_sets_the_context(monkeypatch):
    from rsnn_paper import cli
    from rsnn_paper.store import UserError
    assert cli.runtime_from_env({}) == {}
    assert cli.runtime_from_env({"RSNN_IF_IMPL": "reference", "RSNN_COMPILE": "0"}) == \
        {"implementation": "reference", "compile": False}
    assert cli.runtime_from_env({"RSNN_COMPILE": "yes"}) == {"compile": True}
    with pytest.raises(UserError, match="RSNN_IF_IMPL='loop'"):
        cli.runtime_from_env({"RSNN_IF_IMPL": "loop"})
    import argparse
    seen = []
    parser = argparse.ArgumentParser()  # a command that records the settings it runs under
    parser.add_argument("command")
    parser.set_defaults(func=lambda args: seen.append(fused.runtime_settings()) or 0)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setenv("RSNN_IF_IMPL", "reference")
    monkeypatch.setenv("RSNN_COMPILE", "1")
    assert cli.main(["record"]) == 0
    assert seen == [{"implementation": "reference", "compile": True}]
    assert fused.runtime_settings() == {"implementation": "fused", "compile": False}  # restored after the command
    monkeypatch.setenv("RSNN_IF_IMPL", "loop")
    assert cli.main(["record"]) == 2  # a bad value is a one-line user error


def test_parallel_workers_run_with_the_parents_settings():
    from rsnn_paper.training import run_parallel
    with fused.runtime(implementation="reference"):
        got = run_parallel([(fused.runtime_settings, ()), (fused.runtime_settings, ())], workers=2)
    assert got == [{"implementation": "reference", "compile": False}] * 2
