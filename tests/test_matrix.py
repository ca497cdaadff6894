"""The paper's (architecture, dataset) matrix, smoke-tested: every pair of the paper's tables runs the whole chain with
the `paper` preset's settings — width 1, T = 8, its optimisers, schedules, ε's, the nearest-rank percentile with fresh
search batches per layer, threshold scale 0.3, β's and α — on stand-in data written in each dataset's real on-disk
format (CIFAR-10/100 python pickles, SVHN .mat, the tiny-imagenet-200 folder of JPEGs) into a temp dir.

Only data size, epochs, batch sizes and attack effort are overridden to tiny values (`TINY`). The chain, with the
library's own builders: robust ANN (PGD-AT, `build_ann`) → conversion (`build_converted`) → finetuning
(`build_finetuned`) → the paper protocol's 19-source PGD ensemble (`whitebox`) → both end-to-end baselines
(`build_e2e`) → one call of the strong protocol (`strong`) → the claim "vs end-to-end training" (`claim_vs_e2e`) on
these numbers. It proves the paper preset's code path on every architecture and dataset, not any accuracy: the
attacks use the model's own predictions as labels, so every image is "clean-correct" and is really attacked.

The subset runs with every test run, CI's included (every architecture and dataset once: `CI_PAIRS`, 8 pairs); the
whole matrix takes one flag. Both at the paper's width 1:

    python -m pytest tests/test_matrix.py                     # the subset (RSNN_MATRIX=0 skips it)
    RSNN_FULL_MATRIX=1 python -m pytest tests/test_matrix.py  # the whole matrix (the 12 pairs of `PAIRS`)

(`CI_PAIRS`, 8 pairs; the other 4 pairs run only with the full matrix).

Found by this matrix (2026-12-01, fixed): torch 2.14's CPU build corrupts the heap in oneDNN's backward of a
stride-2 1×1 convolution in channels-last layout with 2–7 input channels — the residual models' strided
shortcut at these narrow widths (glibc aborted; with 2 threads the process spun forever). The models compute that
shortcut as subsampling + a stride-1 1×1 convolution (`rsnn_paper.models.PointwiseConv`, same function and
parameters); `tests/test_archs.py::test_narrow_residual_models_train_in_channels_last` guards it.

Measured on 2 CPU cores, quiet (2026-12-01): the whole matrix in 442 s (VGG-11 pairs 45–82 s each, the residual
models 3–62 s), the subset in 234 s (its widest model, WRN-28-4, attacks one image instead of two).
"""
import math
import os
import pickle
import random

import numpy as np
import pytest
import torch

from rsnn_paper import data as D
from rsnn_paper.ann import build_ann
from rsnn_paper.baselines import BASELINES, build_e2e
from rsnn_paper.config import get_config
from rsnn_paper.conversion import _width_of, build_converted
from rsnn_paper.evaluation import strong, whitebox
from rsnn_paper.finetune import build_finetuned
from rsnn_paper.models import INPUT_SIZE, MODELS
from rsnn_paper.paper import claim_vs_e2e
from rsnn_paper.store import ArtifactStore
from rsnn_paper.surrogates import DEFAULT_SOURCE, GRADIENT_SOURCES
from rsnn_paper.training import load_splits

FULL = os.environ.get("RSNN_FULL_MATRIX") == "1"

# the paper's (dataset, architecture) pairs
PAIRS = [("cifar10", a) for a in ("vgg11", "vgg16", "resnet20", "resnet32", "wrn16_4", "wrn28_2", "wrn28_4")] + \
        [("cifar100", a) for a in ("vgg11", "resnet20", "wrn16_4")] + [("svhn", "vgg11"), ("tinyimagenet", "vgg11_tiny")]
# every architecture once, every dataset once
CI_PAIRS = {("cifar10", "vgg16"), ("cifar10", "resnet32"), ("cifar10", "wrn28_2"), ("cifar10", "wrn28_4"),
            ("cifar100", "resnet20"), ("cifar100", "wrn16_4"), ("svhn", "vgg11"), ("tinyimagenet", "vgg11_tiny")}
