"""Pseudo-labels, episode samplers and augmentation on the real data (issue 6)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from FoBSegmentLib.train import augment
from FoBSegmentLib.train.episodes import (
    VolumeEpisodeSampler,
    excluded_slices,
    load_training_volumes,
)
from FoBSegmentLib.train.pseudolabels import (
    SupervoxelParams,
    body_mask,
    image_superpixels,
    rescale_to_255,
    volume_supervoxels,
)


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def chaos1(data_dir, tmp_path_factory):
    """CHAOS patient 1: image array, ground truth, supervoxels (computed into a private cache)."""
    cache = tmp_path_factory.mktemp("svcache")
    path = data_dir / "chaos_mr_t2spir" / "image_1.nii.gz"
    labels = volume_supervoxels(path, cache_root=cache)
    return {"path": path, "image": _read(path), "gt": _read(data_dir / "chaos_mr_t2spir" / "label_1.nii.gz"),
            "labels": labels, "cache": cache}


def test_supervoxels_are_sensible_on_a_real_mr_volume(chaos1):
    labels, image, gt = chaos1["labels"], chaos1["image"], chaos1["gt"]
    assert labels.shape == image.shape and labels.dtype == np.int32
    ids = np.unique(labels)
    assert ids[0] == 0 and np.array_equal(ids[1:], np.arange(1, len(ids)))  # consecutive ids 1..K
    k = len(ids) - 1
    assert 50 <= k <= 2000, k
    # Nothing outside the body: every labelled voxel lies in the per-slice body mask.
    body = body_mask(rescale_to_255(image))
    assert not np.any((labels > 0) & ~body)
    assert 0.2 < body.mean() < 0.8
    # Almost the whole body is labelled (Felzenszwalb partitions every slice).
    assert (labels > 0).sum() >= 0.99 * body.sum()
    sizes = np.bincount(labels.ravel())[1:]
    assert np.median(sizes) >= 400  # per-slice min_size 400 px; tubes are larger
    assert sizes.max() < 0.25 * body.sum()  # no label swallows the body
    # Enough supervoxels span adjacent slices to make episodes (support z, query z+1).
    spans = [len(np.unique(np.nonzero(labels == i)[0])) for i in range(1, k + 1)]
    assert sum(s >= 2 for s in spans) >= 30
    # Segments follow anatomy: each kidney slice is covered well by a single supervoxel.
    best = []
    for organ in (2, 3):
        for z in np.unique(np.nonzero(gt == organ)[0]):
            g = gt[z] == organ
            inter = np.bincount(labels[z][g], minlength=k + 1)[1:]
            size = np.bincount(labels[z].ravel(), minlength=k + 1)[1:]
            best.append(np.max(2 * inter / (size + g.sum())))
    assert np.mean(best) > 0.6, np.mean(best)


def test_supervoxels_are_cached_by_file_and_parameters(chaos1):
    cache = chaos1["cache"]
    files = list((cache / "pseudolabels").glob("supervoxels_*.npz"))
    assert len(files) == 1
    again = volume_supervoxels(chaos1["path"], cache_root=cache)
    assert np.array_equal(again, chaos1["labels"])
    assert len(list((cache / "pseudolabels").glob("*.npz"))) == 1  # read back, not recomputed
    # A corrupt cache entry is recomputed, not trusted.
    files[0].write_bytes(b"garbage")
    assert np.array_equal(volume_supervoxels(chaos1["path"], cache_root=cache), chaos1["labels"])


def test_supervoxel_parameters_are_checked():
    with pytest.raises(ValueError, match="unknown supervoxel method"):
        SupervoxelParams(method="watershed")
    with pytest.raises(ValueError, match="link_iou"):
        SupervoxelParams(link_iou=0.0)


def test_slic_superpixels_on_a_real_dermoscopy_image(data_dir, tmp_path):
    path = data_dir / "isic" / "ISIC_0012388.jpg"
    labels = image_superpixels(path, cache_root=tmp_path)
    ids = np.unique(labels)
    assert ids.min() == 1  # start_label 1, no background id
    assert 2 <= len(ids) <= 10  # SLIC with n_segments=5 gives about 5
    assert labels.shape == _read(path).shape[:2]
    assert np.bincount(labels.ravel())[1:].min() > 0.01 * labels.size


def test_setting1_episodes_read_no_labels_and_follow_the_method(data_dir, tmp_path, monkeypatch):
    # A folder with the image only: Setting I must not need (or read) any label file.
    folder = tmp_path / "chaos_mr_t2spir"
    folder.mkdir()
    shutil.copy(data_dir / "chaos_mr_t2spir" / "image_1.nii.gz", folder / "image_1.nii.gz")
    monkeypatch.setenv("FOB_CACHE", str(tmp_path / "cache"))
    vols = load_training_volumes([folder], setting=1, size=256, progress=False)
    assert len(vols) == 1 and vols[0].image.shape[1:] == (256, 256)
    assert 0.0 <= vols[0].image.min() and vols[0].image.max() <= 1.0
    sampler = VolumeEpisodeSampler(vols, min_size=200, augment=False)
    rng = np.random.default_rng(0)
    pairs = set()
    for _ in range(40):
        ep = sampler.sample(rng)
        zs, zq, k = ep.info["support_slice"], ep.info["query_slice"], ep.info["label"]
        assert abs(zs - zq) == 1
        assert max(ep.support_mask.sum(), ep.query_mask.sum()) >= 200
        assert ep.support_mask.any() and ep.query_mask.any()
        assert np.array_equal(ep.support_mask, vols[0].labels[zs] == k)
        assert np.array_equal(ep.query_image, vols[0].image[zq])
        pairs.add((min(zs, zq), k))
    assert len(pairs) > 20  # episodes are spread over many labels and slices
    # Same seed, same episodes (repeatable runs).
    a = [sampler.sample(np.random.default_rng(5)).info for _ in range(3)]
    b = [sampler.sample(np.random.default_rng(5)).info for _ in range(3)]
    assert a == b


def test_setting2_excludes_every_slice_with_a_test_organ(data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("FOB_CACHE", str(tmp_path / "cache"))
    gt = _read(data_dir / "chaos_mr_t2spir" / "label_1.nii.gz")
    any_mask = excluded_slices(gt, [1, 4], "any")
    all_mask = excluded_slices(gt, [1, 4], "all")
    has1 = (gt == 1).reshape(gt.shape[0], -1).any(1)
    has4 = (gt == 4).reshape(gt.shape[0], -1).any(1)
    assert np.array_equal(any_mask, has1 | has4)
    assert np.array_equal(all_mask, has1 & has4)
    assert any_mask.sum() > all_mask.sum()  # the lineage AND keeps slices that still show a test organ

    # Patient 2, spleen (4) as the test organ: episodes may only use slices without any spleen.
    folder = data_dir / "chaos_mr_t2spir"
    gt2 = _read(folder / "label_2.nii.gz")
    vols = load_training_volumes(
        [folder], setting=2, size=256, exclude_organs=[4], include_ids={folder.name: ["2"]}, progress=False
    )
    sampler = VolumeEpisodeSampler(vols, augment=False)
    rng = np.random.default_rng(1)
    spleen_slices = set(np.nonzero((gt2 == 4).reshape(gt2.shape[0], -1).any(1))[0].tolist())
    seen = set()
    for _ in range(30):
        ep = sampler.sample(rng)
        assert ep.info["support_slice"] not in spleen_slices and ep.info["query_slice"] not in spleen_slices
        assert ep.info["label"] in (1, 2, 3)  # ground truth of the training organs only
        assert not np.any(gt2[ep.info["query_slice"]] == 4)
        seen.add(ep.info["label"])
    assert len(seen) >= 2
    # Liver as the test organ in patient 1: every kidney/spleen slice also shows liver, so with the
    # ANY rule nothing is left, and the sampler says so instead of looping.
    vols1 = load_training_volumes(
        [folder], setting=2, size=256, exclude_organs=[1], include_ids={folder.name: ["1"]}, progress=False
    )
    with pytest.raises(ValueError, match="no episode possible"):
        VolumeEpisodeSampler(vols1, augment=False)
    with pytest.raises(ValueError, match="exclude-organs"):
        load_training_volumes([folder], setting=2, exclude_organs=[], progress=False)


def test_augmentation_keeps_masks_binary_and_is_seeded():
    yy, xx = np.mgrid[:128, :128]
    mask = ((yy - 64) ** 2 + (xx - 60) ** 2 < 25**2).astype(np.uint8)
    image = np.where(mask, 0.8, 0.2).astype(np.float32) + 0.05 * np.sin(xx / 5.0)
    g = augment.gamma_transform(image, np.random.default_rng(0))
    assert g.shape == image.shape
    assert g.min() >= image.min() - 1e-4 and g.max() <= image.max() + 1e-4
    assert not np.allclose(g, image)
    img2, m2 = augment.geometric_transform(image, mask, np.random.default_rng(3))
    assert set(np.unique(m2)) <= {0, 1}
    assert 0.7 < m2.sum() / mask.sum() < 1.6  # scale 0.9-1.2 plus a mild elastic warp
    assert not np.array_equal(m2, mask)
    # The warped mask still sits on the bright disc of the warped image.
    assert img2[m2 == 1].mean() > img2[m2 == 0].mean() + 0.4
    again = augment.geometric_transform(image, mask, np.random.default_rng(3))
    assert np.array_equal(again[1], m2) and np.allclose(again[0], img2)
    with pytest.raises(ValueError, match="same"):
        augment.geometric_transform(image, mask[:10], np.random.default_rng(0))
    rgb = np.stack([image] * 3, axis=-1)
    s_img, s_msk = augment.skin_transform(rgb, mask, np.random.default_rng(0))
    assert s_img.shape == rgb.shape and 0.0 <= s_img.min() and s_img.max() <= 1.0
    assert set(np.unique(s_msk)) <= {0, 1} and s_msk.sum() > 0


def test_skin_setting1_episodes_from_slic_segments(data_dir, tmp_path, monkeypatch):
    from FoBSegmentLib.train.episodes import SkinEpisodeSampler, load_training_images

    monkeypatch.setenv("FOB_CACHE", str(tmp_path / "cache"))
    imgs = load_training_images([data_dir / "isic"], size=128, include_ids=["ISIC_0012388", "ISIC_0012903"],
                                progress=False)
    assert [i.name for i in imgs] == ["ISIC_0012388", "ISIC_0012903"]
    assert imgs[0].image.shape == (128, 128, 3) and imgs[0].labels.min() >= 1
    sampler = SkinEpisodeSampler(imgs, min_size=100)
    rng = np.random.default_rng(0)
    for _ in range(5):
        ep = sampler.sample(rng)
        assert ep.support_image.shape == (128, 128, 3) and ep.query_mask.shape == (128, 128)
        assert ep.support_mask.any() and ep.query_mask.any()
        assert max(ep.support_mask.sum(), ep.query_mask.sum()) >= 100
        # Two independent augmentations of the same image: the views differ.
        assert not np.array_equal(ep.support_image, ep.query_image)
    assert (tmp_path / "cache" / "pseudolabels").is_dir()  # SLIC labels cached


def test_episodes_at_slice_distances_and_organ_ends(data_dir, tmp_path, monkeypatch):
    folder = tmp_path / "chaos_mr_t2spir"
    folder.mkdir()
    shutil.copy(data_dir / "chaos_mr_t2spir" / "image_1.nii.gz", folder / "image_1.nii.gz")
    monkeypatch.setenv("FOB_CACHE", str(tmp_path / "cache"))
    vols = load_training_volumes([folder], setting=1, size=256, progress=False)
    sampler = VolumeEpisodeSampler(vols, min_size=200, augment=False, max_gap=3, end_fraction=0.5)
    rng = np.random.default_rng(0)
    gaps = set()
    for _ in range(60):
        ep = sampler.sample(rng)
        zs, zq, k = ep.info["support_slice"], ep.info["query_slice"], ep.info["label"]
        assert abs(zs - zq) == ep.info["gap"] and 1 <= ep.info["gap"] <= 3
        assert ep.support_mask.any() and ep.query_mask.any()
        assert np.array_equal(ep.query_mask, vols[0].labels[zq] == k)
        gaps.add(ep.info["gap"])
    assert gaps == {1, 2, 3}
    # The defaults draw exactly the method's adjacent episodes (same random stream as before).
    plain = VolumeEpisodeSampler(vols, min_size=200, augment=False)
    assert all(plain.sample(rng).info["gap"] == 1 for _ in range(10))
    with pytest.raises(ValueError):
        VolumeEpisodeSampler(vols, max_gap=0)
    with pytest.raises(ValueError):
        VolumeEpisodeSampler(vols, end_fraction=1.5)
