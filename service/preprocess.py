"""Turning a picture or a plain array into the model's input, as its metadata says.

The exporter records how the training data was fed (`foldserve.model_metadata.InputSpec`):
convert to color_mode, resize to the input's height and width with the named Pillow filter, map
0..255 onto value_range (inverting first when ink is "high", as for the digits, whose strokes
are large values), then (raw - mean) / std per channel. A model's config.json may override any
of these. A JSON array is taken as raw values already in value_range, and only normalised.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from foldserve.model_metadata import InputSpec
from service.errors import BadRequestError, UnsupportedMediaTypeError
from service.repository import Preprocessing

MAX_PIXELS = 40_000_000  # the default of Settings.max_image_pixels: refuse decompression bombs
IMAGE_FORMATS = ("PNG", "JPEG")


def effective_spec(spec: InputSpec, overrides: Preprocessing) -> InputSpec:
    """The exporter's input spec with the config.json overrides applied."""
    changes = {k: v for k, v in overrides.model_dump().items() if v is not None}
    merged = dataclasses.replace(spec, **changes)
    if len(merged.mean) != len(merged.std):
        raise BadRequestError("the model's preprocessing has a different number of means and stds")
    return merged


def _channels(spec: InputSpec) -> int:
    return spec.shape[0] if spec.layout == "NCHW" else 1


def normalise(raw: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(raw - mean) / std along the channel axis (axis 1), in float32."""
    mean = np.asarray(spec.mean, dtype=np.float64)
    std = np.asarray(spec.std, dtype=np.float64)
    if spec.layout == "NCHW":
        mean, std = mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)
    return ((raw.astype(np.float64) - mean) / std).astype(np.float32)


def image_to_input(data: bytes, spec: InputSpec, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A PNG or JPEG, as a batch of one input tensor; refused on its header when it declares
    more than `max_pixels`, before a pixel is decoded."""
    if spec.layout != "NCHW" or len(spec.shape) != 3:
        raise BadRequestError("this model takes a feature vector, not an image: send a JSON array")
    image = _open(data, max_pixels)
    mode = spec.color_mode or ("RGB" if _channels(spec) == 3 else "L")
    channels, height, width = spec.shape
    if (mode == "RGB") != (channels == 3):
        raise BadRequestError(f"color mode {mode} does not fit the model's {channels} channel(s)")
    resample = Image.Resampling[(spec.resize or "bilinear").upper()]
    picture = image.convert(mode).resize((width, height), resample=resample)
    pixels = np.asarray(picture, dtype=np.float64)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    if spec.ink == "high":
        pixels = 255.0 - pixels
    low, high = spec.value_range
    raw = low + pixels / 255.0 * (high - low)
    return normalise(raw[None], spec)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise BadRequestError("empty request body: send a PNG or JPEG image, or a JSON array")
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in IMAGE_FORMATS:
            raise UnsupportedMediaTypeError(f"images must be PNG or JPEG, not {image.format}")
        if image.width * image.height > max_pixels:
            raise BadRequestError(
                f"image of {image.width}x{image.height} pixels is too large (at most "
                f"{max_pixels} pixels: max_image_pixels)"
            )
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnsupportedMediaTypeError(
            f"cannot read the body as a PNG or JPEG image: {exc}"
        ) from None
    return image


def array_to_input(values: Any, spec: InputSpec, max_batch: int | None = None) -> np.ndarray:
    """Raw values in value_range, shaped like one input or a batch of at most `max_batch`."""
    try:
        raw = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):
        raise BadRequestError("the JSON array must hold numbers, nested evenly") from None
    shape = tuple(spec.shape)
    if raw.shape == shape:
        raw = raw[None]
    if raw.shape[1:] != shape or raw.shape[0] < 1:
        raise BadRequestError(
            f"the JSON array has shape {list(raw.shape)}; the model takes {list(shape)} or a "
            f"batch of them [n, {', '.join(map(str, shape))}]"
        )
    if max_batch is not None and raw.shape[0] > max_batch:
        raise BadRequestError(
            f"a batch of {raw.shape[0]} inputs; this server takes at most {max_batch} per "
            "request (max_request_batch_size)"
        )
    if not np.isfinite(raw).all():
        raise BadRequestError("the JSON array holds non-finite values")
    return normalise(raw, spec)


def probabilities(logits: np.ndarray, softmax_applied: bool) -> np.ndarray:
    """Per-item class probabilities, from a [batch, classes, ...] output."""
    scores = logits.reshape(logits.shape[0], -1).astype(np.float64)
    if softmax_applied:
        return scores
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
