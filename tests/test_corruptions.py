"""Tests for rsnn_paper.corruptions: the 15 CIFAR-10-C families, `corrupt`, the CIFAR-10-C folder reader and
`corrupted_dataset`.

Real CIFAR-10 test images from the offline exact subset when present (synthetic smooth images otherwise). The
families the module calls exact are checked against a transcription of make_cifar_c.py with scipy (a dev
dependency) and Pillow, fed the same random numbers. About 10 s on 2 cores."""
import colorsys
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    from rsnn_paper import corruptions as C
except ImportError:  # not installed: use the checkout this file lives in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rsnn_paper import corruptions as C
from rsnn_paper import data as D

RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost", "fog",
          "elastic_transform"}  # the others draw no random numbers


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # on an oversubscribed 2-core runner, torch's 2-thread pool adds tens of ms to every small op
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _synthetic(n: int) -> torch.Tensor:
    "Natural-looking stand-ins: smooth colour gradients with a few flat shapes and edges, float32 in [0,1]."
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    out = []
    for _ in range(n):
        a = torch.rand(3, 3, generator=g)
        img = a[:, 0, None, None] * 0.6 + a[:, 1, None, None] * 0.3 * yy + a[:, 2, None, None] * 0.3 * xx
        cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([20, 20, 8]) + torch.tensor([6, 6, 4])).tolist()
        disk = ((yy * 31 - cy) ** 2 + (xx * 31 - cx) ** 2) < r * r
        out.append(torch.where(disk, torch.rand(3, 1, 1, generator=g), img).clamp(0, 1))
    return torch.stack(out)


@pytest.fixture(scope="module")
def test_set():
    try:
        return D.load_dataset("cifar10-exact", "test")
    except D.DatasetNotFoundError:
        return None


@pytest.fixture(scope="module")
def images(test_set):
    "Eight float32 images [8,3,32,32] in [0,1]: real CIFAR-10 test images when available."
    return _synthetic(8) if test_set is None else test_set.images[:8].float() / 255


