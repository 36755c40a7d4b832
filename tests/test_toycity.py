"""ToyCity: real dataset layouts and raw label formats, determinism, prompt following, class coverage, domain shift.

Raw label files are read back with PIL / cv2 and mapped with tables written here from the dataset specs (reference
§7.3), independently of toycity's own tables.
"""
import hashlib

import numpy as np
import pytest
from PIL import Image

from toyworld import city

# Raw id -> train id, written from the dataset documentation (reference §7.3).
CITYSCAPES = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
              27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SYNTHIA = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13, 18: 14, 19: 15,
           20: 16, 12: 17, 11: 18}
MAPILLARY = {13: 0, 24: 0, 41: 0, 2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6, 50: 7, 30: 8, 29: 9, 27: 10,
             19: 11, 20: 12, 21: 12, 22: 12, 55: 13, 61: 14, 54: 15, 58: 16, 57: 17, 52: 18}
MAPILLARY_SIZES = {(612, 816), (816, 612), (480, 640), (640, 480), (300, 400), (768, 1024), (1024, 768), (225, 400)}
VALID = set(range(19)) | {255}


def to_train(raw, table):
    out = np.full(raw.shape, 255, np.uint8)
    for r, t in table.items():
        out[raw == r] = t
    return out


def read(path):
    with Image.open(path) as im:
        return im.mode, im.format, np.array(im)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toycity")
    counts = city.build(root, seed=0, num_images=3, workers=1, progress=False)
    assert counts == {d: 6 if d == "cityscapes" else 3 for d in city.DOMAINS}
    return root


def files(root, pattern):
    found = sorted(root.glob(pattern))
    assert found, f"no files match {pattern}"
    return found


