"""The training objectives taught by the section notebooks live in the section modules (PGD-AT/TRADES/MART in
`rsnn_paper.ann`, KL+CE and RFGSM-KL in `rsnn_paper.finetune`); the training engine finds them at call time, and the
names that moved stay importable from `rsnn_paper.training`."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rsnn_paper import ann, finetune
from rsnn_paper.models import create_model
from rsnn_paper.training import TrainStep, kl_div


def test_moved_names_stay_importable():
    from rsnn_paper.training import rfgsm_kl_adversary
    assert rfgsm_kl_adversary is finetune.rfgsm_kl_adversary
    import rsnn_paper.training as training
    with pytest.raises(AttributeError):
        training.no_such_name  # noqa: B018


def test_training_imports_no_section_module():
    code = ("import sys, rsnn_paper.training; "
            "print(sorted(m for m in ('rsnn_paper.ann', 'rsnn_paper.finetune') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for first in ("rsnn_paper.finetune", "rsnn_paper.ann"):  # either import order works
        subprocess.run([sys.executable, "-c", f"import {first}, rsnn_paper.training"], check=True)


@pytest.mark.parametrize("objective", ["pgd_at", "trades", "mart", "kl_ce", "at"])
def test_trainstep_runs_the_section_functions(objective):
    torch.manual_seed(0)
    net = create_model("vgg11", width=1 / 16, bias=objective in ("kl_ce", "at"))
    net.T = 2 if objective in ("kl_ce", "at") else 0
    net.train()
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    kw = dict(eps=2 / 255, steps=2, alpha=1 / 255)
    torch.manual_seed(1)
    engine = TrainStep(net, objective, beta=2.0, adversary="rfgsm", **kw)(x, y, torch.Generator().manual_seed(2))
    net.load_state_dict(state)
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(2)
    if objective == "pgd_at":
        mine = ann.pgd_at_objective(net, x, y, generator=g, **kw)
    elif objective in ("trades", "mart"):
        mine = getattr(ann, f"{objective}_objective")(net, x, y, beta=2.0, generator=g, **kw)
    else:
        mine = finetune.finetune_objective(net, x, y, objective, eps=kw["eps"], alpha=kw["alpha"], beta=2.0,
                                           adversary="rfgsm", generator=g)
    assert torch.equal(engine[0], mine[0]) and torch.equal(engine[1], mine[1])


def test_losses():
    torch.manual_seed(0)
    logits, other, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    ce = F.cross_entropy(logits, y)
    assert torch.equal(finetune.kl_ce_loss(logits, logits, y, 2.0), ce)
    assert finetune.kl_ce_loss(logits, other, y, 2.0) > ce
    assert torch.equal(finetune.kl_ce_loss(logits, other, y, 2.0), ann.trades_loss(logits, other, y, 2.0))
    expected = (kl_div(F.log_softmax(logits, 1), other) * (1 - F.softmax(logits, 1)[range(6), y])).mean()
    base = ann.mart_loss(logits, other, y, 0.0)
    assert torch.allclose(ann.mart_loss(logits, other, y, 3.0) - base, 3.0 * expected, atol=1e-6)


def test_rfgsm_stays_in_the_ball():
    torch.manual_seed(0)
    net = create_model("vgg11", width=1 / 16).eval()
    x = torch.rand(4, 3, 32, 32)
    p = F.log_softmax(net(x), 1).detach()
    eps = 8 / 255
    x_adv = finetune.rfgsm_kl_adversary(net, x, eps, eps / 2, p, torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with pytest.raises(ValueError, match="finetuning objective"):
        finetune.finetune_objective(net, x, torch.zeros(4, dtype=torch.long), "trades", eps=eps, alpha=0.0, beta=1.0)
