"""overlay_attention: the drawn contour encloses exactly the map's top-mass region, at the image's size."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_fill_holes

from simpool_lightning.callbacks import CONTOUR_COLOR, contour_pixels, overlay_attention
from simpool_lightning.metrics.localization import threshold_by_mass


def mass_region(attn: np.ndarray, mass: float) -> np.ndarray:
    """DINO's thresholding (visualize_attention.py @ facebookresearch/dino): sort ascending, normalise,
    keep the locations whose cumulative share exceeds ``1 - mass``; for maps without ties."""
    flat = attn.ravel().astype(np.float64)
    order = np.argsort(flat)
    cumulative = np.cumsum(flat[order] / flat.sum())
    keep = np.zeros(flat.size, dtype=bool)
    keep[order] = cumulative > 1 - mass
    return keep.reshape(attn.shape)


def hand_made_map(height: int, width: int) -> np.ndarray:
    """Two blobs, one cut by the top-left corner of the image, plus a ramp that breaks every tie."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    blobs = np.exp(-(((x - 0.7 * width) / (0.12 * width)) ** 2 + ((y - 0.6 * height) / (0.2 * height)) ** 2))
    blobs += 0.8 * np.exp(-((x / (0.15 * width)) ** 2 + (y / (0.15 * height)) ** 2))
    ramp = np.arange(height * width, dtype=np.float64).reshape(height, width) / (height * width) * 1e-6
    return blobs + 0.01 + ramp


def drawn_region(picture: np.ndarray) -> np.ndarray:
    """The pixels of the contour colour and every pixel they enclose."""
    contour = (picture == np.asarray(CONTOUR_COLOR, dtype=np.uint8)).all(-1)
    return binary_fill_holes(contour)


@pytest.mark.parametrize("height, width, mass", [(60, 80, 0.6), (37, 23, 0.6), (300, 560, 0.6), (60, 80, 0.3)])
def test_the_contour_encloses_exactly_the_mass_region(height, width, mass):
    attn = hand_made_map(height, width)
    expected = mass_region(attn, mass)
    assert expected.any() and not expected.all()
    assert (binary_fill_holes(expected) == expected).all()  # no holes: "enclosed" is well defined
    assert expected[0, 0]  # the region touches the image's edge: the contour must close along it
    # The package's thresholding agrees with the transcription on this tie-free map.
    assert (threshold_by_mass(torch.from_numpy(attn)[None], mass)[0].numpy() == expected).all()

    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    picture = overlay_attention(image, torch.from_numpy(attn), mass=mass)
    assert picture.shape == (height, width, 3) and picture.dtype == np.uint8
    np.testing.assert_array_equal(drawn_region(picture), expected)


def test_contour_width_grows_with_the_image_and_stays_inside_the_region():
    mask = torch.zeros(600, 900, dtype=torch.bool)
    mask[100:400, 200:700] = True
    band = contour_pixels(mask, width=3)
    assert not (band & ~mask).any()
    assert band[100:103, 200:700].all() and not band[103:397, 203:697].any()
    # The default width: 1 pixel per 256 pixels of the shorter side (2 here).
    attn = mask.float() + 1e-3
    picture = overlay_attention(torch.zeros(3, 600, 900), attn, mass=0.9)
    contour = (picture == np.asarray(CONTOUR_COLOR, dtype=np.uint8)).all(-1)
    np.testing.assert_array_equal(contour, contour_pixels(mask, width=2).numpy())


def test_without_heat_the_picture_is_the_image_and_the_contour():
    image = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(1))
    attn = torch.from_numpy(hand_made_map(40, 50)).float()
    picture = overlay_attention(image, attn, mass=0.6, alpha=0.0)
    contour = (picture == np.asarray(CONTOUR_COLOR, dtype=np.uint8)).all(-1)
    plain = np.round(image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(picture[~contour], plain[~contour])
    # No contour at all with mass=None; the heat changes the picture.
    np.testing.assert_array_equal(overlay_attention(image, attn, mass=None, alpha=0.0), plain)
    assert (overlay_attention(image, attn, mass=None) != plain).any()


@pytest.mark.parametrize(
    "image, attn, message",
    [
        (torch.rand(1, 8, 8), torch.rand(8, 8), r"RGB \(3, H, W\)"),
        (torch.rand(3, 8, 8), torch.rand(8, 9), r"image's size \(8, 8\)"),
    ],
)
def test_bad_shapes_are_named(image, attn, message):
    with pytest.raises(ValueError, match=message):
        overlay_attention(image, attn)