def check_scene(domain, split, index, image, label, exact_image=True):
    """The written files are exactly render_scene's output for the image's seed."""
    ref_image, ref_label = city.render_scene(domain, city._image_seed(0, domain, split, index))
    np.testing.assert_array_equal(label, ref_label)
    if exact_image:
        np.testing.assert_array_equal(image, ref_image)
    else:  # JPEG: compare 4x4 block means (the encoder drops the per-pixel sensor noise)
        h, w = (ref_image.shape[0] // 4) * 4, (ref_image.shape[1] // 4) * 4
        blocks = [a[:h, :w].astype(float).reshape(h // 4, 4, w // 4, 4, 3).mean((1, 3)) for a in (image, ref_image)]
        assert image.shape == ref_image.shape and np.abs(blocks[0] - blocks[1]).mean() < 3


def test_gta_layout(root):
    for i, lbl in enumerate(files(root, "gta5/labels/*.png")):
        assert lbl.name == f"{i + 1:05d}.png"
        mode, _, raw = read(lbl)
        assert mode == "P" and set(np.unique(raw)) <= set(range(34))  # Cityscapes label ids in a palette PNG
        mode, _, img = read(root / "gta5/images" / lbl.name)
        assert mode == "RGB" and img.shape in ((263, 478, 3), (262, 478, 3))
        check_scene("gta", "train", i, img, to_train(raw, CITYSCAPES))


def test_synthia_layout(root):
    cv2 = pytest.importorskip("cv2")
    for i, lbl in enumerate(files(root, "synthia/GT/LABELS/*.png")):
        assert lbl.name == f"{i + 1:07d}.png"
        raw = cv2.imread(str(lbl), cv2.IMREAD_UNCHANGED)
        assert raw.dtype == np.uint16 and raw.shape == (190, 320, 3)
        cls, inst = raw[..., -1], raw[..., 1]  # BGR: R (last) = class, G = instance
        assert set(np.unique(cls)) <= set(SYNTHIA) | {0, 22}
        assert inst.max() > 0 and not inst[np.isin(cls, [1, 2, 3, 4, 6])].any()  # instances only on things
        mode, _, img = read(root / "synthia/RGB" / lbl.name)
        assert mode == "RGB" and img.shape == (190, 320, 3)
        check_scene("synthia", "train", i, img, to_train(cls, SYNTHIA))


def test_cityscapes_layout(root):
    for split, cities in (("train", ("aachen", "bremen", "zurich")), ("val", ("frankfurt", "lindau", "munster"))):
        lbls = files(root, f"cityscapes/gtFine/{split}/*/*_gtFine_labelIds.png")
        assert {p.parent.name for p in lbls} == set(cities)
        for lbl in lbls:
            index = int(lbl.name.split("_")[2])
            mode, _, raw = read(lbl)
            assert mode == "L" and set(np.unique(raw)) <= set(range(34))
            img_path = root / f"cityscapes/leftImg8bit/{split}/{lbl.parent.name}" / lbl.name.replace(
                "_gtFine_labelIds", "_leftImg8bit")
            mode, _, img = read(img_path)
            assert mode == "RGB" and img.shape == (256, 512, 3)
            check_scene("cityscapes", split, index, img, to_train(raw, CITYSCAPES))


def test_bdd_layout(root):
    imgs = files(root, "bdd10k/images/10k/val/*.jpg")
    for img_path in imgs:
        stem = img_path.stem
        assert len(stem) == 17 and stem[8] == "-" and int(stem.replace("-", ""), 16) >= 0
        mode, fmt, img = read(img_path)
        assert fmt == "JPEG" and img.shape == (180, 320, 3)
        mode, _, lbl = read(root / "bdd10k/labels/sem_seg/masks/val" / f"{stem}.png")
        assert mode == "L" and set(np.unique(lbl)) <= VALID  # BDD ships train ids
    assert len(imgs) == 3


def test_mapillary_layout(root):
    seen = set()
    for lbl in files(root, "mapillary_vistas/validation/labels/*.png"):
        mode, _, raw = read(lbl)
        assert mode == "P" and raw.max() <= 65
        seen |= set(np.unique(raw).tolist())
        mode, fmt, img = read(root / "mapillary_vistas/validation/images" / f"{lbl.stem}.jpg")
        assert fmt == "JPEG" and img.shape[:2] in MAPILLARY_SIZES and img.shape[:2] == raw.shape
    assert {13, 15, 17, 27, 24, 2} <= seen  # road, sidewalk, building, sky, lane marking, curb
    assert set(to_train(np.array(sorted(seen)), MAPILLARY).tolist()) <= VALID
    sizes = {city.render_scene("mapillary", s)[0].shape[:2] for s in range(12)}
    assert len(sizes) >= 3 and sizes <= MAPILLARY_SIZES and any(h > w for h, w in sizes) and any(h < w for h, w in sizes)


def test_acdc_layout(root):
    for cond in ("fog", "night", "rain", "snow"):
        for lbl in files(root, f"acdc/gt/{cond}/val/GOPR*/*_gt_labelTrainIds.png"):
            assert lbl.parent.name == lbl.name.split("_")[0]
            mode, _, train = read(lbl)
            assert mode == "L" and set(np.unique(train)) <= VALID
            mode, _, raw = read(lbl.with_name(lbl.name.replace("labelTrainIds", "labelIds")))
            assert mode == "L"
            np.testing.assert_array_equal(to_train(raw, CITYSCAPES), train)  # the two files agree
            img_path = root / f"acdc/rgb_anon/{cond}/val/{lbl.parent.name}" / lbl.name.replace(
                "_gt_labelTrainIds", "_rgb_anon")
            mode, _, img = read(img_path)
            assert mode == "RGB" and img.shape == (270, 480, 3)
            check_scene(f"acdc_{cond}", "val", int(lbl.name.split("_")[2]), img, train)


def test_jpeg_domains_match_render_scene(root):
    """BDD and Mapillary: labels exact, images close (JPEG); the other domains compare exactly in their layout tests."""
    for domain in ("bdd", "mapillary"):
        for i in range(3):
            img_path, labels = city._paths(root, domain, "val", i, city._image_seed(0, domain, "val", i))
            raw = read(next(iter(labels.values())))[2]
            check_scene(domain, "val", i, read(img_path)[2], to_train(raw, MAPILLARY) if domain == "mapillary" else raw,
                        exact_image=False)


def digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_deterministic_parallel_and_resumable(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    city.build(a, seed=3, num_images=1, workers=1, progress=False)
    city.build(b, seed=3, num_images=1, workers=2, progress=False)  # worker order must not matter
    da, db = digest(a), digest(b)
    assert da == db and len(da) == 24 and not [p for p in da if ".tmp" in p]
    victim = a / next(p for p in da if p.startswith("gta5/images"))
    victim.unlink()
    stamp = (a / next(p for p in da if p.startswith("synthia/RGB"))).stat().st_mtime_ns
    assert city.build(a, seed=3, num_images=1, workers=1, progress=False)["gta"] == 1
    assert digest(a) == db  # the missing file is rewritten identically
    assert (a / next(p for p in da if p.startswith("synthia/RGB"))).stat().st_mtime_ns == stamp  # others skipped
    city.build(tmp_path / "c", seed=4, num_images=1, workers=1, progress=False)
    assert digest(tmp_path / "c") != da


def test_main_cli(tmp_path):
    counts = city.main(["--out", str(tmp_path), "--num-images", "1", "--workers", "1", "--no-progress"])
    assert counts == {d: 2 if d == "cityscapes" else 1 for d in city.DOMAINS}
    assert len(list(tmp_path.rglob("*.jpg"))) == 2


def test_render_reproducible():
    a = city.render("A photo of a busy road in daylight with sunny weather.", 7)
    assert a.dtype == np.uint8 and a.shape == (192, 192, 3)
    np.testing.assert_array_equal(a, city.render("A photo of a busy road in daylight with sunny weather.", 7))
    assert not np.array_equal(a, city.render("A photo of a busy road in daylight with sunny weather.", 8))
    assert city.render("a street", 0, size=(96, 160)).shape == (96, 160, 3)
    img, lbl = city.render_with_label("a street", 0, size=(96, 160))
    np.testing.assert_array_equal(img, city.render("a street", 0, size=(96, 160)))
    assert lbl.shape == (96, 160) and set(np.unique(lbl)) <= VALID


def mean_over_seeds(prompt, fn, seeds=range(4)):
    return np.mean([fn(*city.render_with_label(prompt, s)) for s in seeds])


def test_render_follows_weather_words():
    day = mean_over_seeds("a street in daylight", lambda im, lb: im.mean())
    night = mean_over_seeds("a street at night", lambda im, lb: im.mean())
    assert night < 0.5 * day, (night, day)

    def ground(im, lb):
        return im[np.isin(lb, [0, 1, 9])].mean()
    assert mean_over_seeds("a snowy street in winter", ground) > mean_over_seeds("a street in daylight", ground) + 40
    fog = mean_over_seeds("a foggy street", lambda im, lb: im.std())
    assert fog < mean_over_seeds("a street in daylight", lambda im, lb: im.std())


@pytest.mark.parametrize("prompt, classes", [
    ("a truck on the road", [14]), ("a bus at a bus stop", [15]), ("a taxi driving through a puddle in the rain", [13]),
    ("a tram in the city", [16]), ("a cyclist on a bike lane", [12, 18]), ("a motorcycle at a crossing", [17, 6]),
    ("a stop sign", [7]), ("trees in a park", [8])])
def test_render_contains_prompted_classes(prompt, classes):
    for seed in range(3):
        lbl = city.render_with_label(prompt, seed)[1]
        for c in classes:
            assert (lbl == c).sum() >= 4, (prompt, seed, c)


def test_render_crowd_has_many_people():
    def people(im, lb):
        return (lb == 11).mean()
    crowd = mean_over_seeds("a crowd of pedestrians crossing the street", people)
    assert crowd > 3 * mean_over_seeds("an empty road", people) and crowd > 0.01


@pytest.mark.parametrize("domain", ["gta", "synthia"])
def test_sources_have_all_classes(domain):
    seen = set()
    for seed in range(40):
        image, label = city.render_scene(domain, seed)
        assert image.shape[:2] == label.shape and set(np.unique(label)) <= VALID
        seen |= set(np.unique(label).tolist())
    assert set(range(19)) <= seen, sorted(set(range(19)) - seen)


def test_targets_have_common_classes_and_sizes():
    gta_rows = {city.render_scene("gta", s)[0].shape[0] for s in range(20)}
    assert gta_rows == {262, 263}
    common = {0, 1, 2, 5, 8, 10, 11, 13}  # road, sidewalk, building, pole, vegetation, sky, person, car
    for domain in city.DOMAINS[2:]:
        seen = set()
        for seed in range(8):
            seen |= set(np.unique(city.render_scene(domain, seed)[1]).tolist())
        assert common <= seen, (domain, sorted(common - seen))
    for domain, size in (("synthia", (190, 320)), ("cityscapes", (256, 512)), ("bdd", (180, 320)),
                         ("acdc_fog", (270, 480))):
        assert city.render_scene(domain, 0)[0].shape[:2] == size
    assert city.render_scene("gta", 0, size=(64, 96))[1].shape == (64, 96)


def test_domains_differ():
    """Global statistics differ per domain, and a colour -> class rule learnt on a source transfers badly."""
    stats = {}
    for d in city.DOMAINS:  # mean and std of each channel, averaged over a few images
        ims = [city.render_scene(d, 100 + s)[0].astype(float) for s in range(4)]
        stats[d] = np.mean([np.concatenate([im.mean((0, 1)), im.std((0, 1))]) for im in ims], 0)
    dist = [np.linalg.norm(stats[a] - stats[b]) for i, a in enumerate(stats) for b in list(stats)[i + 1:]]
    assert min(dist) > 4, min(dist)
    rng = np.random.default_rng(0)

    def pixels(domain, seeds):
        xs, ys = [], []
        for s in seeds:
            im, lb = city.render_scene(domain, s)
            idx = rng.choice(np.flatnonzero(lb.ravel() < 19), 2000)
            xs.append(im.reshape(-1, 3)[idx].astype(float))
            ys.append(lb.ravel()[idx])
        return np.concatenate(xs), np.concatenate(ys)

    for src in ("gta", "synthia", "cityscapes"):  # nearest class-mean colour classifier
        x, y = pixels(src, range(6))
        means = np.array([x[y == c].mean(0) if (y == c).any() else np.full(3, 1e6) for c in range(19)])

        def acc(x, y):
            return (np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), 1) == y).mean()
        own = acc(*pixels(src, range(6, 10)))
        others = [acc(*pixels(t, range(6, 10))) for t in ("cityscapes", "bdd", "mapillary", "acdc_night") if t != src]
        assert own > np.mean(others) + 0.05, (src, own, others)


def test_errors():
    with pytest.raises(ValueError, match="valid domains"):
        city.render_scene("kitti", 0)
    with pytest.raises(ValueError, match="at least 16x16"):
        city.render("a street", 0, size=(8, 8))
    with pytest.raises(ValueError, match="num_images"):
        city.build("/nonexistent", num_images=-1)


def test_cli_errors_one_message_and_help(tmp_path, capsys):
    from toyworld import city
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as err:
        city.main(["--out", str(tmp_path / "file"), "--num-images", "-1", "--workers", "0"])
    msg = capsys.readouterr().err
    assert err.value.code == 2 and "Traceback" not in msg and "3 problem(s)" in msg
    assert "--num-images must be >= 0" in msg and "--workers must be >= 1" in msg and "--out" in msg
    with pytest.raises(ValueError, match="--workers"):  # --debug: the exception itself
        city.main(["--out", str(tmp_path / "d"), "--workers", "0", "--debug"])
    assert not (tmp_path / "d").exists()
    with pytest.raises(SystemExit):
        city.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: datasets_toy)" in text and "gta 200" in text and "--debug" in text
