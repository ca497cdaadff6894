"""Tests for rsnn_paper.data: offline CIFAR-10 (exact + JPEG), torchvision layouts, subsets, augmentation, batching.

Uses the real files in the resolved data root (../shared/data or $RSNN_DATA); nothing is downloaded.
The JPEG set is decoded once per test session into a temporary cache folder (about 8 s)."""
import ast
import pickle
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    from rsnn_paper import data as D
except ImportError:  # not installed: use the checkout this file lives in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rsnn_paper import data as D


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def data_root():
    root = D.resolve_data_root()
    assert (root / D.EXACT_FILE).is_file(), f"exact subset missing under {root} (set RSNN_DATA)"
    return root


@pytest.fixture(scope="module")
def exact(data_root):
    return D.load_dataset("cifar10-exact", "train", root=data_root), D.load_dataset("cifar10-exact", "test", root=data_root)


@pytest.fixture(scope="module")
def exact_npz(data_root):
    with np.load(data_root / D.EXACT_FILE) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def jpeg(data_root, tmp_path_factory):
    "Decode the JPEG set once into a session-private cache; record warnings and the decode time."
    cache = tmp_path_factory.mktemp("jpeg_cache")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        train = D.load_dataset("cifar10-jpeg", "train", root=data_root, cache_dir=cache)
        t_decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    test = D.load_dataset("cifar10-jpeg", "test", root=data_root, cache_dir=cache)
    t_cached = time.perf_counter() - t0
    return dict(train=train, test=test, cache=cache, t_decode=t_decode, t_cached=t_cached,
                warnings=[str(w.message) for w in caught])


def _hwc(ds):
    return np.ascontiguousarray(ds.images.permute(0, 2, 3, 1).numpy())


@pytest.fixture(scope="module")
def decoded_arrays(jpeg):
    "The JPEG set as the decoder returns it: HWC uint8 images and int64 labels."
    return {"x_train": _hwc(jpeg["train"]), "y_train": jpeg["train"].targets.numpy(),
            "x_test": _hwc(jpeg["test"]), "y_test": jpeg["test"].targets.numpy()}


@pytest.fixture
def fake_decoder(decoded_arrays, monkeypatch):
    "Replace the (slow) JPEG decoder by one returning the already decoded arrays; counts calls."
    calls = []

    def fake(tar_path):
        calls.append(tar_path)
        return dict(decoded_arrays), list(D.CIFAR10_CLASSES)
    monkeypatch.setattr(D, "_decode_cifar10_jpeg", fake)
    return calls


# ---------------------------------------------------------------- exact subset