N_TRAIN, N_TEST = 3, 2  # stand-in images per split: 2 training images (one batch of 2) + 1 validation image
SLOW = {"wrn28_4"}      # the widest model: its attacks run on one image in CI (both images with the full matrix)
WIDTH = 1.0  # the paper's, in the subset as in the whole matrix

# data size, epochs, batch sizes and attack effort; everything else is the paper preset's
TINY = dict(device="cpu", n_val=1, ann_epochs=1, ann_batch_size=2, train_attack_steps=1, val_attack_steps=1,
            T_search=2, search_batches=1, search_batch_size=2, bn_calib_batches=1,
            ft_epochs=1, ft_batch_size=2, ft_pgd_steps=1, eval_pgd_steps=1, eval_batch_size=2, apgd_steps=1,
            square_queries=2, strong_steps=1, strong_restarts=1, strong_targets=1, strong_sources=1, conv_sources=1,
            e2e_epochs=1, e2e_batch_size=2, e2e_attack_steps=1)


def test_the_matrix_is_the_papers():
    assert {a for _, a in PAIRS} == set(MODELS) and {a for _, a in CI_PAIRS} == set(MODELS)
    assert {d for d, _ in PAIRS} == {d for d, _ in CI_PAIRS} == {"cifar10", "cifar100", "svhn", "tinyimagenet"}
    assert CI_PAIRS <= set(PAIRS) and len(PAIRS) == 12


def test_only_size_and_effort_are_overridden():
    paper, ours = get_config("paper"), get_config("paper", **TINY)
    assert (ours.width, ours.T, ours.scale) == (1.0, 8, "paper")
    kept = ("ann_lr", "ann_momentum", "ann_weight_decay", "ann_cutout", "eps_train", "percentile", "percentile_method",
            "search_fresh_batches", "threshold_scale", "ft_objective", "ft_adversary", "ft_lr", "ft_momentum",
            "ft_weight_decay", "ft_eps", "ft_alpha", "ft_beta", "learn_thresholds", "ft_bn_init", "eps_test",
            "e2e_lr", "e2e_weight_decay", "rat_beta", "conv_tol")
    assert all(getattr(ours, k) == getattr(paper, k) for k in kept)
    assert (ours.percentile_method, ours.search_fresh_batches, ours.threshold_scale) == ("nearest_rank", True, 0.3)


# ---------------------------------------------------------------- stand-in data in the real on-disk formats
def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _labels(rng, n, k):
    return rng.choice(k, n, replace=False).tolist()  # distinct classes


def _write_cifar10(root, rng):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    files = [f"data_batch_{i}" for i in range(1, 6)]
    sizes = [N_TRAIN] + [0] * 4  # the loader concatenates the five batches; four are empty
    for name, n in [*zip(files, sizes), ("test_batch", N_TEST)]:
        _pickle(folder / name, {b"batch_label": name.encode(), b"labels": _labels(rng, n, 10),
                                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                b"filenames": [b"f.png"] * n})
    _pickle(folder / "batches.meta", {b"label_names": [c.encode() for c in D.CIFAR10_CLASSES],
                                      b"num_cases_per_batch": 10000, b"num_vis": 3072})


def _write_cifar100(root, rng):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        fine = _labels(rng, n, 100)
        _pickle(folder / split, {b"filenames": [b"f.png"] * n, b"batch_label": b"b", b"fine_labels": fine,
                                 b"coarse_labels": [f // 5 for f in fine],
                                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)})
    _pickle(folder / "meta", {b"fine_label_names": [c.encode() for c in D.CIFAR100_CLASSES],
                              b"coarse_label_names": [b"c%d" % i for i in range(20)]})


def _write_svhn(root, rng):
    import scipy.io
    root.mkdir(parents=True)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        y = np.array(_labels(rng, n, 10)) + 1  # 1..10; 10 is the digit 0
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                                       "y": y.reshape(n, 1).astype(np.uint8)})