def test_names_groups_params():
    assert C.CORRUPTIONS == ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                             "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                             "elastic_transform", "pixelate", "jpeg_compression")
    assert sum(C.CORRUPTION_GROUPS.values(), ()) == C.CORRUPTIONS
    assert list(C.CORRUPTION_GROUPS) == ["noise", "blur", "weather", "digital"]
    assert set(C.SEVERITY_PARAMS) == set(C.CORRUPTIONS) and all(len(v) == 5 for v in C.SEVERITY_PARAMS.values())
    assert list(C.APPROXIMATIONS) == list(C.CORRUPTIONS)
    assert all(isinstance(v, str) and v.endswith(".") for v in C.APPROXIMATIONS.values())
    for name in ("frost", "motion_blur", "snow"):  # the families that replace external tools say so
        assert not C.APPROXIMATIONS[name].startswith("Exact")
    # a few published values (make_cifar_c.py)
    assert C.SEVERITY_PARAMS["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert C.SEVERITY_PARAMS["jpeg_compression"] == (80, 65, 58, 50, 40)
    assert C.SEVERITY_PARAMS["snow"][4] == (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)
    assert C.SEVERITY_PARAMS["elastic_transform"][1] == pytest.approx((1.6, 6.4, 2.24))


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_range_shape_dtype(name, images):
    g = torch.Generator().manual_seed(3)
    for s in (1, 5):
        y = C.corrupt(images[:4], name, s, g)
        assert y.shape == (4, 3, 32, 32) and y.dtype == torch.float32 and y.device == images.device
        assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    single = C.corrupt(images[0].double(), name, 3, g)
    assert single.shape == (3, 32, 32) and single.dtype == torch.float64
    assert torch.isfinite(single).all() and single.min() >= 0 and single.max() <= 1
    assert C.corrupt(images[:0], name, 2).shape == (0, 3, 32, 32)


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_severity_order(name, images):
    "Mean absolute difference to the clean images: severity 1 closer than severity 5."
    mad = [float((C.corrupt(images, name, s, torch.Generator().manual_seed(s)) - images).abs().mean())
           for s in (1, 5)]
    assert min(mad) > 1e-3, mad  # both severities change the images
    if name == "elastic_transform":
        # published parameters: severity 1 is a pure affine map with the largest jitter (±2.56 px), severity 5 a
        # small affine plus a local displacement field, which moves pixels less on average
        assert mad[0] > mad[1], mad
    else:
        assert mad[0] < mad[1], mad


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_determinism(name, images):
    x = images[:3]
    before = torch.random.get_rng_state()
    a = C.corrupt(x, name, 4, torch.Generator().manual_seed(11))
    b = C.corrupt(x, name, 4, torch.Generator().manual_seed(11))
    c = C.corrupt(x, name, 4, torch.Generator().manual_seed(12))
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is never used
    assert torch.equal(a, b)
    assert torch.equal(C.corrupt(x, name, 4), C.corrupt(x, name, 4, torch.Generator().manual_seed(0)))
    if name in RANDOM:
        assert not torch.equal(a, c)
    else:
        assert torch.equal(a, c)


def test_errors(images):
    for bad in ("rain", "Gaussian_noise", "speckle_noise", ""):
        with pytest.raises(ValueError, match="known corruptions: gaussian_noise, shot_noise"):
            C.corrupt(images, bad, 1)
    for sev in (0, 6, -1, 2.5, "3", True, None):
        with pytest.raises(ValueError, match="severity") as e:
            C.corrupt(images, "fog", sev)
        assert "jpeg_compression" in str(e.value)  # the known names are listed too
    assert C.corrupt(images, "fog", np.int64(2)).shape == images.shape
    for bad_x in (images.to(torch.uint8), images[:, :1], images[0, 0], images.numpy()):
        with pytest.raises(ValueError, match="float images"):
            C.corrupt(bad_x, "fog", 1)
    for fn in (lambda: C.load_cifar10c(None, "rain", 1), lambda: C.corrupted_dataset(_fake_test(2), "rain", 1),
               lambda: C.corrupted_dataset(_fake_test(2), "fog", 0)):
        with pytest.raises(ValueError, match="gaussian_noise"):
            fn()


def test_half_precision(images):
    y = C.corrupt(images[:2].half(), "gaussian_noise", 3)
    assert y.dtype == torch.float16 and y.min() >= 0 and y.max() <= 1


# ---------------------------------------------------------------- against the original (scipy / Pillow)

def _scipy():
    return pytest.importorskip("scipy.ndimage")


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.double().permute(0, 2, 3, 1).numpy()


def _ref_clipped_zoom(img, z, ndi):
    h = img.shape[0]
    ch = int(np.ceil(h / z))
    top = (h - ch) // 2
    img = ndi.zoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
    t = (img.shape[0] - h) // 2
    return img[t:t + h, t:t + h]


def test_zoom_and_defocus_match_original(images):
    ndi = _scipy()
    x = images[:3].double()
    for s in range(1, 6):
        factors = np.arange(*C.SEVERITY_PARAMS["zoom_blur"][s - 1])
        ref = np.stack([(h + sum(_ref_clipped_zoom(h, z, ndi) for z in factors)) / (len(factors) + 1)
                        for h in _hwc(x)])
        assert np.abs(_hwc(C.corrupt(x, "zoom_blur", s)) - np.clip(ref, 0, 1)).max() < 1e-9, s
        radius, alias = C.SEVERITY_PARAMS["defocus_blur"][s - 1]
        L = np.arange(-8, 9)
        X, Y = np.meshgrid(L, L)
        disk = ((X ** 2 + Y ** 2) <= radius ** 2).astype(np.float64)
        disk /= disk.sum()
        k = np.exp(-np.arange(-1, 2.0) ** 2 / (2 * alias ** 2))
        kernel = ndi.correlate(disk, np.outer(k, k) / k.sum() ** 2, mode="mirror")  # cv2.GaussianBlur, 3×3
        ref = np.stack([np.stack([ndi.correlate(h[..., d], kernel, mode="mirror") for d in range(3)], -1)
                        for h in _hwc(x)])
        assert np.abs(_hwc(C.corrupt(x, "defocus_blur", s)) - np.clip(ref, 0, 1)).max() < 1e-9, s


def test_glass_blur_matches_original_loop(images):
    "The published loop with numpy views (a copy, not a swap), fed the same offsets."
    ndi = _scipy()
    x = images[:2].double()
    for s in (2, 5):
        sigma, delta, its = C.SEVERITY_PARAMS["glass_blur"][s - 1]
        blur = lambda a: np.stack([ndi.gaussian_filter(a[..., d], sigma, mode="nearest", truncate=4.0)
                                   for d in range(3)], -1)
        g = torch.Generator().manual_seed(5)
        ours = _hwc(C.corrupt(x, "glass_blur", s, torch.Generator().manual_seed(5)))
        offsets = [torch.randint(-delta, delta, (2, 30, 30, 2), generator=g).numpy() for _ in range(its)]
        for b, h in enumerate(_hwc(x)):
            a = np.uint8(blur(h) * 255)
            for it in range(its):
                for i, hh in enumerate(range(32 - delta, delta, -1)):
                    for j, ww in enumerate(range(32 - delta, delta, -1)):
                        dx, dy = offsets[it][b, i, j]
                        a[hh, ww], a[hh + dy, ww + dx] = a[hh + dy, ww + dx], a[hh, ww]
            ref = np.clip(blur(a / 255.0), 0, 1)
            diff = np.abs(ours[b] - ref)
            # float64 summation order can flip np.uint8's truncation of a value at an exact integer (rare)
            assert diff.mean() < 1e-4 and diff.max() < 5 / 255, (s, diff.mean(), diff.max())


def test_fog_and_elastic_match_original(images):
    ndi = _scipy()
    x = images[:2].double()
    for s in (1, 3, 5):
        # fog: the original's plasma_fractal with uniform numbers drawn in the same order
        strength, decay = C.SEVERITY_PARAMS["fog"][s - 1]
        ours = _hwc(C.corrupt(x[:1], "fog", s, torch.Generator().manual_seed(s)))[0]
        g = torch.Generator().manual_seed(s)
        m = np.zeros((32, 32))
        step, wibble = 32, 100.0
        u = lambda shape: -wibble + 2 * wibble * torch.rand(shape, generator=g, dtype=torch.float64).numpy()
        while step >= 2:
            h = step // 2
            c = m[0::step, 0::step]
            acc = c + np.roll(c, -1, 0)
            acc += np.roll(acc, -1, 1)
            m[h::step, h::step] = acc / 4 + wibble * u(acc.shape)
            dr, ul = m[h::step, h::step], m[0::step, 0::step]
            t = dr + np.roll(dr, 1, 0) + ul + np.roll(ul, -1, 1)
            m[0::step, h::step] = t / 4 + wibble * u(t.shape)
            t = dr + np.roll(dr, 1, 1) + ul + np.roll(ul, -1, 0)
            m[h::step, 0::step] = t / 4 + wibble * u(t.shape)
            step //= 2
            wibble /= decay
        m -= m.min()
        m /= m.max()
        h = _hwc(x[:1])[0]
        ref = np.clip((h + strength * m[..., None]) * h.max() / (h.max() + strength), 0, 1)
        assert np.abs(ours - ref).max() < 1e-9, s
        # elastic: cv2 affine (as scipy 'mirror' affine_transform) + smoothed displacement, same uniforms
        alpha, sig, jit = C.SEVERITY_PARAMS["elastic_transform"][s - 1]
        ours = _hwc(C.corrupt(x, "elastic_transform", s, torch.Generator().manual_seed(s)))
        g = torch.Generator().manual_seed(s)
        up = torch.rand((2, 3, 2), generator=g, dtype=torch.float64).numpy()
        ux = torch.rand((2, 32, 32), generator=g, dtype=torch.float64).numpy()
        uy = torch.rand((2, 32, 32), generator=g, dtype=torch.float64).numpy()
        for b, img in enumerate(_hwc(x)):
            p1 = np.float32([[26, 26], [26, 6], [6, 6]])
            p2 = p1 + (-jit + 2 * jit * up[b]).astype(np.float32)
            M = np.linalg.solve(np.c_[p1.astype(np.float64), np.ones(3)], p2.astype(np.float64)).T
            inv = np.linalg.inv(np.vstack([M, [0, 0, 1]]))
            P = np.array([[0, 1], [1, 0]])  # (x, y) <-> (row, col)
            warped = np.stack([ndi.affine_transform(img[..., d], P @ inv[:2, :2] @ P, P @ inv[:2, 2], order=1,
                                                    mode="mirror") for d in range(3)], -1)
            dx = ndi.gaussian_filter(-1 + 2 * ux[b], sig, mode="reflect", truncate=3) * alpha
            dy = ndi.gaussian_filter(-1 + 2 * uy[b], sig, mode="reflect", truncate=3) * alpha
            xs, ys, zs = np.meshgrid(np.arange(32), np.arange(32), np.arange(3))
            idx = (ys + dy[..., None]).reshape(-1, 1), (xs + dx[..., None]).reshape(-1, 1), zs.reshape(-1, 1)
            ref = np.clip(ndi.map_coordinates(warped, idx, order=1, mode="reflect").reshape(32, 32, 3), 0, 1)
            assert np.abs(ours[b] - ref).max() < 1e-5, (s, b)  # float32 points, as in the original


def test_pixelate_and_jpeg_match_pillow(images):
    from PIL import Image
    u8 = (images[:6] * 255).round().to(torch.uint8)
    x = u8.float() / 255
    for s in range(1, 6):
        side = int(32 * C.SEVERITY_PARAMS["pixelate"][s - 1])
        q = C.SEVERITY_PARAMS["jpeg_compression"][s - 1]
        pix, jpg = [], []
        for im in u8.permute(0, 2, 3, 1).numpy():
            p = Image.fromarray(im)
            pix.append(np.array(p.resize((side, side), Image.BOX).resize((32, 32), Image.BOX)))
            buf = io.BytesIO()
            p.save(buf, "JPEG", quality=q)
            jpg.append(np.array(Image.open(buf)))
        for name, ref in (("pixelate", pix), ("jpeg_compression", jpg)):
            ours = C._to_uint8(C.corrupt(x, name, s)).permute(0, 2, 3, 1).numpy()
            assert np.array_equal(ours, np.stack(ref)), (name, s)
        assert np.array_equal(C._to_uint8(C.corrupt(x.double(), "pixelate", s)).permute(0, 2, 3, 1).numpy(),
                              np.stack(pix))


def test_noise_brightness_contrast_formulas(images):
    x = images[:2].double()
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    assert torch.allclose(C.corrupt(x, "gaussian_noise", 3, torch.Generator().manual_seed(9)),
                          (x + 0.08 * noise).clamp(0, 1))
    assert torch.allclose(C.corrupt(x, "contrast", 5), (x - x.mean((2, 3), keepdim=True)) * 0.15
                          + x.mean((2, 3), keepdim=True))
    y = C.corrupt(x, "brightness", 4)[0].permute(1, 2, 0).reshape(-1, 3).numpy()
    for px, out in zip(x[0].permute(1, 2, 0).reshape(-1, 3).numpy()[::7], y[::7]):
        h, s, v = colorsys.rgb_to_hsv(*px)
        assert np.allclose(colorsys.hsv_to_rgb(h, s, min(v + 0.2, 1.0)), out)
    big = x[:1].expand(64, 3, 32, 32).float()
    imp = C.corrupt(big, "impulse_noise", 5, torch.Generator().manual_seed(1))
    changed = (imp != big)
    assert abs(changed.float().mean() - 0.07) < 0.01  # ~7% replaced (a few already were 0 or 1)
    assert set(imp[changed].unique().tolist()) <= {0.0, 1.0}
    shot = C.corrupt(big, "shot_noise", 1, torch.Generator().manual_seed(1))
    assert abs(float(shot.mean() - big.mean())) < 2e-3  # Poisson(c·x)/c is unbiased (clamping aside)
    assert torch.allclose(shot * 500, (shot * 500).round(), atol=1e-3)  # multiples of 1/c


def test_motion_blur_kernel():
    "ImageMagick's kernel: one-sided along the angle, Gaussian weights, edge pixels repeated."
    dot = torch.zeros(2, 1, 25, 25)
    dot[:, :, 12, 12] = 1
    out = C._motion_blur(dot, 6, 2, torch.tensor([0.0, 90.0]))  # 13 taps
    assert torch.allclose(out.sum((1, 2, 3)), torch.ones(2, dtype=out.dtype))
    w = torch.exp(-torch.arange(13.0) ** 2 / 8)
    w /= w.sum()
    assert torch.allclose(out[0, 0, 12, :13].flip(0), w) and (out[0, 0, 12, 13:] == 0).all()  # to the left
    assert torch.allclose(out[1, 0, :13, 12].flip(0), w) and (out[1, 0, 13:, 12] == 0).all()  # upwards
    assert (out[0].sum(2)[0, :12] == 0).all() and (out[1].sum(1)[0, :12] == 0).all()  # a line, nothing else


def test_frost_texture_statistics():
    tex = C._frost_texture(300, 32, 32, torch.Generator().manual_seed(0), torch.zeros(1))
    assert tex.shape == (300, 3, 32, 32) and tex.min() >= 0 and tex.max() <= 1
    means = torch.tensor([s[0] for s in C._FROST_STYLES])
    assert torch.allclose(tex.mean((0, 2, 3)), means.mean(0), atol=0.03)
    per_image = tex.mean((2, 3))  # each image has the colour of one of the photographs
    nearest = torch.cdist(per_image, means).min(1).values
    assert (nearest < 0.25).all()
    assert 0.03 < float(tex.std((2, 3)).mean()) < 0.2  # within-crop contrast of the photographs


# ---------------------------------------------------------------- CIFAR-10-C folder and corrupted_dataset

def _fake_test(n: int, labels=None) -> D.ImageDataset:
    "A stand-in for the first `n` CIFAR-10 test images (name cifar10, test split)."
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (n,), generator=g) if labels is None else torch.as_tensor(labels)
    return D.ImageDataset(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), y,
                          name="cifar10", split="test", classes=D.CIFAR10_CLASSES)


