"""Loaders of the paper's other datasets, each tested on files written here in the dataset's real on-disk format:
CIFAR-100 (python pickles), SVHN (.mat), Tiny ImageNet (the tiny-imagenet-200 folder of JPEGs). Every dataset
carries its class count, normalisation and augmentation, and the stages take them from it."""
import pickle
import random

import numpy as np
import pytest
import torch

from rsnn_paper import data as D
from rsnn_paper import training
from rsnn_paper.conversion import search_batches
from rsnn_paper.config import get_config
from rsnn_paper.models import create_model

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _augment_keeps_shape(ds, cutout):
    x = ds.images[:4].float() / 255
    a = ds.augment(x, torch.Generator().manual_seed(0), cutout=True)
    b = ds.augment(x, torch.Generator().manual_seed(0), cutout=True)
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
    assert D.augmentation_for(ds, True)["cutout"] == cutout and D.augmentation_for(ds)["cutout"] == 0


# ---------------------------------------------------------------- CIFAR-100
@pytest.fixture
def cifar100_root(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    content = {}
    for split, n in (("train", 12), ("test", 6)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        content[split] = (x, fine)
        _pickle(folder / split, {b"filenames": [b"f.png"] * n, b"batch_label": b"b", b"fine_labels": fine,
                                 b"coarse_labels": [f // 5 for f in fine], b"data": x})
    _pickle(folder / "meta", {b"fine_label_names": [c.encode() for c in D.CIFAR100_CLASSES],
                              b"coarse_label_names": [b"c%d" % i for i in range(20)]})
    return tmp_path, content


def test_cifar100_pickles(cifar100_root):
    root, content = cifar100_root
    for split, n in (("train", 12), ("test", 6)):
        ds = D.load_dataset("cifar100", split, root=root)
        x, fine = content[split]
        assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.uint8
        assert np.array_equal(ds.images.numpy().reshape(n, 3072), x)  # CHW row-major rows
        assert ds.targets.tolist() == fine  # fine labels, not coarse
        assert ds.num_classes == 100 and ds.classes == list(D.CIFAR100_CLASSES)
        assert (ds.mean, ds.std) == ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
        assert ds.augmentation == dict(crop_padding=4, flip=True, cutout=8)
    _augment_keeps_shape(ds, 8)


def test_model_built_from_the_cifar100_dataset_has_100_outputs(cifar100_root):
    ds = D.load_dataset("cifar100", "test", root=cifar100_root[0])
    m = create_model("resnet20", num_classes=ds.num_classes, width=0.125, mean=ds.mean, std=ds.std)
    x, _ = next(D.iterate_batches(ds, 3))
    assert m(x).shape == (3, 100)
    assert torch.allclose(m.mean.flatten(), torch.tensor(ds.mean)) and torch.allclose(m.std.flatten(), torch.tensor(ds.std))
    # the same facts without loading anything, e.g. to build the model before the data
    info = D.dataset_info("cifar100")
    assert (info.num_classes, info.mean, info.std, info.augmentation) == (100, ds.mean, ds.std, ds.augmentation)
    m2 = create_model("vgg11", num_classes=info.num_classes, width=1 / 16, mean=info.mean, std=info.std)
    assert m2(x).shape == (3, 100)


# ---------------------------------------------------------------- SVHN
def test_svhn_mat_files(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(1)
    for split, n in (("train", 11), ("test", 7)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1)  # 1..10; 10 is the digit 0
        scipy_io.savemat(tmp_path / f"{split}_32x32.mat", {"X": X, "y": y.astype(np.uint8)})
        ds = D.load_dataset("svhn", split, root=tmp_path)
        assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.uint8
        assert ds.targets.tolist() == [v % 10 for v in y.reshape(-1).tolist()]  # 10 -> 0, others unchanged
        assert ds.targets.tolist()[:10] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0][: min(n, 10)]
        for i in (0, n - 1):  # X[h, w, c, i] is image i
            assert np.array_equal(ds.images[i].permute(1, 2, 0).numpy(), X[..., i])
        assert ds.num_classes == 10 and ds.classes == [str(d) for d in range(10)]
        assert (ds.mean, ds.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    _augment_keeps_shape(ds, 8)


# ---------------------------------------------------------------- Tiny ImageNet
def _jpeg(path, rgb, gray=False):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.empty((64, 64, 3), np.uint8)
    a[:] = rgb
    a[:32, :32] = 255 - np.asarray(rgb, np.uint8)  # not a flat image
    im = Image.fromarray(a)
    (im.convert("L") if gray else im).save(path, quality=90)


@pytest.fixture
def tiny_root(tmp_path):
    "A tiny-imagenet-200 folder: 200 wnids (listed unsorted), one training image per class, 12 validation images."
    root = tmp_path / "data"
    folder = root / "tiny-imagenet-200"
    wnids = [f"n{100000 + 7 * i:08d}" for i in range(200)]
    listed = wnids[:]
    random.Random(0).shuffle(listed)
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(listed) + "\n")
    rng = np.random.default_rng(2)
    colour = {w: rng.integers(0, 256, 3) for w in wnids}
    for w in wnids[:3]:  # a second training image for three classes
        _jpeg(folder / "train" / w / "images" / f"{w}_1.JPEG", colour[w])
    for w in wnids:
        _jpeg(folder / "train" / w / "images" / f"{w}_0.JPEG", colour[w])
        (folder / "train" / w / f"{w}_boxes.txt").write_text("")
    val_labels = [listed[(5 * i) % 200] for i in range(12)]
    lines = []
    for i in reversed(range(12)):  # the annotation file's order does not matter
        _jpeg(folder / "val" / "images" / f"val_{i}.JPEG", colour[val_labels[i]], gray=(i == 4))
        lines.append(f"val_{i}.JPEG\t{val_labels[i]}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (folder / "test" / "images").mkdir(parents=True)  # unlabelled: never read
    return root, sorted(wnids), val_labels


def test_tinyimagenet_folder_layout(tiny_root, tmp_path):
    from PIL import Image
    root, classes, val_labels = tiny_root
    cache = tmp_path / "cache"
    train = D.load_dataset("tinyimagenet", "train", root=root, cache_dir=cache)
    test = D.load_dataset("tinyimagenet", "test", root=root, cache_dir=cache)
    assert train.images.shape == (203, 3, 64, 64) and test.images.shape == (12, 3, 64, 64)
    assert train.images.dtype == torch.uint8
    # labels: index of the wnid in sorted order (torchvision ImageFolder's, the authors'), not wnids.txt's order
    assert train.classes == classes and test.classes == classes and train.num_classes == 200
    assert train.targets.tolist() == [0, 0, 1, 1, 2, 2] + list(range(3, 200))
    assert test.targets.tolist() == [classes.index(w) for w in val_labels]  # val_0, val_1, ..., val_11
    # pixels are Pillow's decoding, CHW; the grayscale image became RGB
    folder = root / "tiny-imagenet-200"
    for i in (0, 4, 11):
        with Image.open(folder / "val" / "images" / f"val_{i}.JPEG") as im:
            ref = np.asarray(im.convert("RGB"))
        assert np.array_equal(test.images[i].permute(1, 2, 0).numpy(), ref)
    assert torch.equal(test.images[4, 0], test.images[4, 1])
    with Image.open(folder / "train" / classes[5] / "images" / f"{classes[5]}_0.JPEG") as im:
        assert np.array_equal(train.images[8].permute(1, 2, 0).numpy(), np.asarray(im.convert("RGB")))
    assert (train.mean, train.std) == IMAGENET and train.name == "tinyimagenet"
    assert train.augmentation == dict(resized_crop=True, crop_padding=0, flip=True, cutout=16)
    _augment_keeps_shape(train, 16)
    assert len(list(cache.glob("tinyimagenet_*.npz"))) == 2


def test_tinyimagenet_cache_is_reused_and_keyed_by_the_files(tiny_root, tmp_path, monkeypatch):
    root, classes, _ = tiny_root
    cache = tmp_path / "cache"
    first = D.load_dataset("tinyimagenet", "test", root=root, cache_dir=cache)

    def no_decoding(files, size=64):
        raise AssertionError("decoded again")
    monkeypatch.setattr(D, "_decode_tinyimagenet", no_decoding)
    again = D.load_dataset("tinyimagenet", "test", root=root, cache_dir=cache)
    assert torch.equal(first.images, again.images) and torch.equal(first.targets, again.targets)
    # a changed image is a new cache entry: decoded again
    _jpeg(root / "tiny-imagenet-200" / "val" / "images" / "val_3.JPEG", (1, 2, 3))
    with pytest.raises(AssertionError, match="decoded again"):
        D.load_dataset("tinyimagenet", "test", root=root, cache_dir=cache)


def test_tinyimagenet_missing_and_malformed(tmp_path, tiny_root):
    with pytest.raises(D.DatasetNotFoundError, match="tiny-imagenet-200"):
        D.load_dataset("tinyimagenet", "train", root=tmp_path / "empty", cache_dir=tmp_path / "c")
    root = tiny_root[0]
    _jpeg(root / "tiny-imagenet-200" / "val" / "images" / "val_0.JPEG", (0, 0, 0))
    from PIL import Image
    Image.new("RGB", (32, 32)).save(root / "tiny-imagenet-200" / "val" / "images" / "val_0.JPEG")
    with pytest.raises(D.DatasetFormatError, match="64×64"):
        D.load_dataset("tinyimagenet", "test", root=root, cache_dir=tmp_path / "c")


def test_model_built_from_the_tiny_dataset(tiny_root, tmp_path):
    ds = D.load_dataset("tinyimagenet", "test", root=tiny_root[0], cache_dir=tmp_path / "cache")
    m = create_model("vgg11_tiny", num_classes=ds.num_classes, width=0.125, mean=ds.mean, std=ds.std)
    x, _ = next(D.iterate_batches(ds, 2))
    assert x.shape == (2, 3, 64, 64) and m(x).shape == (2, 200)
    m.T = 2
    assert m(x).shape == (2, 200)


# ---------------------------------------------------------------- the stages take the dataset's augmentation
def test_augmentation_for_keeps_the_cifar_arguments():
    "CIFAR-10's arguments are those fit and the threshold search passed before (committed results stay)."
    ds = D.ImageDataset(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), [0, 1], name="cifar10-exact", split="train",
                        classes=D.CIFAR10_CLASSES)
    assert D.augmentation_for(ds, 8) == dict(crop_padding=4, flip=True, cutout=8, resized_crop=False)
    assert D.augmentation_for(ds) == dict(crop_padding=4, flip=True, cutout=0, resized_crop=False)
    assert D.augmentation_for(ds.subset([0]), True)["cutout"] == 8  # subsets keep the augmentation


def test_fit_and_threshold_search_use_the_datasets_augmentation(tiny_root, tmp_path, monkeypatch):
    ds = D.load_dataset("tinyimagenet", "test", root=tiny_root[0], cache_dir=tmp_path / "cache")
    seen = []
    real = training.augment

    def spy(x, generator, **kw):
        seen.append(kw)
        return real(x, generator, **kw)
    monkeypatch.setattr(training, "augment", spy)
    model = create_model("vgg11_tiny", num_classes=ds.num_classes, width=1 / 16, mean=ds.mean, std=ds.std)
    training.fit(training.TrainStep(model, "clean", eps=0), ds.subset(range(4)), ds.subset([0, 1]), epochs=1,
                 batch_size=4, lr=0.01, cutout=True, progress=False)
    assert seen and all(kw["resized_crop"] and kw["cutout"] == 16 and kw["flip"] for kw in seen)
    assert seen[0]["fill"] == IMAGENET[0]
    cfg = get_config("ci", search_batches=2, search_batch_size=4)
    for layer in (None, 0, 3):
        batches = search_batches(cfg, ds, "cpu", layer)
        assert len(batches) == 2 and all(b.shape == (4, 3, 64, 64) for b in batches)


def test_dataset_info_matches_the_loaded_datasets():
    for name in D.DATASETS:
        info = D.dataset_info(name)
        base = name.split("-")[0]
        assert (info.mean, info.std) == D.NORMALIZATION[base] and info.augmentation == D.AUGMENTATION[base]
    assert [D.dataset_info(n).num_classes for n in ("cifar10", "cifar100", "svhn", "tinyimagenet")] == [10, 100, 10, 200]
    assert D.dataset_info("tinyimagenet").image_size == 64 and D.dataset_info("cifar10-exact").image_size == 32
    with pytest.raises(ValueError, match="tinyimagenet"):
        D.dataset_info("imagenet")


def test_e2e_baselines_take_the_datasets_classes_and_normalisation(cifar100_root, tmp_path, monkeypatch):
    # before: build_e2e built its SNN before loading the data, so a CIFAR-100 baseline had 10 outputs and
    # CIFAR-10's normalisation (and failed on the first batch of labels >= 10)
    from rsnn_paper.baselines import BASELINES, build_e2e
    from rsnn_paper.store import ArtifactStore
    monkeypatch.setenv("RSNN_DATA", str(cifar100_root[0]))
    cfg = get_config("ci", dataset="cifar100", test_dataset="cifar100", n_train=None, n_val=4, n_test=None,
                     width=1 / 16, T=2, e2e_epochs=1, e2e_n_train=None, e2e_batch_size=4, e2e_attack_steps=1,
                     val_attack_steps=1, n_val_eval=None, workers=1)
    for kind in BASELINES:
        snn, meta = build_e2e(cfg, kind, ArtifactStore(tmp_path / "store"), progress=False)
        assert snn.num_classes == meta["num_classes"] == 100
        assert torch.allclose(snn.mean.flatten(), torch.tensor(D.NORMALIZATION["cifar100"][0]))
        assert torch.allclose(snn.std.flatten(), torch.tensor(D.NORMALIZATION["cifar100"][1]))
        x = torch.rand(2, 3, 32, 32)
        assert snn(x).shape == (2, 100) and torch.isfinite(snn(x)).all()