def _write_tinyimagenet(root, rng):
    "tiny-imagenet-200: 200 wnids (listed unsorted), every class folder present, images for a few classes only."
    from PIL import Image
    folder = root / "tiny-imagenet-200"
    wnids = [f"n{100000 + 7 * i:08d}" for i in range(200)]
    listed = wnids[:]
    random.Random(0).shuffle(listed)
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(listed) + "\n")

    def jpeg(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    have = set(rng.choice(200, N_TRAIN, replace=False).tolist())
    for i, w in enumerate(wnids):
        (folder / "train" / w / "images").mkdir(parents=True)
        (folder / "train" / w / f"{w}_boxes.txt").write_text("")
        if i in have:
            jpeg(folder / "train" / w / "images" / f"{w}_0.JPEG")
    lines = []
    for i in range(N_TEST):
        jpeg(folder / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{listed[(5 * i) % 200]}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (folder / "test" / "images").mkdir(parents=True)  # unlabelled: never read


WRITERS = {"cifar10": _write_cifar10, "cifar100": _write_cifar100, "svhn": _write_svhn,
           "tinyimagenet": _write_tinyimagenet}


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    "A per-test RSNN_DATA (and a cache, for the JPEG decoder); the writer of the dataset at hand fills it."
    root = tmp_path / "data"
    monkeypatch.setenv("RSNN_DATA", str(root))
    monkeypatch.setenv("RSNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RSNN_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("RSNN_ROOT", str(tmp_path))  # results/figures, should anything be written there
    return root


# ---------------------------------------------------------------- the chain
def _finite(v) -> bool:
    return v is not None and math.isfinite(float(v))


def _check_model(model, ds, K, cfg, x):
    "K outputs, the dataset's normalisation, the width asked for (1 with the full matrix), T = 8, finite logits."
    mean, std = D.NORMALIZATION[ds]
    assert model.num_classes == K
    assert torch.allclose(model.mean.flatten(), torch.tensor(mean)) and torch.allclose(model.std.flatten(), torch.tensor(std))
    assert _width_of(model) == cfg.width == WIDTH
    assert model.T == 8 == cfg.T
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (len(x), K) and torch.isfinite(out).all()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("ds,arch", PAIRS, ids=[f"{d}-{a}" for d, a in PAIRS])
def test_paper_pair(ds, arch, data_root, tmp_path):
    if not FULL and os.environ.get("RSNN_MATRIX") == "0":
        pytest.skip("RSNN_MATRIX=0: the matrix subset is skipped (RSNN_FULL_MATRIX=1 runs the whole matrix)")
    if (ds, arch) not in CI_PAIRS and not FULL:
        pytest.skip("outside the subset: set RSNN_FULL_MATRIX=1 to run the whole matrix")
    torch.manual_seed(0)
    WRITERS[ds](data_root, np.random.default_rng(0))
    K, side = D.NUM_CLASSES[ds], INPUT_SIZE[arch]
    assert side == D.IMAGE_SIZE[ds]
    cfg = get_config("paper", dataset=ds, test_dataset=ds, arch=arch, width=WIDTH, **TINY)
    assert cfg.T == 8 and cfg.width == 1.0
    store = ArtifactStore(tmp_path / "artifacts")
    train, val, test = splits = load_splits(cfg)
    assert (len(train), len(val), len(test)) == (N_TRAIN - 1, 1, N_TEST)
    assert train.num_classes == test.num_classes == K and train.images.shape[1:] == (3, side, side)
    assert (train.mean, train.std) == D.NORMALIZATION[ds]

    # 1. robust ANN (PGD-AT)
    ann, ameta = build_ann(cfg, "pgd_at", store, splits, progress=False)
    assert ann.num_classes == K and ann.T == 0 and ameta["num_classes"] == K and ameta["width"] == WIDTH
    assert all(_finite(r["train_loss"]) for r in ameta["history"]) and len(ameta["history"]) == 1
    # 2. conversion: the nearest-rank search at T_search, thresholds × 0.3, T = 8
    conv, cmeta = build_converted(cfg, ann, ameta["key"], train, store, progress=False)
    assert cmeta["T"] == 8 and cmeta["config"]["percentile_method"] == "nearest_rank"
    assert len(cmeta["raw_thresholds"]) == len(conv.spiking_units()) and all(map(_finite, cmeta["raw_thresholds"]))
    assert cmeta["thresholds"] == pytest.approx([0.3 * t for t in cmeta["raw_thresholds"]], rel=1e-5)
    # 3. finetuning (KL + CE against RFGSM-KL, thresholds learned)
    snn, fmeta = build_finetuned(cfg, conv, cmeta["key"], train, val, store, progress=False)
    assert fmeta["T"] == 8 and fmeta["num_classes"] == K and all(map(_finite, fmeta["thresholds"]))
    assert all(_finite(r["train_loss"]) for r in fmeta["history"]) and len(fmeta["history"]) == 1
    x = test.images.float() / 255
    if arch in SLOW and not FULL:
        x = x[:1]
    logits = _check_model(snn, ds, K, cfg, x)
    y = logits.argmax(1)  # the model's own predictions: every image is clean-correct, every attack really runs
    # 4. the paper protocol: PGD with each of the 19 gradient sources on every image
    wb = whitebox(snn, fmeta["key"], x, y, "pgd", cfg.eps_test, cfg, store)
    assert wb["sources"] == [s.name for s in GRADIENT_SOURCES] and len(wb["sources"]) == 19
    assert wb["clean_acc"] == 1.0 and wb["attack_kwargs"] == {"steps": 1}
    assert all(v == len(x) for v in wb["attacked_n"].values())
    assert all(map(_finite, [wb["ensemble_acc"], wb["best_single_acc"], *wb["per_source"].values()]))
    # 5. both end-to-end baselines, trained from scratch by BPTT at T = 8
    rows = {"finetuned": None}
    for kind in BASELINES:
        e2e, emeta = build_e2e(cfg, kind, store, splits, progress=False)
        assert emeta["num_classes"] == K and emeta["T"] == 8 and emeta["width"] == WIDTH
        assert all(_finite(r["train_loss"]) for r in emeta["history"]) and len(emeta["history"]) == 1
        ey = _check_model(e2e, ds, K, cfg, x).argmax(1)
        r = whitebox(e2e, emeta["key"], x, ey, "pgd", cfg.eps_test, cfg, store, sources=(DEFAULT_SOURCE,))
        assert _finite(r["ensemble_acc"])
        # the claim's inputs (code path only: the baselines' robust accuracy here is the one-source 1-step PGD)
        rows[kind] = {"strong.robust_acc": r["ensemble_acc"], "clean_acc": r["clean_acc"], "strong.converged": True,
                      "pgd.ensemble_acc": r["ensemble_acc"]}
    # 6. the strong protocol, once (its first two stages with every source, the long ones with the strongest)
    st = strong(snn, fmeta["key"], x, y, cfg.eps_test, cfg, store, prior=[wb], quiet=True)
    assert st["n"] == len(x) and st["clean_acc"] == 1.0 and len(st["sources"]) == 19
    assert all(map(_finite, (st["robust_acc"], st["whitebox_acc"], st["before_check_acc"])))
    assert st["robust_acc"] <= wb["ensemble_acc"] and isinstance(st["converged"], bool)
    # 7. the claim "vs end-to-end training" on these numbers
    rows["finetuned"] = {"strong.robust_acc": st["robust_acc"], "clean_acc": st["clean_acc"],
                         "strong.converged": st["converged"], "pgd.ensemble_acc": wb["ensemble_acc"]}
    c = claim_vs_e2e({"baselines": {"n_images": len(x), "eps": cfg.eps_test, "models": rows},
                      "ann": {"anns": {"clean": {"clean_acc": 1.0}}}})
    assert isinstance(c["holds"], bool) and c["eps"] == "8/255" and _finite(c["numbers"]["clean_loss_ours"])