def _write_fake_cifar10c(folder: Path, labels: np.ndarray, names=("fog",), full_labels=True) -> np.ndarray:
    "The release's layout with N = len(labels) images per severity: pixel value 10·(s-1) + i of row i."
    folder.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    x = np.stack([np.full((32, 32, 3), 10 * s + i, np.uint8) for s in range(5) for i in range(n)])
    for name in names:
        np.save(folder / f"{name}.npy", x)
    np.save(folder / "labels.npy", (np.tile(labels, 5) if full_labels else labels).astype(np.uint8))
    return x


def test_find_cifar10c(tmp_path):
    assert C.find_cifar10c(tmp_path) is None
    default = D.resolve_data_root() / "CIFAR-10-C"
    assert (C.find_cifar10c() is None) == (not (default / "labels.npy").is_file())
    _write_fake_cifar10c(tmp_path / "CIFAR-10-C", np.arange(3))
    assert C.find_cifar10c(tmp_path) == tmp_path / "CIFAR-10-C"
    assert C.find_cifar10c(tmp_path / "CIFAR-10-C") == tmp_path / "CIFAR-10-C"


@pytest.mark.parametrize("full_labels", [True, False])
def test_load_cifar10c_layout(tmp_path, full_labels):
    labels = np.array([3, 8, 8, 0])
    _write_fake_cifar10c(tmp_path / "CIFAR-10-C", labels, names=("fog", "snow"), full_labels=full_labels)
    for s in range(1, 6):
        ds = C.load_cifar10c(tmp_path, "snow", s)
        assert isinstance(ds, D.ImageDataset) and ds.images.dtype == torch.uint8
        assert ds.images.shape == (4, 3, 32, 32) and ds.split == "test" and ds.num_classes == 10
        assert ds.images[:, :, 5, 7].tolist() == [[10 * (s - 1) + i] * 3 for i in range(4)]  # rows (s-1)N .. sN
        assert ds.targets.tolist() == labels.tolist()
        assert (ds.source, ds.corruption, ds.severity) == ("cifar10-c", "snow", s)
    assert C.load_cifar10c(tmp_path / "CIFAR-10-C", "fog", 2).images[0, 0, 0, 0] == 10


