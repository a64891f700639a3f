"""Episode augmentation (method doc section 9.5).

Abdominal (SSL-ALPNet `sabs_aug`, as FoB uses it): gamma on the intensities, then a random affine
about the image centre followed by an elastic deformation; image and mask are warped together and the
mask is re-binarised. Every function here acts on one (H, W) slice in the (row, col) frame and takes
an explicit `numpy.random.Generator` so that a seeded run is repeatable.

Skin (Setting I, reference `get_polyp_transform`): colour jitter, random flips, affine with rotation
up to 90 degrees and scale 0.75-1.25.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi


def gamma_transform(image: np.ndarray, rng: np.random.Generator, gamma_range: tuple[float, float] = (0.5, 1.5)):
    """x -> r * ((x - min + 1e-5) / r) ** g + min with g ~ U(gamma_range), r = max - min + 1e-5.

    image: (H, W) or (H, W, C) float. Returns float32 of the same shape and range.
    """
    x = np.asarray(image, dtype=np.float32)
    g = rng.uniform(*gamma_range)
    lo = float(x.min())
    r = float(x.max()) - lo + 1e-5
    return (r * np.power((x - lo + 1e-5) / r, g) + lo).astype(np.float32)


def random_affine_matrix(
    shape: tuple[int, int],
    rng: np.random.Generator,
    rotate_deg: float = 5.0,
    shift_px: float = 5.0,
    shear_deg: float = 5.0,
    scale_range: tuple[float, float] = (0.9, 1.2),
) -> np.ndarray:
    """A (2, 3) cv2 affine matrix in the (x, y) pixel frame, about the image centre (section 9.5 ranges)."""
    h, w = shape
    angle = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg))
    shear = np.deg2rad(rng.uniform(-shear_deg, shear_deg))
    scale = rng.uniform(*scale_range)
    tx, ty = rng.uniform(-shift_px, shift_px, size=2)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shr = np.array([[1.0, -np.sin(shear)], [0.0, np.cos(shear)]])
    lin = scale * rot @ shr
    centre = np.array([cx, cy])
    offset = centre - lin @ centre + np.array([tx, ty])
    return np.hstack([lin, offset[:, None]]).astype(np.float64)


def elastic_fields(
    shape: tuple[int, int], rng: np.random.Generator, alpha: float = 10.0, sigma: float = 5.0
) -> tuple[np.ndarray, np.ndarray]:
    """Displacement fields (dy, dx), each (H, W): Gaussian-smoothed U(-1, 1) noise times alpha."""
    dy = ndi.gaussian_filter(rng.uniform(-1, 1, size=shape), sigma, mode="constant") * alpha
    dx = ndi.gaussian_filter(rng.uniform(-1, 1, size=shape), sigma, mode="constant") * alpha
    return dy, dx


def geometric_transform(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, elastic: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Random affine then elastic deformation of an (H, W) image and its (H, W) binary mask together.

    Returns (image float32 (H, W), mask uint8 (H, W) in {0, 1}); bilinear for both, mask rounded.
    """
    img = np.asarray(image, dtype=np.float32)
    msk = np.asarray(mask, dtype=np.float32)
    if img.shape != msk.shape or img.ndim != 2:
        raise ValueError(f"image and mask must be the same (H, W) shape, got {img.shape} and {msk.shape}")
    h, w = img.shape
    mat = random_affine_matrix((h, w), rng)
    stack = np.stack([img, msk], axis=-1)
    stack = cv2.warpAffine(stack, mat, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if elastic:
        dy, dx = elastic_fields((h, w), rng)
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        coords = [yy + dy, xx + dx]
        stack = np.stack(
            [ndi.map_coordinates(stack[..., c], coords, order=1, mode="reflect") for c in range(2)], axis=-1
        )
    return stack[..., 0].astype(np.float32), np.rint(np.clip(stack[..., 1], 0, 1)).astype(np.uint8)


def augment_pair(
    sup_img: np.ndarray,
    sup_mask: np.ndarray,
    qry_img: np.ndarray,
    qry_mask: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Abdominal episode augmentation: gamma on the query (p=0.5) else the support, then the geometric
    transform on the query (p=0.5) else the support (method doc 9.5). All arrays (H, W)."""
    s_img, s_msk, q_img, q_msk = sup_img, sup_mask, qry_img, qry_mask
    if rng.random() < 0.5:
        q_img = gamma_transform(q_img, rng)
    else:
        s_img = gamma_transform(s_img, rng)
    if rng.random() < 0.5:
        q_img, q_msk = geometric_transform(q_img, q_msk, rng)
    else:
        s_img, s_msk = geometric_transform(s_img, s_msk, rng)
    return s_img, s_msk, q_img, q_msk


def skin_transform(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Skin Setting I view: colour jitter (0.4, 0.4, 0.4, 0.1), flips, affine (rotation +-90 deg, scale
    0.75-1.25), then per-image min-max to [0, 1].

    image: (H, W, 3) float in [0, 1]; mask: (H, W) {0, 1}. Returns (image (H, W, 3) float32, mask uint8).
    """
    img = np.asarray(image, dtype=np.float32)
    msk = np.asarray(mask, dtype=np.uint8)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[:2] != msk.shape:
        raise ValueError(f"skin_transform needs (H, W, 3) image and (H, W) mask, got {img.shape}, {msk.shape}")
    img = img * rng.uniform(0.6, 1.4)  # brightness
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.6, 1.4) + mean  # contrast
    grey = img.mean(axis=2, keepdims=True)
    img = (img - grey) * rng.uniform(0.6, 1.4) + grey  # saturation
    hsv = cv2.cvtColor(np.clip(img, 0, 1).astype(np.float32), cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-0.1, 0.1) * 360.0) % 360.0  # hue (OpenCV float hue in degrees)
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.random() < 0.5:
        img, msk = img[::-1], msk[::-1]
    if rng.random() < 0.5:
        img, msk = img[:, ::-1], msk[:, ::-1]
    h, w = msk.shape
    mat = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), rng.uniform(-90, 90), rng.uniform(0.75, 1.25))
    img = cv2.warpAffine(np.ascontiguousarray(img), mat, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    msk = cv2.warpAffine(np.ascontiguousarray(msk), mat, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return img.astype(np.float32), msk.astype(np.uint8)
