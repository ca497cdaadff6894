"""The `paper` preset is the paper's procedure: every value pinned, the authors' nearest-rank percentile and fresh
search batches per layer, the BN reset the authors start finetuning from; and `ci`/`cpu` keep their artifacts."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from rsnn_paper import config as C
from rsnn_paper import conversion
from rsnn_paper.config import get_config, stage_key
from rsnn_paper.conversion import percentile, reset_bn_stats, search_batches, search_thresholds, transfer_parameters
from rsnn_paper.data import ImageDataset
from rsnn_paper.models import SpikingNet, create_model
from rsnn_paper.neurons import IFNeuron
from rsnn_paper.training import pgd_train_adversary


# ---------------------------------------------------------------- the percentile
def nearest_rank_by_hand(values, q):
    "The authors' definition on a plain sorted list: the k-th smallest value, k = 1 + round(0.01·q·(n−1)), 1-based."
    s = sorted(values)
    k = 1 + round(0.01 * q * (len(s) - 1))
    return s[k - 1]


def test_nearest_rank_small_cases_worked_by_hand():
    x = torch.tensor([5.0, 1.0, 3.0, 3.0, 9.0])  # sorted: 1, 3, 3, 5, 9 (n = 5, n − 1 = 4)
    cases = {0: 1.0,      # k = 1 + round(0)     = 1
             30: 3.0,     # k = 1 + round(1.2)   = 2 (a tie: either 3)
             50: 3.0,     # k = 1 + round(2.0)   = 3
             70: 5.0,     # k = 1 + round(2.8)   = 4
             99.7: 9.0,   # k = 1 + round(3.988) = 5
             100: 9.0}
    for q, expected in cases.items():
        assert percentile(x, q, "nearest_rank").item() == expected, q
    two = torch.tensor([10.0, 0.0])
    assert percentile(two, 50, "nearest_rank").item() == 0.0  # k = 1 + round(0.5) = 1 (half to even), no interpolation
    assert percentile(two, 50, "linear").item() == 5.0         # numpy's interpolation


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 1001, 4097])
def test_nearest_rank_matches_the_sorted_list(n):
    g = torch.Generator().manual_seed(n)
    for x in (torch.randn(n, generator=g) ** 3,                          # distinct values
              torch.randint(0, 7, (n,), generator=g).float()):           # many ties
        values = x.tolist()
        for q in (0, 1, 25, 50, 90, 99, 99.7, 99.9, 100):
            assert percentile(x.view(-1, 1) if n % 2 else x, q, "nearest_rank").item() == nearest_rank_by_hand(values, q)
            assert percentile(x, q, "linear").item() == pytest.approx(np.percentile(np.array(values), q), abs=1e-5)


def test_unknown_percentile_method():
    with pytest.raises(ValueError, match="nearest_rank"):
        percentile(torch.ones(3), 50, "midpoint")


# ---------------------------------------------------------------- the search: fresh batches per layer
class TwoLayer(SpikingNet):
    arch = "two_layer"

    def __init__(self):
        super().__init__(2, (0.0,), (1.0,))
        self.fc1, self.act1 = nn.Linear(4, 6, bias=False), IFNeuron()
        self.fc2, self.act2 = nn.Linear(6, 2, bias=False), IFNeuron()

    def forward(self, x):  # x is already [T*B, 4]
        T = max(self.T, 1)
        return self.act2(self.fc2(self.act1(self.fc1(x), T)), T)


def test_search_with_fresh_batches_per_layer_and_nearest_rank():
    torch.manual_seed(0)
    net = TwoLayer()
    sets = {0: [torch.randn(30, 4), torch.randn(30, 4)], 1: [torch.randn(30, 4) * 2]}
    asked = []

    def batches(layer):
        asked.append(layer)
        return sets[layer]
    th = search_thresholds(net, batches, T=1, q=99.7, method="nearest_rank")
    assert asked == [0, 1]
    w1, w2 = net.fc1.weight.detach(), net.fc2.weight.detach()
    th1 = max(nearest_rank_by_hand((d @ w1.T).flatten().tolist(), 99.7) for d in sets[0])
    th2 = max(nearest_rank_by_hand(((d @ w1.T >= th1).float() @ w2.T).flatten().tolist(), 99.7) for d in sets[1])
    assert th == pytest.approx([th1, th2], abs=1e-6)


def _toy_train(n=24):
    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                        torch.arange(n) % 10, name="cifar10-exact", split="train", classes=[str(i) for i in range(10)])


def test_search_batches_reused_set_is_unchanged_and_fresh_sets_differ():
    cfg = get_config("ci", search_batches=2, search_batch_size=4)
    train = _toy_train()
    reused = search_batches(cfg, train, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(reused, search_batches(cfg, train, "cpu")))
    # the reused set is the one drawn before the knob existed: generator seeded with derive_seed(seed, 11)
    from rsnn_paper.data import augment, iterate_batches
    from rsnn_paper.training import derive_seed
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, 11))
    old = [augment(x, g, crop_padding=4, flip=True) for (x, _), _ in
           zip(iterate_batches(train, 4, shuffle=True, generator=g, drop_last=True), range(2))]
    assert all(torch.equal(a, b) for a, b in zip(reused, old))
    fresh = [search_batches(cfg, train, "cpu", layer) for layer in range(3)]
    assert all(len(f) == 2 for f in fresh)
    assert not torch.equal(fresh[0][0], fresh[1][0]) and not torch.equal(fresh[1][0], fresh[2][0])
    assert all(torch.equal(a, b) for a, b in zip(fresh[1], search_batches(cfg, train, "cpu", 1)))  # deterministic


@pytest.mark.parametrize("fresh,method", [(True, "nearest_rank"), (False, "linear")])
def test_convert_follows_the_knobs(monkeypatch, fresh, method):
    cfg = get_config("ci", T_search=2, T=2, search_batches=1, search_batch_size=4, bn_calib_batches=1, device="cpu",
                     search_fresh_batches=fresh, percentile_method=method)
    calls, methods = [], set()
    real_batches, real_percentile = conversion.search_batches, conversion.percentile
    monkeypatch.setattr(conversion, "search_batches",
                        lambda c, t, d, layer=None: calls.append(layer) or real_batches(c, t, d, layer))
    monkeypatch.setattr(conversion, "percentile", lambda x, q, m="linear": methods.add(m) or real_percentile(x, q, m))
    torch.manual_seed(0)
    ann = create_model("vgg11", width=1 / 16)
    snn, raw = conversion.convert(ann, cfg, _toy_train(), progress=False)
    n_units = len(snn.spiking_units())
    assert calls == (list(range(n_units)) if fresh else [None]) and methods == {method}
    assert len(raw) == n_units and snn.T == 2


# ---------------------------------------------------------------- BN statistics at the start of finetuning
def test_reset_bn_stats():
    m = transfer_parameters(create_model("resnet20", width=0.125))
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    for b in bns:
        b.running_mean.uniform_(-1, 1); b.running_var.uniform_(2, 3); b.num_batches_tracked.fill_(5)
    gamma = [b.weight.detach().clone() for b in bns]
    reset_bn_stats(m)
    assert all(torch.equal(b.running_mean, torch.zeros_like(b.running_mean)) for b in bns)
    assert all(torch.equal(b.running_var, torch.ones_like(b.running_var)) for b in bns)
    assert all(int(b.num_batches_tracked) == 0 for b in bns)
    assert all(torch.equal(b.weight, g) for b, g in zip(bns, gamma))  # affine parameters untouched


# ---------------------------------------------------------------- artifact addresses
NEW_KNOBS = ("percentile_method", "search_fresh_batches", "ft_bn_init", "channels_last")


def test_the_ci_preset_pins_the_earlier_behaviour_and_keeps_its_keys(monkeypatch):
    # ci keeps the threshold search and BN start it was built with (their legacy values leave the addresses alone);
    # it took channels-last on 2026-12-01 (1.3× faster on CI's 2 cores), which moved every ci address on purpose
    scale = "ci"
    cfg = get_config(scale)
    assert (cfg.percentile_method, cfg.search_fresh_batches, cfg.ft_bn_init, cfg.channels_last) == (
        "linear", False, "recalibrate", True)
    assert stage_key(cfg, "ann") != stage_key(cfg.replace(channels_last=False), "ann")
    legacy = cfg.replace(channels_last=False)
    keys = {s: stage_key(legacy, s, parent="p") for s in C.STAGE_GROUPS}
    without = {s: tuple(f for f in fs if f not in NEW_KNOBS) for s, fs in C.STAGE_FIELDS.items()}
    monkeypatch.setattr(C, "STAGE_FIELDS", without)  # the stage fields before the knobs existed
    assert keys == {s: stage_key(legacy, s, parent="p") for s in C.STAGE_GROUPS}


def test_the_cpu_preset_takes_the_authors_threshold_search_and_channels_last():
    # never run before these knobs existed, the cpu preset follows the paper where it costs little
    cfg = get_config("cpu")
    assert (cfg.percentile_method, cfg.search_fresh_batches, cfg.ft_bn_init, cfg.channels_last) == (
        "nearest_rank", True, "recalibrate", True)
    assert (cfg.T, cfg.T_search, cfg.n_eval, cfg.n_test, cfg.test_dataset) == (8, 100, None, None, "cifar10-exact")


def test_new_knobs_enter_their_stage_key():
    assert "percentile_method" in C.STAGE_FIELDS["convert"] and "search_fresh_batches" in C.STAGE_FIELDS["convert"]
    assert "ft_bn_init" in C.STAGE_FIELDS["finetune"]
    ci = get_config("ci")
    for field, value, stage in (("percentile_method", "nearest_rank", "convert"), ("search_fresh_batches", True, "convert"),
                                ("ft_bn_init", "reset", "finetune")):
        assert stage_key(ci.replace(**{field: value}), stage, parent="p") != stage_key(ci, stage, parent="p")
        other = "finetune" if stage == "convert" else "convert"
        assert stage_key(ci.replace(**{field: value}), other, parent="p") == stage_key(ci, other, parent="p")
    assert C.config_from_dict({"scale": "ci"}).percentile_method == "linear"  # a record older than the knob


# ---------------------------------------------------------------- every value of the paper preset
PAPER = dict(
    scale="paper", seed=0, device="auto", workers=1, out_dir=None,
    # data and model: CIFAR-10 (offline JPEG copy for training and testing), VGG-11 at full width
    dataset="cifar10-jpeg", test_dataset="cifar10-jpeg", n_train=None, n_val=1000, n_test=None,
    arch="vgg11", width=1.0, channels_last=True,
    # robust ANN training: SGD lr 0.1 (cosine) momentum 0.9 wd 5e-4, 200 epochs, batch 64, Cutout 8;
    # PGD-AT / TRADES (β 6) / MART (β 4) at ε_train = 2/255 with 10 steps of 2.5·ε/10
    ann_epochs=200, ann_batch_size=64, ann_lr=0.1, ann_momentum=0.9, ann_weight_decay=5e-4, ann_cutout=8,
    eps_train=2 / 255, train_attack_steps=10, trades_beta=6.0, mart_beta=4.0,
    # conversion: T = 100 for the search, 11 batches of 64, 99.7th percentile (nearest rank, fresh batches per
    # layer: the authors'), thresholds × 0.3, then T = 8; BN re-estimated on 20 batches (ours, to measure it)
    T_search=100, search_batches=11, search_batch_size=64, percentile=99.7, percentile_method="nearest_rank",
    search_fresh_batches=True, threshold_scale=0.3, bn_calib_batches=20, T=8, sweep_T_max=64, n_sweep=None,
    # robust finetuning: KL + CE (β = 2) against RFGSM-KL with ε = 2/255, α = 1/255; SGD lr 1e-3 momentum 0.9
    # wd 1e-3, 60 epochs, batch 64, thresholds learned; BN statistics re-estimated (our stated departure)
    ft_objective="kl_ce", ft_adversary="rfgsm", ft_epochs=60, ft_n_train=None, ft_batch_size=64, ft_lr=1e-3,
    ft_momentum=0.9, ft_weight_decay=1e-3, ft_eps=2 / 255, ft_alpha=1 / 255, ft_beta=2.0, ft_pgd_steps=10,
    learn_thresholds=True, ft_bn_init="recalibrate",
    # evaluation: ε_test = 8/255 on the whole test set in batches of 64, PGD 20 steps, APGD 10 iterations,
    # Square 5,000 queries; per-epoch validation PGD with 10 steps (ours: checkpoint selection)
    eps_test=8 / 255, eval_pgd_steps=20, eval_batch_size=64, val_attack_steps=10, n_eval=None, apgd_steps=10,
    square_queries=5000, eps_curve=(0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255), n_val_eval=None,
    # the strong protocol of the evaluation module (ours): AutoAttack's 100 iterations and 9 APGD-T targets,
    # a cosine-step PGD with 3 restarts, convergence rounds (3 strongest sources, one more per round, 2×, 4×, 8× the
    # iterations) until one lowers robust accuracy by at most 1 %
    strong_steps=100, strong_restarts=3, strong_targets=9, strong_sources=None, conv_sources=3, conv_tol=0.01,
    conv_rounds=3,
    # end-to-end baselines: SNN-RAT's recipe (SGD lr 0.1, 200 epochs, batch 64, wd 0, Parseval β = 0.004) and
    # PGD-AT by BPTT with 10 steps
    e2e_epochs=200, e2e_batch_size=64, e2e_lr=0.1, e2e_weight_decay=0.0, e2e_attack_steps=10, e2e_n_train=None,
    rat_beta=0.004,
    # ablations, corruptions (severities 1-5), seeds
    ablation_alphas=(0.5 / 255, 1.5 / 255), ablation_T=(4, 16), ablation_ann_objectives=("clean", "trades", "mart"),
    n_ablation=None, ood_severities=(1, 2, 3, 4, 5), n_ood=None, headline_seeds=(0,),
    # training budgets of the cost figure: the weights after every 20th epoch (10 points along 200 epochs)
    snapshot_every=20, n_budget=None,
    # the paper protocol against the end-to-end baselines: every attack over every source on every image
    e2e_full_attacks=("fgsm", "pgd", "apgd-ce"),
    # every claim decided at every ε of the curve, not only the comparison with end-to-end training
    curve_claims=("transfer", "ensemble", "blackbox"),
)


def test_paper_preset_pins_every_value():
    cfg = get_config("paper")
    got = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    assert set(got) - set(PAPER) == set(), "a new Config field: pin its paper value here"
    assert set(PAPER) - set(got) == set()
    assert got == PAPER


def test_training_pgd_step_is_2_5_eps_over_steps():
    "PGD-AT's adversary takes `train_attack_steps` steps of 2.5·ε/steps: every move is a multiple of that step."
    eps, steps = 2 / 255, 10
    alpha = 2.5 * eps / steps
    x = torch.full((1, 3, 4, 4), 0.5)
    target = x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) - 0.5) * eps  # inside ±ε/2

    def model(z):  # logit 0 = −‖z − target‖², so the CE of class 1 pulls every pixel towards the target
        return torch.stack([-((z - target) ** 2).flatten(1).sum(1), torch.zeros(len(z))], 1)
    g = torch.Generator().manual_seed(0)
    x_adv = pgd_train_adversary(model, x, torch.tensor([1]), eps, steps, generator=g)
    start = x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * eps  # its uniform start
    moves = (x_adv - start) / alpha
    assert torch.allclose(moves, moves.round(), atol=1e-3) and moves.abs().max() >= 2
    assert ((x_adv - target).abs() <= alpha + 1e-6).all()  # it ends within one step of the target