def test_exact_sizes_pixels_labels(exact):
    train, test = exact
    assert (len(train), len(test)) == (4000, 1000)
    assert train.images.shape == (4000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.targets.shape == (4000,) and train.targets.dtype == torch.int64
    assert train.images[0, 0, 0, :3].tolist() == [59, 43, 50]
    assert test.images[0, 0, 0, :3].tolist() == [158, 159, 165]
    assert train.targets[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert test.targets[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert train.classes[int(train.targets[0])] == "frog"


def test_exact_matches_npz_hwc(exact, exact_npz):
    train, test = exact
    assert np.array_equal(_hwc(train), exact_npz["x_train"])
    assert np.array_equal(_hwc(test), exact_npz["x_test"])


def test_exact_getitem_and_metadata(exact):
    train, test = exact
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert type(y) is int and y == 6
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.allclose(x * 255, train.images[0].float())
    assert train.name == "cifar10-exact" and train.split == "train" and test.split == "test"
    assert train.classes == list(D.CIFAR10_CLASSES) and train.num_classes == 10
    assert (train.mean, train.std) == D.NORMALIZATION["cifar10"]
    assert isinstance(train, torch.utils.data.Dataset) and train.indices is None
    assert "cifar10-exact" in repr(train)


def test_exact_pixel_statistics(exact):
    px = exact[0].images.double() / 255
    mean, std = px.mean((0, 2, 3)), px.std((0, 2, 3))
    assert torch.allclose(mean, torch.tensor([0.4916, 0.4818, 0.4447], dtype=torch.double), atol=1e-3)
    assert torch.allclose(std, torch.tensor([0.2471, 0.2440, 0.2625], dtype=torch.double), atol=1e-3)


def test_dataloader_compatible(exact):
    loader = torch.utils.data.DataLoader(exact[1], batch_size=16)
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, exact[1].targets[:16])


# ---------------------------------------------------------------- names, errors, roots

def test_constants():
    assert D.DATASETS == ("cifar10-exact", "cifar10-jpeg", "cifar10", "cifar100", "svhn", "tinyimagenet")
    assert D.NORMALIZATION["cifar10"] == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert D.NORMALIZATION["cifar100"] == ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
    assert D.NORMALIZATION["svhn"] == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert len(D.CIFAR100_CLASSES) == 100 and len(set(D.CIFAR100_CLASSES)) == 100


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as e:
        D.load_dataset("imagenet", "train")
    for n in D.DATASETS:
        assert n in str(e.value)


@pytest.mark.parametrize("split", ["val", "training", "extra", ""])
def test_unknown_split(split):
    with pytest.raises(ValueError, match="split"):
        D.load_dataset("cifar10-exact", split)


@pytest.mark.parametrize("name,expected", [
    ("cifar10-exact", D.EXACT_FILE), ("cifar10-jpeg", D.JPEG_FILE),
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("svhn", "train_32x32.mat")])
def test_missing_dataset_names_path(tmp_path, name, expected):
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.load_dataset(name, "train", root=tmp_path, cache_dir=tmp_path / "cache")
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    assert str(tmp_path) in msg and expected in msg
    assert "RSNN_DATA" in msg and "root=" in msg
    if name in ("cifar10", "cifar100", "svhn"):
        assert "download=True" in msg
    assert not (tmp_path / "cache").exists()  # nothing decoded or cached


def test_missing_dataset_lists_roots_tried(tmp_path, monkeypatch):
    monkeypatch.delenv("RSNN_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(D, "_repo_root", lambda: tmp_path / "nowhere" / "repo")
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.load_dataset("cifar10-exact", "test")
    msg = str(e.value)
    assert str(tmp_path / "data" / D.EXACT_FILE) in msg
    assert str((tmp_path / ".." / "shared" / "data").resolve()) in msg
    assert str(tmp_path / "nowhere" / "shared" / "data") in msg


def test_resolve_data_root_order(tmp_path, monkeypatch):
    monkeypatch.delenv("RSNN_DATA", raising=False)
    work = tmp_path / "repo"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(D, "_repo_root", lambda: tmp_path / "pkgrepo")
    # nothing exists: ./data
    assert D.resolve_data_root() == work / "data"
    # package-relative <repo>/../shared/data
    monkeypatch.setattr(D, "_repo_root", lambda: tmp_path / "x" / "pkgrepo")
    (tmp_path / "x" / "shared" / "data").mkdir(parents=True)
    assert D.resolve_data_root() == (tmp_path / "x" / "shared" / "data").resolve()
    # cwd-relative ../shared/data wins over the package location
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert D.resolve_data_root() == (tmp_path / "shared" / "data").resolve()
    # env wins over both, even if missing
    monkeypatch.setenv("RSNN_DATA", str(tmp_path / "env"))
    assert D.resolve_data_root() == tmp_path / "env"
    # the argument wins over everything
    assert D.resolve_data_root(tmp_path / "arg") == tmp_path / "arg"
    assert D.resolve_data_root(str(tmp_path / "arg")) == tmp_path / "arg"


def test_resolve_data_root_from_package_file():
    # the real package: <repo>/../shared/data computed from the module file
    assert D._repo_root() == Path(D.__file__).resolve().parents[1]


def test_rsnn_data_env_is_used(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("RSNN_DATA", str(data_root))
    monkeypatch.chdir(tmp_path)
    assert len(D.load_dataset("cifar10-exact", "test")) == 1000


def test_resolve_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("RSNN_CACHE", raising=False)
    assert D.resolve_cache_dir() == Path.home() / ".cache" / "rsnn_paper"
    monkeypatch.setenv("RSNN_CACHE", str(tmp_path / "c"))
    assert D.resolve_cache_dir() == tmp_path / "c"
    assert D.resolve_cache_dir(tmp_path / "d") == tmp_path / "d"


def test_malformed_exact_npz(tmp_path, exact_npz):
    bad = dict(exact_npz)
    del bad["x_test"]
    np.savez(tmp_path / D.EXACT_FILE, **bad)
    with pytest.raises(D.DatasetFormatError) as e:
        D.load_dataset("cifar10-exact", "test", root=tmp_path)
    assert isinstance(e.value, ValueError) and isinstance(e.value, D.DatasetNotFoundError)
    assert str(tmp_path / D.EXACT_FILE) in str(e.value)

    bad = dict(exact_npz, x_train=exact_npz["x_train"].transpose(0, 3, 1, 2))  # CHW instead of HWC
    np.savez(tmp_path / D.EXACT_FILE, **bad)
    with pytest.raises(D.DatasetFormatError, match=r"\(N,32,32,3\)"):
        D.load_dataset("cifar10-exact", "train", root=tmp_path)

    bad = dict(exact_npz, y_test=exact_npz["y_test"][:10])
    np.savez(tmp_path / D.EXACT_FILE, **bad)
    with pytest.raises(D.DatasetFormatError):
        D.load_dataset("cifar10-exact", "test", root=tmp_path)

    (tmp_path / D.EXACT_FILE).write_bytes(b"not a zip file at all")
    with pytest.raises(D.DatasetFormatError) as e:
        D.load_dataset("cifar10-exact", "train", root=tmp_path)
    assert str(tmp_path / D.EXACT_FILE) in str(e.value)


def test_unreadable_tar(tmp_path):
    (tmp_path / D.JPEG_FILE).write_bytes(b"\xfd7zXZ\x00garbage" * 100)
    with pytest.raises(D.DatasetFormatError) as e:
        D.load_dataset("cifar10-jpeg", "test", root=tmp_path, cache_dir=tmp_path / "cache")
    assert str(tmp_path / D.JPEG_FILE) in str(e.value)


def test_optional_dependencies_imported_lazily():
    "Nothing heavy or download-capable at import: torchvision, scipy and PIL are imported inside functions only."
    tree = ast.parse(Path(D.__file__).read_text())
    top = set()
    for node in tree.body:  # module level statements only
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    assert not top & {"torchvision", "scipy", "PIL"}, top
    assert top <= {"__future__", "contextlib", "hashlib", "io", "os", "pickle", "tarfile", "tempfile", "warnings",
                   "pathlib", "typing", "numpy", "torch"}, top


# ---------------------------------------------------------------- JPEG set

def test_jpeg_sizes_and_balance(jpeg):
    train, test = jpeg["train"], jpeg["test"]
    assert (len(train), len(test)) == (50_000, 10_000)
    assert train.images.shape == (50_000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.targets.bincount(minlength=10).tolist() == [5000] * 10
    assert test.targets.bincount(minlength=10).tolist() == [1000] * 10
    assert torch.equal(test.targets, torch.arange(10_000) // 1000)  # class-major test set
    assert train.name == "cifar10-jpeg" and train.classes == list(D.CIFAR10_CLASSES)
    assert (train.mean, train.std) == D.NORMALIZATION["cifar10"]


def test_jpeg_train_labels_equal_exact_full_labels(jpeg, exact_npz):
    assert np.array_equal(jpeg["train"].targets.numpy(), exact_npz["y_train_full"])


def test_jpeg_train_close_to_exact(jpeg, exact):
    mae = (jpeg["train"].images[:4000].float() - exact[0].images.float()).abs().mean((1, 2, 3))
    assert mae.max() < 15 and 3 < mae.mean() < 9  # README: 5.81 mean, 12.99 max (0-255 scale)
    shifted = (jpeg["train"].images[1:4001].float() - exact[0].images.float()).abs().mean((1, 2, 3))
    assert shifted.mean() > 40  # the mapping really is image-to-image


def test_jpeg_test_positions(jpeg, exact, exact_npz):
    y = exact_npz["y_test"]
    cnt, expected = np.zeros(10, int), []
    for c in y:  # the README's loop
        expected.append(c * 1000 + cnt[c])
        cnt[c] += 1
    pos = D.exact_test_positions_in_jpeg(exact[1].targets)
    assert pos.dtype == torch.int64 and pos.tolist() == expected
    assert len(set(pos.tolist())) == 1000
    matched = jpeg["test"].subset(pos)
    assert torch.equal(matched.targets, exact[1].targets)
    assert (matched.images.float() - exact[1].images.float()).abs().mean((1, 2, 3)).max() < 15


def test_jpeg_decoded_hash(jpeg, decoded_arrays):
    from PIL import features
    import PIL
    hash_warnings = [w for w in jpeg["warnings"] if "sha256" in w]
    if PIL.__version__ == "13.0.0" and features.version("libjpeg_turbo") == "3.2.0":
        assert hash_warnings == []  # same decoder as the README: the arrays are bit-identical
    assert D._check_decoded_sha256(decoded_arrays) == (not hash_warnings)


def test_hash_mismatch_is_a_warning():
    with pytest.warns(UserWarning, match="sha256"):
        assert D._check_decoded_sha256({"x_test": np.zeros((10, 32, 32, 3), np.uint8)}) is False


def test_jpeg_cache_written_atomically(jpeg):
    files = sorted(p.name for p in jpeg["cache"].iterdir())
    assert len(files) == 1 and files[0].startswith("cifar10_jpeg_") and files[0].endswith(".npz")
    with np.load(jpeg["cache"] / files[0]) as z:
        assert z["x_train"].shape == (50_000, 3, 32, 32) and z["x_test"].shape == (10_000, 3, 32, 32)


def test_jpeg_cache_reused(jpeg, data_root, monkeypatch):
    def boom(tar_path):
        raise AssertionError("decoded again although the cache exists")
    monkeypatch.setattr(D, "_decode_cifar10_jpeg", boom)
    t0 = time.perf_counter()
    again = D.load_dataset("cifar10-jpeg", "test", root=data_root, cache_dir=jpeg["cache"])
    assert time.perf_counter() - t0 < 5
    assert torch.equal(again.images, jpeg["test"].images) and torch.equal(again.targets, jpeg["test"].targets)
    assert jpeg["t_cached"] < jpeg["t_decode"]


def _corrupt_garbage(p):
    p.write_bytes(b"garbage" * 1000)


def _corrupt_truncate(p):
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)


def _corrupt_flip(p):
    with open(p, "r+b") as f:  # flip bytes inside the pixel data: caught by the zip CRC-32
        f.seek(p.stat().st_size // 3)
        b = f.read(16)
        f.seek(p.stat().st_size // 3)
        f.write(bytes(x ^ 0xFF for x in b))


def _corrupt_wrong_arrays(p):
    np.savez(p, x_train=np.zeros((5, 3, 32, 32), np.uint8), y_train=np.zeros(5, np.int64),
             x_test=np.zeros((5, 3, 32, 32), np.uint8), y_test=np.zeros(5, np.int64),
             classes=np.array(D.CIFAR10_CLASSES), version=np.array(1))


@pytest.mark.parametrize("corrupt", [_corrupt_garbage, _corrupt_truncate, _corrupt_flip, _corrupt_wrong_arrays])
def test_corrupted_cache_is_decoded_again(jpeg, data_root, tmp_path, fake_decoder, corrupt):
    src = next(jpeg["cache"].iterdir())
    shutil.copy(src, tmp_path / src.name)
    corrupt(tmp_path / src.name)
    with pytest.warns(UserWarning, match="unreadable"):
        ds = D.load_dataset("cifar10-jpeg", "train", root=data_root, cache_dir=tmp_path)
    assert len(fake_decoder) == 1
    assert torch.equal(ds.images, jpeg["train"].images) and torch.equal(ds.targets, jpeg["train"].targets)
    # the cache was rewritten and is good now: no second decode, no temp files left behind
    ds2 = D.load_dataset("cifar10-jpeg", "test", root=data_root, cache_dir=tmp_path)
    assert len(fake_decoder) == 1 and torch.equal(ds2.images, jpeg["test"].images)
    assert [p.name for p in tmp_path.iterdir()] == [src.name]


def test_atomic_write_cleans_up_on_failure(tmp_path, monkeypatch):
    def failing_savez(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(D.np, "savez", failing_savez)
    with pytest.raises(OSError):
        D._write_npz_atomic(tmp_path / "c.npz", {"a": np.zeros(3)})
    assert list(tmp_path.iterdir()) == []


def test_unwritable_cache_warns_but_loads(jpeg, data_root, tmp_path, fake_decoder, monkeypatch):
    def failing_write(path, arrays):
        raise OSError("read-only file system")
    monkeypatch.setattr(D, "_write_npz_atomic", failing_write)
    with pytest.warns(UserWarning, match="could not write"):
        ds = D.load_dataset("cifar10-jpeg", "test", root=data_root, cache_dir=tmp_path / "ro")
    assert len(fake_decoder) == 1 and torch.equal(ds.targets, jpeg["test"].targets)


# ---------------------------------------------------------------- torchvision layouts (tiny files)

def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _tiny_cifar10(root, rng, n=20, str_keys=False, meta=True):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    k = (lambda s: s) if str_keys else (lambda s: s.encode())
    content = {}
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        content[f] = (x, y)
        _write_pickle(folder / f, {k("batch_label"): k(f), k("labels"): y, k("data"): x, k("filenames"): [k("a.png")] * n})
    if meta:
        names = [f"c{i}" for i in range(10)]
        _write_pickle(folder / "batches.meta", {k("label_names"): [k(s) for s in names], k("num_vis"): 3072})
    return content


@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar10_torchvision_layout(tmp_path, str_keys):
    rng = np.random.default_rng(1)
    content = _tiny_cifar10(tmp_path, rng, str_keys=str_keys)
    train = D.load_dataset("cifar10", "train", root=tmp_path)
    test = D.load_dataset("cifar10", "test", root=tmp_path)
    xs = np.concatenate([content[f"data_batch_{i}"][0] for i in range(1, 6)])
    ys = sum((content[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert len(train) == 100 and len(test) == 20
    assert train.images.dtype == torch.uint8 and train.images.shape == (100, 3, 32, 32)
    assert np.array_equal(train.images.numpy().reshape(100, 3072), xs)
    assert train.targets.tolist() == ys
    # CHW row-major: the first 1024 bytes are the red plane
    x0 = content["test_batch"][0][0]
    assert np.array_equal(test.images[0, 0].numpy(), x0[:1024].reshape(32, 32))
    assert np.array_equal(test.images[0, 2].numpy(), x0[2048:].reshape(32, 32))
    assert test.targets.tolist() == content["test_batch"][1]
    assert train.classes == [f"c{i}" for i in range(10)] and train.name == "cifar10"
    assert (train.mean, train.std) == D.NORMALIZATION["cifar10"]


def test_cifar10_without_meta_uses_default_names(tmp_path):
    _tiny_cifar10(tmp_path, np.random.default_rng(2), meta=False)
    assert D.load_dataset("cifar10", "test", root=tmp_path).classes == list(D.CIFAR10_CLASSES)


def test_cifar10_malformed_batch(tmp_path):
    _tiny_cifar10(tmp_path, np.random.default_rng(3))
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    _write_pickle(bad, {b"data": np.zeros((4, 1000), np.uint8), b"labels": [0, 1, 2, 3]})
    with pytest.raises(D.DatasetFormatError) as e:
        D.load_dataset("cifar10", "test", root=tmp_path)
    assert str(bad) in str(e.value)
    bad.write_bytes(b"not a pickle")
    with pytest.raises(D.DatasetFormatError):
        D.load_dataset("cifar10", "test", root=tmp_path)


def test_cifar10_partial_files_missing(tmp_path):
    _tiny_cifar10(tmp_path, np.random.default_rng(4))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(D.DatasetNotFoundError, match="data_batch_3"):
        D.load_dataset("cifar10", "train", root=tmp_path)
    assert len(D.load_dataset("cifar10", "test", root=tmp_path)) == 20


def test_cifar100_torchvision_layout(tmp_path):
    rng = np.random.default_rng(5)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    content = {}
    for split in ("train", "test"):
        x = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, 20).tolist()
        content[split] = (x, fine)
        _write_pickle(folder / split, {b"filenames": [b"x.png"] * 20, b"fine_labels": fine,
                                       b"coarse_labels": [0] * 20, b"data": x})
    _write_pickle(folder / "meta", {b"fine_label_names": [s.encode() for s in D.CIFAR100_CLASSES],
                                    b"coarse_label_names": [b"c"] * 20})
    for split in ("train", "test"):
        ds = D.load_dataset("cifar100", split, root=tmp_path)
        assert np.array_equal(ds.images.numpy().reshape(20, 3072), content[split][0])
        assert ds.targets.tolist() == content[split][1]
        assert ds.num_classes == 100 and ds.classes == list(D.CIFAR100_CLASSES)
        assert (ds.mean, ds.std) == D.NORMALIZATION["cifar100"] and ds.name == "cifar100"


def test_svhn_torchvision_layout(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(6)
    for split in ("train", "test"):
        X = rng.integers(0, 256, (32, 32, 3, 20), dtype=np.uint8)
        y = np.arange(1, 21).reshape(20, 1) % 10 + 1  # labels 1..10, 10 = digit 0
        scipy_io.savemat(tmp_path / f"{split}_32x32.mat", {"X": X, "y": y.astype(np.uint8)})
        ds = D.load_dataset("svhn", split, root=tmp_path)
        assert len(ds) == 20 and ds.images.shape == (20, 3, 32, 32) and ds.images.dtype == torch.uint8
        expect = y.reshape(-1).astype(np.int64)
        expect[expect == 10] = 0
        assert ds.targets.tolist() == expect.tolist() and 0 in ds.targets.tolist() and 10 not in ds.targets.tolist()
        for n in (0, 7, 19):  # X[h, w, c, n] -> images[n, c, h, w]
            assert np.array_equal(ds.images[n].permute(1, 2, 0).numpy(), X[..., n])
        assert ds.classes == [str(d) for d in range(10)] and (ds.mean, ds.std) == D.NORMALIZATION["svhn"]


def test_svhn_malformed(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.ones((5, 1))})
    with pytest.raises(D.DatasetFormatError, match="test_32x32.mat"):
        D.load_dataset("svhn", "test", root=tmp_path)


def test_no_download_without_flag(tmp_path, monkeypatch):
    tv = pytest.importorskip("torchvision.datasets")

    def forbidden(*a, **k):
        raise AssertionError("torchvision was asked to download")
    for cls in ("CIFAR10", "CIFAR100", "SVHN"):
        monkeypatch.setattr(tv, cls, forbidden)
    for name in ("cifar10", "cifar100", "svhn"):
        with pytest.raises(D.DatasetNotFoundError):
            D.load_dataset(name, "test", root=tmp_path)
    _tiny_cifar10(tmp_path, np.random.default_rng(7))  # present files: read, even with download=True
    assert len(D.load_dataset("cifar10", "test", root=tmp_path, download=True)) == 20


def test_download_flag_uses_torchvision_then_own_reader(tmp_path, monkeypatch):
    tv = pytest.importorskip("torchvision.datasets")
    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train=True, download=False, **kw):
            calls.append((root, train, download))
            _tiny_cifar10(Path(root), np.random.default_rng(8))
    monkeypatch.setattr(tv, "CIFAR10", FakeCIFAR10)
    ds = D.load_dataset("cifar10", "test", root=tmp_path / "dl", download=True)
    assert calls == [(str(tmp_path / "dl"), False, True)]
    assert len(ds) == 20 and ds.name == "cifar10"


# ---------------------------------------------------------------- ImageDataset.subset

def test_subset_keeps_metadata_and_records_indices(exact):
    test = exact[1]
    sub = test.subset([5, 2, 9])
    assert len(sub) == 3 and sub.indices.tolist() == [5, 2, 9]
    assert torch.equal(sub.images, test.images[[5, 2, 9]]) and torch.equal(sub.targets, test.targets[[5, 2, 9]])
    for attr in ("name", "split", "classes", "num_classes", "mean", "std"):
        assert getattr(sub, attr) == getattr(test, attr)
    subsub = sub.subset(torch.tensor([2, 0]))
    assert subsub.indices.tolist() == [9, 5]  # positions in the original split
    assert torch.equal(subsub.images[0], test.images[9])
    mask = torch.zeros(len(test), dtype=torch.bool)
    mask[[1, 3]] = True
    assert test.subset(mask).indices.tolist() == [1, 3]
    assert test.subset(np.array([-1])).indices.tolist() == [999]
    assert len(test.subset([])) == 0
    with pytest.raises(IndexError):
        test.subset([1000])


def test_imagedataset_validates():
    with pytest.raises(ValueError):
        D.ImageDataset(torch.zeros(2, 3, 32, 32), torch.zeros(2), name="cifar10", split="train", classes="ab")
    with pytest.raises(ValueError):
        D.ImageDataset(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(3), name="cifar10", split="train",
                       classes="ab")
    with pytest.raises(ValueError, match="mean="):
        D.ImageDataset(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2), name="mnist", split="train",
                       classes="ab")
    ds = D.ImageDataset(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [0, 1], name="mine", split="train", classes="ab",
                        mean=(0.1, 0.2, 0.3), std=[1, 1, 1])
    assert ds.mean == (0.1, 0.2, 0.3) and ds.std == (1.0, 1.0, 1.0) and ds.num_classes == 2 and ds[1][1] == 1


# ---------------------------------------------------------------- stratified subsets

def test_stratified_indices_balanced_and_deterministic():
    y = torch.arange(1000) % 10
    for n in (0, 7, 10, 25, 100, 999, 1000):
        idx = D.stratified_indices(y, n, seed=3)
        assert idx.dtype == torch.int64 and len(idx) == n and len(set(idx.tolist())) == n
        assert torch.equal(idx, idx.sort().values)  # sorted ascending
        counts = y[idx].bincount(minlength=10)
        assert counts.max() - counts.min() <= 1
        assert torch.equal(idx, D.stratified_indices(y, n, seed=3))
    assert not torch.equal(D.stratified_indices(y, 100, 0), D.stratified_indices(y, 100, 1))
    assert D.stratified_indices(y.numpy(), 30, 0).tolist() == D.stratified_indices(y.tolist(), 30, 0).tolist()


def test_stratified_indices_does_not_touch_global_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    D.stratified_indices(torch.arange(100) % 4, 20, seed=0)
    assert torch.equal(state, torch.get_rng_state())


def test_stratified_indices_unbalanced_classes():
    y = torch.tensor([0] * 3 + [1] * 50 + [2] * 50)
    idx = D.stratified_indices(y, 30, seed=0)
    assert y[idx].bincount().tolist() == [3, 14, 13] or y[idx].bincount().tolist() == [3, 13, 14]
    assert len(D.stratified_indices(y, 103)) == 103
    with pytest.raises(ValueError):
        D.stratified_indices(y, 104)
    with pytest.raises(ValueError):
        D.stratified_indices(y, -1)


def test_stratified_on_jpeg_test(jpeg):
    idx = D.stratified_indices(jpeg["test"].targets, 1000, seed=0)
    assert jpeg["test"].targets[idx].bincount().tolist() == [100] * 10


def test_train_val_split(exact):
    train = exact[0]
    tr, va = D.train_val_split(train, 500, seed=0)
    assert len(tr) == 3500 and len(va) == 500
    assert va.targets.bincount(minlength=10).tolist() == [50] * 10
    ti, vi = set(tr.indices.tolist()), set(va.indices.tolist())
    assert not ti & vi and ti | vi == set(range(4000))
    assert torch.equal(va.images, train.images[va.indices]) and torch.equal(tr.targets, train.targets[tr.indices])
    tr2, va2 = D.train_val_split(train, 500, seed=0)
    assert torch.equal(va.indices, va2.indices) and torch.equal(tr.indices, tr2.indices)
    assert not torch.equal(va.indices, D.train_val_split(train, 500, seed=1)[1].indices)
    assert va.name == train.name and va.classes == train.classes and va.mean == train.mean
    with pytest.raises(ValueError, match="train"):
        D.train_val_split(exact[1], 100)


# ---------------------------------------------------------------- augmentation

@pytest.fixture(scope="module")
def batch(exact):
    return exact[0].images[:64].float() / 255


def test_augment_shape_range_determinism(batch):
    orig = batch.clone()
    a = D.augment(batch, torch.Generator().manual_seed(0), cutout=8, fill=(0.49, 0.48, 0.45))
    b = D.augment(batch, torch.Generator().manual_seed(0), cutout=8, fill=(0.49, 0.48, 0.45))
    c = D.augment(batch, torch.Generator().manual_seed(1), cutout=8, fill=(0.49, 0.48, 0.45))
    assert a.shape == batch.shape and a.dtype == batch.dtype
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(batch, orig)  # input untouched
    d = D.augment(batch, torch.Generator().manual_seed(0), crop_padding=0, flip=False)
    assert torch.equal(d, batch) and d is not batch


def _crop_offsets(out_img, padded_img, p, size=32):
    return [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
            if torch.equal(out_img, padded_img[:, dy:dy + size, dx:dx + size])]


def test_augment_crop_is_a_crop_of_zero_padded_image(batch):
    p = 4
    out = D.augment(batch, torch.Generator().manual_seed(0), crop_padding=p, flip=False)
    padded = torch.nn.functional.pad(batch, (p, p, p, p))
    offsets = []
    for i in range(16):
        found = _crop_offsets(out[i], padded[i], p)
        assert found, f"image {i} is not a crop of the zero-padded image"
        offsets.append(found[0])
    assert any(o != (p, p) for o in offsets)  # content really shifts
    assert (out != batch).any(dim=(1, 2, 3)).sum() > 32
    # offsets cover the full range 0..2p (uniform like RandomCrop(32, padding=4))
    big = batch[:1].expand(4000, -1, -1, -1)
    outs = D.augment(big, torch.Generator().manual_seed(1), crop_padding=p, flip=False)
    # the position of a marker pixel reveals the offset
    marker = torch.zeros(1, 3, 32, 32)
    marker[0, :, 16, 16] = 1
    m = D.augment(marker.expand(4000, -1, -1, -1).contiguous(), torch.Generator().manual_seed(1), crop_padding=p,
                  flip=False)
    rows = m[:, 0].amax(2).argmax(1)
    assert set((16 - rows + p).tolist()) == set(range(2 * p + 1))
    assert outs.shape == big.shape


def test_augment_flip(batch):
    out = D.augment(batch, torch.Generator().manual_seed(0), crop_padding=0, flip=True)
    same = [torch.equal(out[i], batch[i]) for i in range(64)]
    flipped = [torch.equal(out[i], batch[i].flip(-1)) for i in range(64)]
    assert all(s or f for s, f in zip(same, flipped))
    assert 10 < sum(flipped) < 54


def test_augment_cutout_fills_square(batch):
    fill = (0.25, 0.5, 0.75)
    x = batch.clamp(0.01, 0.99) * 0.999 + 0.0001  # no pixel equals a fill value by chance
    out = D.augment(x, torch.Generator().manual_seed(0), crop_padding=0, flip=False, cutout=8, fill=fill)
    value = torch.tensor(fill)[None, :, None, None]
    hole = (out == value).all(1)  # [B,H,W]
    assert torch.equal(out[~hole[:, None].expand_as(out)], x[~hole[:, None].expand_as(x)])  # rest unchanged
    sizes = hole.sum((1, 2))
    assert (sizes >= 16).all() and (sizes <= 64).all() and (sizes == 64).any()
    for i in range(64):  # each hole is one axis-aligned rectangle, at most 8x8
        r, c = hole[i].any(1).nonzero().reshape(-1), hole[i].any(0).nonzero().reshape(-1)
        assert r.max() - r.min() + 1 == len(r) <= 8 and c.max() - c.min() + 1 == len(c) <= 8
        assert sizes[i] == len(r) * len(c)
    # default fill 0 and scalar fill
    z = D.augment(x, torch.Generator().manual_seed(0), crop_padding=0, flip=False, cutout=8)
    assert torch.equal(z == 0, hole[:, None].expand_as(z))
    s = D.augment(x, torch.Generator().manual_seed(0), crop_padding=0, flip=False, cutout=8, fill=0.5)
    assert torch.equal(s == 0.5, hole[:, None].expand_as(s))


def test_augment_rejects_bad_input(batch):
    with pytest.raises(ValueError):
        D.augment((batch * 255).to(torch.uint8), torch.Generator())
    with pytest.raises(ValueError):
        D.augment(batch[0], torch.Generator())


def test_augment_is_fast(batch):
    # Measured with one intra-op thread: on an oversubscribed 2-core runner, OpenMP barriers of torch's 2-thread
    # pool add tens of ms to *any* op of this size, which says nothing about augment's own cost.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        D.augment(batch, g, cutout=8)  # warm-up
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            D.augment(batch, g, cutout=8, fill=(0.5, 0.5, 0.5))
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    assert min(times) < 5e-3, f"augment of 64 images took {min(times) * 1e3:.2f} ms"


def test_augment_does_not_touch_global_rng(batch):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    D.augment(batch, torch.Generator().manual_seed(0), cutout=8)
    assert torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------- batches

def test_iterate_batches_shuffled_epoch_covers_every_index_once(exact):
    test = exact[1]
    ds = D.ImageDataset(test.images, torch.arange(1000), name="cifar10-exact", split="test", classes=[str(i) for i in range(1000)])
    ys = [y for _, y in D.iterate_batches(ds, 96, shuffle=True, generator=torch.Generator().manual_seed(0))]
    seen = torch.cat(ys)
    assert sorted(seen.tolist()) == list(range(1000))
    assert [len(y) for y in ys] == [96] * 10 + [40]
    assert seen.tolist() != list(range(1000))
    again = torch.cat([y for _, y in D.iterate_batches(ds, 96, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert torch.equal(seen, again)
    other = torch.cat([y for _, y in D.iterate_batches(ds, 96, shuffle=True, generator=torch.Generator().manual_seed(1))])
    assert not torch.equal(seen, other)
    # one generator, two epochs: different orders
    g = torch.Generator().manual_seed(0)
    e1 = torch.cat([y for _, y in D.iterate_batches(ds, 96, shuffle=True, generator=g)])
    e2 = torch.cat([y for _, y in D.iterate_batches(ds, 96, shuffle=True, generator=g)])
    assert not torch.equal(e1, e2) and sorted(e2.tolist()) == list(range(1000))


def test_iterate_batches_values_and_order(exact):
    test = exact[1]
    xs, ys = zip(*D.iterate_batches(test, 300))
    assert [len(y) for y in ys] == [300, 300, 300, 100]
    x = torch.cat(xs)
    assert x.dtype == torch.float32 and x.shape == (1000, 3, 32, 32)
    assert torch.equal(x, test.images.float() / 255) and torch.equal(torch.cat(ys), test.targets)
    assert ys[0].dtype == torch.int64
    assert [len(y) for _, y in D.iterate_batches(test, 300, drop_last=True)] == [300, 300, 300]
    # batches matched to their labels when shuffled
    for xb, yb in D.iterate_batches(test.subset(range(50)), 16, shuffle=True, generator=torch.Generator().manual_seed(0)):
        for xi, yi in zip(xb, yb):
            j = [k for k in range(50) if torch.equal(test.images[k].float() / 255, xi)]
            assert j and int(test.targets[j[0]]) == int(yi)
    before = test.images.clone()
    list(D.iterate_batches(test, 100))
    assert torch.equal(before, test.images)  # dataset not modified in place


def test_iterate_batches_errors(exact):
    with pytest.raises(ValueError, match="Generator"):
        D.iterate_batches(exact[1], 10, shuffle=True)
    with pytest.raises(ValueError):
        D.iterate_batches(exact[1], 0)