def test_load_cifar10c_errors(tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as e:
        C.load_cifar10c(tmp_path, "fog", 1)
    msg = str(e.value)
    assert str(tmp_path / "CIFAR-10-C" / "labels.npy") in msg and "not available offline" in msg
    assert "generated" in msg
    folder = tmp_path / "CIFAR-10-C"
    _write_fake_cifar10c(folder, np.arange(4))
    with pytest.raises(D.DatasetNotFoundError, match="snow.npy"):  # labels present, family missing
        C.load_cifar10c(tmp_path, "snow", 1)
    np.save(folder / "fog.npy", np.zeros((21, 32, 32, 3), np.uint8))  # not divisible by 5
    with pytest.raises(D.DatasetFormatError, match="5·N"):
        C.load_cifar10c(tmp_path, "fog", 1)
    np.save(folder / "fog.npy", np.zeros((20, 32, 32, 3), np.float32))  # wrong dtype
    with pytest.raises(D.DatasetFormatError):
        C.load_cifar10c(tmp_path, "fog", 1)
    np.save(folder / "fog.npy", np.zeros((20, 32, 32, 3), np.uint8))
    np.save(folder / "labels.npy", np.zeros(7, np.uint8))  # neither 20 nor 4 labels
    with pytest.raises(D.DatasetFormatError, match="labels"):
        C.load_cifar10c(tmp_path, "fog", 1)
    (folder / "fog.npy").write_bytes(b"not a npy file")
    np.save(folder / "labels.npy", np.zeros(20, np.uint8))
    with pytest.raises(D.DatasetFormatError, match="cannot read"):
        C.load_cifar10c(tmp_path, "fog", 1)


def test_corrupted_dataset_uses_folder_when_it_matches(tmp_path):
    labels = np.array([3, 8, 8, 0, 6])
    _write_fake_cifar10c(tmp_path / "CIFAR-10-C", labels)
    full = _fake_test(5, labels)  # "the full test set" of this folder
    ds = C.corrupted_dataset(full, "fog", 4, root=tmp_path)
    assert ds.source == "cifar10-c" and ds.seed is None and (ds.corruption, ds.severity) == ("fog", 4)
    assert ds.images[:, 0, 0, 0].tolist() == [30, 31, 32, 33, 34] and ds.targets.tolist() == labels.tolist()
    sub = full.subset([4, 1])  # a subset: its original positions are its indices
    ds = C.corrupted_dataset(sub, "fog", 2, root=tmp_path)
    assert ds.source == "cifar10-c" and ds.images[:, 0, 0, 0].tolist() == [14, 11]
    assert torch.equal(ds.indices, sub.indices) and torch.equal(ds.targets, sub.targets)
    # the other cases generate
    for other, why in [(_fake_test(6, [3, 8, 8, 0, 6, 1]), "more images than the folder holds"),
                       (D.ImageDataset(full.images, full.targets, name="cifar10-jpeg", split="test",
                                       classes=D.CIFAR10_CLASSES), "class-major JPEG set")]:
        assert C.corrupted_dataset(other, "fog", 2, root=tmp_path).source == "generated", why
    assert C.corrupted_dataset(full, "fog", 2, root=tmp_path, source="generated").source == "generated"
    with pytest.warns(UserWarning, match="snow.npy"):
        assert C.corrupted_dataset(full, "snow", 2, root=tmp_path).source == "generated"
    with pytest.raises(D.DatasetFormatError, match="disagree"):  # same positions, other labels: not this test set
        C.corrupted_dataset(_fake_test(5, [1, 1, 1, 1, 1]), "fog", 2, root=tmp_path)
    with pytest.raises(D.DatasetNotFoundError, match="not available offline"):
        C.corrupted_dataset(full, "fog", 2, root=tmp_path / "nowhere", source="cifar10-c")
    with pytest.raises(ValueError, match="source"):
        C.corrupted_dataset(full, "fog", 2, source="release")


def test_corrupted_dataset_generates_deterministically(tmp_path, test_set):
    base = _fake_test(12) if test_set is None else test_set.subset(torch.arange(40, 52))
    a = C.corrupted_dataset(base, "glass_blur", 3, root=tmp_path)
    assert a.source == "generated" and isinstance(a.seed, int)
    assert a.images.dtype == torch.uint8 and a.images.shape == base.images.shape
    assert torch.equal(a.targets, base.targets) and a.name.endswith("glass_blur-s3")
    assert (a.mean, a.std, a.classes, a.split) == (base.mean, base.std, base.classes, base.split)
    assert torch.equal(a.images, C.corrupted_dataset(base, "glass_blur", 3, root=tmp_path).images)
    assert not torch.equal(a.images, C.corrupted_dataset(base, "glass_blur", 3, generator_seed=1, root=tmp_path).images)
    assert not torch.equal(a.images, C.corrupted_dataset(base, "glass_blur", 4, root=tmp_path).images)
    # the images are `corrupt` with the recorded seed, stored as uint8 (truncated like np.uint8)
    expected = C.corrupt(base.images.float() / 255, "glass_blur", 3, torch.Generator().manual_seed(a.seed))
    assert torch.equal(a.images, (expected * 255 + 1e-4).floor().to(torch.uint8))
    assert not torch.equal(a.images, base.images)
