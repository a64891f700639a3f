"""The SAM path end to end with a tiny, randomly initialised SAM built from segment_anything's classes.

Random weights say nothing about segmentation quality; these tests check plumbing only: loading
(weights_only / safetensors), architecture checks, the embedding cache, coordinate scaling for
non-square slices (against segment_anything's own SamPredictor), mask choice, shapes and dtypes.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.segmenters import get_segmenter
from FoBSegmentLib.segmenters.box_sam import BoxSamSegmenter, box_from_background
from FoBSegmentLib.segmenters.sam import SamSegmenter, infer_sam_arch, load_state_dict

IMG = 256  # tiny encoder input; SAM's classes take any multiple of the patch size


def tiny_sam() -> torch.nn.Module:
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    dim = 32
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=IMG, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, out_chans=dim,
            qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            window_size=4, global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(IMG // 16, IMG // 16), input_image_size=(IMG, IMG), mask_in_chans=8
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=8),
            transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=16,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, Path]:
    from safetensors.torch import save_file

    model = tiny_sam()
    folder = tmp_path_factory.mktemp("tiny_sam")
    pth = folder / "tiny_sam.pth"
    torch.save(model.state_dict(), pth)
    st = folder / "tiny_sam.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    return model, pth, st


def slice_image(h: int = 120, w: int = 200) -> np.ndarray:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:h, 0:w]
    img = ((xx - w / 2) ** 2 / (w / 4) ** 2 + (yy - h / 2) ** 2 / (h / 4) ** 2 < 1).astype(np.float32)
    return img + 0.1 * rng.standard_normal((h, w)).astype(np.float32)


def prompts_for(h: int = 120, w: int = 200) -> PromptSet:
    ang = np.linspace(0, 2 * np.pi, 10, endpoint=False)
    ring = np.stack([w / 2 + 0.35 * w * np.cos(ang), h / 2 + 0.35 * h * np.sin(ang)], axis=1)
    return PromptSet(background=ring, foreground=[[w / 2, h / 2], [w / 2 + 5, h / 2 - 3]])


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_arch_is_read_from_the_checkpoint(tiny):
    model, pth, st = tiny
    for path in (pth, st):
        arch = infer_sam_arch(load_state_dict(path))
        assert (arch.img_size, arch.embed_dim, arch.depth, arch.num_heads) == (IMG, 32, 2, 2)
        assert arch.global_attn_indexes == (1,) and arch.window_size == 4 and arch.out_chans == 32
        assert arch.variant().startswith("custom")


@pytest.mark.parametrize("which", ["pth", "safetensors"])
def test_matches_segment_anything_predictor_on_a_non_square_slice(tiny, which):
    """Same logits and IoU as SamPredictor: preprocessing and (x, y) scaling agree for a 120x200 slice."""
    from segment_anything import SamPredictor

    model, pth, st = tiny
    seg = get_segmenter("sam", checkpoint=pth if which == "pth" else st, device="cpu", mask_choice=0)
    image, prompts = slice_image(), prompts_for()
    result = seg.segment(image, prompts)
    assert result.mask.shape == (120, 200) and result.mask.dtype == bool
    assert result.logits is not None and result.logits.shape == (120, 200) and result.logits.dtype == np.float32
    assert isinstance(result.score, float)

    predictor = SamPredictor(model)
    u8 = np.repeat(np.clip(np.rint((image - image.min()) / np.ptp(image) * 255), 0, 255).astype(np.uint8)[..., None], 3, 2)
    predictor.set_image(u8)
    pts, labels = prompts.points_and_labels
    masks, iou, _ = predictor.predict(point_coords=pts, point_labels=labels, multimask_output=True, return_logits=True)
    np.testing.assert_allclose(result.logits, masks[0], atol=1e-4)
    assert result.score == pytest.approx(float(iou[0]), abs=1e-5)


def test_prompt_coordinates_are_scaled_by_the_long_side(tiny):
    """On a 120x200 slice and a 256 input, SAM resizes to 154x256: x scales by 256/200, y by 154/120."""
    _, pth, _ = tiny
    seg = SamSegmenter(pth, name="sam", device="cpu")
    seen = []
    seg.model.prompt_encoder.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["points"][0].clone()), with_kwargs=True
    )
    seg.segment(slice_image(), PromptSet(background=[[0, 0], [199, 119], [0, 119]], foreground=[[50, 30]]))
    coords = seen[0][0].numpy()
    sx, sy = IMG / 200, round(120 * IMG / 200) / 120
    # foreground first, then background (SAM's label order in PromptSet.points_and_labels)
    np.testing.assert_allclose(coords[0], [50 * sx, 30 * sy], atol=1e-4)
    np.testing.assert_allclose(coords[2], [199 * sx, 119 * sy], atol=1e-4)


def test_embedding_cache_skips_the_encoder(tiny, tmp_path):
    _, pth, _ = tiny
    seg = SamSegmenter(pth, name="sam", device="cpu", disk_cache=tmp_path / "emb")
    calls = count_calls(seg.model.image_encoder)
    image = slice_image()
    first = seg.segment(image, prompts_for())
    edited = PromptSet(background=prompts_for().background[:-1], foreground=[[100, 60]])
    seg.segment(image, edited)
    seg.segment(image.copy(), prompts_for())
    assert calls[0] == 1, "re-segmenting the same slice after a prompt edit must only run the decoder"
    seg.segment(image[::-1].copy(), prompts_for())
    assert calls[0] == 2
    assert len(list((tmp_path / "emb").rglob("*.pt"))) == 2

    # a fresh segmenter (new session) reads the embedding from disk with weights_only=True
    again = SamSegmenter(pth, name="sam", device="cpu", disk_cache=tmp_path / "emb")
    calls2 = count_calls(again.model.image_encoder)
    second = again.segment(image, prompts_for())
    assert calls2[0] == 0 and again.cache.disk_hits == 1
    np.testing.assert_allclose(second.logits, first.logits, atol=1e-5)


def test_disk_cache_true_uses_the_fob_cache(tiny, tmp_path, monkeypatch):
    _, pth, _ = tiny
    monkeypatch.setenv("FOB_CACHE", str(tmp_path / "fobcache"))
    get_segmenter("sam", checkpoint=pth, device="cpu", disk_cache=True).segment(slice_image(), prompts_for())
    assert len(list((tmp_path / "fobcache" / "embeddings").rglob("*.pt"))) == 1
    get_segmenter("sam", checkpoint=pth, device="cpu", disk_cache=True, cache_dir=tmp_path / "other").segment(
        slice_image(), prompts_for()
    )
    assert len(list((tmp_path / "other" / "embeddings").rglob("*.pt"))) == 1


def test_mask_choice_policies(tiny):
    _, pth, _ = tiny
    image, prompts = slice_image(), prompts_for()
    by_index = [SamSegmenter(pth, device="cpu", mask_choice=i).segment(image, prompts) for i in range(3)]
    best = SamSegmenter(pth, device="cpu").segment(image, prompts)
    assert best.score == pytest.approx(max(r.score for r in by_index))
    single = SamSegmenter(pth, device="cpu", mask_choice="single").segment(image, prompts)
    assert single.mask.shape == (120, 200)
    with pytest.raises(ValueError, match="mask_choice"):
        SamSegmenter(pth, device="cpu", mask_choice=5)


def test_segment_many_batches_embeddings(tiny):
    _, pth, _ = tiny
    seg = SamSegmenter(pth, device="cpu")
    calls = count_calls(seg.model.image_encoder)
    images = [slice_image(), slice_image()[::-1].copy(), slice_image(100, 90)]
    prompts = [prompts_for(), prompts_for(), prompts_for(100, 90)]
    results = seg.segment_many(images, prompts, batch_size=4)
    assert calls[0] == 1  # one batched encoder call for three slices
    assert [r.mask.shape for r in results] == [(120, 200), (120, 200), (100, 90)]
    single = SamSegmenter(pth, device="cpu").segment(images[2], prompts[2])
    np.testing.assert_allclose(results[2].logits, single.logits, atol=1e-4)


def test_wrong_or_unsafe_checkpoints_are_refused(tiny, tmp_path):
    _, pth, _ = tiny
    with pytest.raises(ValueError, match="needs a SAM vit_b"):
        get_segmenter("sam-vit-b", checkpoint=pth, device="cpu")
    with pytest.raises(ValueError, match="needs a SAM vit_h"):
        get_segmenter("sam-vit-h", checkpoint=pth, device="cpu")
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, other)
    with pytest.raises(ValueError, match="not a SAM checkpoint"):
        get_segmenter("sam", checkpoint=other, device="cpu")
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": Path("x")}, pickled)  # an arbitrary Python object needs unpickling code
    with pytest.raises(ValueError, match="pickled.pth is not a SAM checkpoint") as refused:
        get_segmenter("sam", checkpoint=pickled, device="cpu")
    assert "weights_only" not in str(refused.value)  # torch's advice would run the file's code
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        get_segmenter("sam", checkpoint=junk, device="cpu")
    with pytest.raises(FileNotFoundError):
        get_segmenter("sam", checkpoint=tmp_path / "missing.pth", device="cpu")


def test_bad_inputs_raise_clear_errors(tiny):
    _, pth, _ = tiny
    seg = SamSegmenter(pth, device="cpu")
    image = slice_image()
    bad = image.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        seg.segment(bad, prompts_for())
    with pytest.raises(ValueError, match="outside"):
        seg.segment(image, PromptSet(foreground=[[250.0, 10.0]]))
    with pytest.raises(ValueError, match="at least one prompt"):
        seg.segment(image, PromptSet())
    with pytest.raises(ValueError, match="shape"):
        seg.segment(np.zeros((4, 5, 6)), prompts_for())
    # background-only prompts are legal for SAM (labels all 0)
    assert seg.segment(image, PromptSet(background=prompts_for().background)).mask.shape == (120, 200)


def test_box_prompt_is_the_rectangle_around_the_background_ring(tiny):
    _, pth, _ = tiny
    prompts = PromptSet(background=[[10, 20], [60, 5], [90, 40], [30, 70]], foreground=[[50, 40]])
    np.testing.assert_allclose(box_from_background(prompts), [10, 5, 90, 70])
    seg = BoxSamSegmenter(pth, name="box-sam", device="cpu")
    seen = []
    seg.model.prompt_encoder.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["boxes"].clone()), with_kwargs=True
    )
    calls = count_calls(seg.model.image_encoder)
    result = seg.segment(slice_image(), prompts)
    seg.segment(slice_image(), PromptSet(background=[[5, 5], [100, 100]]))
    assert calls[0] == 1
    assert result.mask.shape == (120, 200) and result.mask.dtype == bool
    # MedSAM resizes to a square: x scales by 256/200, y by 256/120
    np.testing.assert_allclose(seen[0].reshape(-1).numpy(), [10 * 1.28, 5 * IMG / 120, 90 * 1.28, 70 * IMG / 120], atol=1e-4)
    with pytest.raises(ValueError, match="at least 2 background"):
        seg.segment(slice_image(), PromptSet(foreground=[[50, 40]]))
    with pytest.raises(ValueError, match="vit_b"):
        BoxSamSegmenter(pth, name="medsam", device="cpu")


def test_auto_prefers_a_given_checkpoint_and_otherwise_falls_back(tiny, tmp_path, monkeypatch, caplog):
    _, pth, _ = tiny
    seg = get_segmenter("auto", checkpoint=pth, device="cpu")
    assert seg.name == "sam" and "sam" in seg.auto_choice
    monkeypatch.setenv("FOB_CACHE", str(tmp_path / "empty_cache"))
    with caplog.at_level("INFO", logger="FoBSegmentLib.segmenters"):
        fallback = get_segmenter("auto")
    assert fallback.name == "graphcut"
    assert "graphcut" in fallback.auto_choice and "graphcut" in caplog.text
    with pytest.raises(FileNotFoundError, match="fob models download sam-vit-h"):
        get_segmenter("sam-vit-h")
    with pytest.raises(ValueError, match="unknown segmenter"):
        get_segmenter("sam-vit-x")


def test_auto_uses_a_cached_checkpoint_and_survives_a_bad_one(tiny, tmp_path, monkeypatch, caplog):
    """A file registered for sam-vit-b in the cache is tried; the tiny (non-ViT-B) one is refused, logged,
    and auto falls back to the weight-free segmenter instead of failing."""
    import json
    import shutil

    _, pth, _ = tiny
    cache = tmp_path / "cache"
    (cache / "weights").mkdir(parents=True)
    shutil.copy(pth, cache / "weights" / "tiny.pth")
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({"models": [{"name": "sam-vit-b", "file": "tiny.pth", "url": None,
                                                "size": pth.stat().st_size, "segmenter": "sam-vit-b"}]}))
    monkeypatch.setenv("FOB_MODELS_JSON", str(registry))
    with caplog.at_level("INFO", logger="FoBSegmentLib.segmenters"):
        seg = get_segmenter("auto", cache_dir=cache)
    assert seg.name == "graphcut" and "tiny.pth unusable" in seg.auto_choice
    assert "needs a SAM vit_b" in caplog.text
