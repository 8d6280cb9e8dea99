"""The JPEG fast path of ``decode_image`` (simplejpeg) and its Pillow fallback; EXIF orientation;
16-bit scaling; the error type."""

from __future__ import annotations

import io
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from ovseg.datamodules import decode
from ovseg.datamodules.decode import DecodeError, decode_image
from ovseg.datamodules.synthetic import SyntheticWorld

simplejpeg = pytest.importorskip("simplejpeg")


def jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def pil_rgb(payload: bytes) -> np.ndarray:
    """The Pillow reference: (H, W, 3) uint8 via ``convert('RGB')``."""
    return np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    return SyntheticWorld(image_size=(64, 96)).scene(0).image


@pytest.fixture
def spy(monkeypatch):
    """Counts simplejpeg.decode_jpeg calls made by the decode module."""
    calls = []
    real = simplejpeg.decode_jpeg

    def counting(*args, **kwargs):
        calls.append(kwargs.get("colorspace"))
        return real(*args, **kwargs)

    monkeypatch.setattr(decode._simplejpeg, "decode_jpeg", counting)
    return calls


def test_module_uses_simplejpeg_when_installed():
    assert decode._simplejpeg is simplejpeg


@pytest.mark.parametrize("subsampling", [0, 2])  # 4:4:4 and 4:2:0
def test_simplejpeg_agrees_with_pillow(scene, spy, subsampling):
    payload = jpeg(Image.fromarray(scene), quality=95, subsampling=subsampling)
    fast = decode_image(payload, name="scene.jpg")
    assert spy == ["RGB"]  # decoded by simplejpeg, straight to RGB
    assert fast.dtype == torch.uint8 and fast.shape == (3, 64, 96) and fast.is_contiguous()
    reference = pil_rgb(payload).transpose(2, 0, 1).astype(np.int16)
    assert np.abs(fast.numpy().astype(np.int16) - reference).mean() < 2


def test_bytearray_memoryview_and_path_take_the_fast_path(scene, spy, tmp_path):
    payload = jpeg(Image.fromarray(scene), quality=90)
    path = tmp_path / "scene.jpg"
    path.write_bytes(payload)
    expected = decode_image(payload)
    for source in (bytearray(payload), memoryview(payload), path, str(path)):
        assert torch.equal(decode_image(source), expected)
    assert len(spy) == 5


def test_progressive_jpeg(scene, spy):
    payload = jpeg(Image.fromarray(scene), quality=90, progressive=True)
    out = decode_image(payload)
    assert spy == ["RGB"]
    assert np.abs(out.numpy().transpose(1, 2, 0).astype(np.int16) - pil_rgb(payload)).mean() < 2


def test_grayscale_jpeg_gives_three_identical_channels(scene, spy):
    gray = Image.fromarray(scene).convert("L")
    payload = jpeg(gray, quality=95)
    out = decode_image(payload)
    assert spy == ["RGB"]
    assert out.shape == (3, 64, 96)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    reference = np.asarray(Image.open(io.BytesIO(payload)), dtype=np.int16)  # mode L
    assert np.abs(out[0].numpy().astype(np.int16) - reference).mean() < 2


def test_cmyk_jpeg_falls_back_to_pillow(scene, spy):
    payload = jpeg(Image.fromarray(scene).convert("CMYK"), quality=95)
    assert simplejpeg.decode_jpeg_header(payload)[2] == "CMYK"
    out = decode_image(payload, name="cmyk.jpg")
    assert spy == []  # the header check sent it to Pillow without decoding
    assert out.dtype == torch.uint8 and out.shape == (3, 64, 96)
    assert np.array_equal(out.numpy().transpose(1, 2, 0), pil_rgb(payload))


def test_non_jpeg_formats_use_pillow(scene, spy):
    buffer = io.BytesIO()
    Image.fromarray(scene).save(buffer, "PNG")
    out = decode_image(buffer.getvalue())
    assert spy == []
    assert np.array_equal(out.numpy().transpose(1, 2, 0), scene)


def test_recoverable_corruption_is_left_to_pillow(scene):
    payload = jpeg(Image.fromarray(scene), quality=90)
    damaged = payload[:300] + bytes(40) + payload[340:]  # "extraneous bytes before marker"
    with pytest.raises(ValueError):
        simplejpeg.decode_jpeg(damaged, strict=True)
    try:
        image = Image.open(io.BytesIO(damaged))
        image.load()
    except Exception:
        with pytest.raises(DecodeError, match="damaged.jpg"):
            decode_image(damaged, name="damaged.jpg")
    else:  # Pillow tolerates it: so does decode_image, with Pillow's pixels
        out = decode_image(damaged, name="damaged.jpg")
        assert np.array_equal(out.numpy().transpose(1, 2, 0), np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("fast", [True, False])
def test_corrupt_jpeg_raises_decode_error_naming_the_file(scene, tmp_path, monkeypatch, fast):
    if not fast:
        monkeypatch.setattr(decode, "_simplejpeg", None)
    payload = jpeg(Image.fromarray(scene), quality=90)
    for bad in (payload[: len(payload) // 2], b"\xff\xd8\xffgarbage", b"\xff\xd8\xff"):
        with pytest.raises(DecodeError, match=r"^shard\.tar:000000007\.jpg: "):
            decode_image(bad, name="shard.tar:000000007.jpg")
    path = tmp_path / "truncated.jpg"
    path.write_bytes(payload[: len(payload) // 3])
    with pytest.raises(DecodeError, match="truncated.jpg"):
        decode_image(path)
    with pytest.raises(FileNotFoundError, match="absent.jpg"):
        decode_image(tmp_path / "absent.jpg")


def test_fallback_when_simplejpeg_is_unavailable(scene, tmp_path, monkeypatch):
    color = jpeg(Image.fromarray(scene), quality=95)
    gray = jpeg(Image.fromarray(scene).convert("L"), quality=95)
    cmyk = jpeg(Image.fromarray(scene).convert("CMYK"), quality=95)
    path = tmp_path / "scene.jpg"
    path.write_bytes(color)
    fast = {key: decode_image(value) for key, value in (("color", color), ("gray", gray), ("path", path))}

    monkeypatch.setattr(decode, "_simplejpeg", None)
    slow_color = decode_image(color)
    assert np.array_equal(slow_color.numpy().transpose(1, 2, 0), pil_rgb(color))
    assert np.abs(slow_color.numpy().astype(np.int16) - fast["color"].numpy().astype(np.int16)).mean() < 2
    assert torch.equal(decode_image(path), slow_color)
    assert np.abs(fast["path"].numpy().astype(np.int16) - slow_color.numpy().astype(np.int16)).mean() < 2
    slow_gray = decode_image(gray)
    assert torch.equal(slow_gray[0], slow_gray[2])
    assert np.abs(slow_gray.numpy().astype(np.int16) - fast["gray"].numpy().astype(np.int16)).mean() < 2
    assert decode_image(cmyk).shape == (3, 64, 96)


# ------------------------------------------------------------------------------ EXIF orientation
def with_orientation(image: Image.Image, fmt: str, orientation: int | None, **options) -> bytes:
    buffer = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def upright(payload: bytes) -> np.ndarray:
    """The reference: Pillow's ImageOps.exif_transpose (what cv2 and detectron2 do too)."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(payload))).convert("RGB"))


def hwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_on_the_jpeg_fast_path(scene, spy, monkeypatch, orientation):
    payload = with_orientation(Image.fromarray(scene), "JPEG", orientation, quality=95)
    assert decode._jpeg_orientation(payload) == orientation
    reference = upright(payload)
    fast = decode_image(payload, name="rotated.jpg")
    assert spy == ["RGB"]  # still decoded by simplejpeg
    assert fast.shape == (3, *reference.shape[:2]) and fast.is_contiguous()
    assert reference.shape[:2] == ((96, 64) if orientation >= 5 else (64, 96))
    assert np.abs(hwc(fast).astype(np.int16) - reference).mean() < 2
    # exactly the stored pixels, turned: the same transpose as Pillow's
    plain = decode_image(with_orientation(Image.fromarray(scene), "JPEG", None, quality=95))
    turned = np.asarray(ImageOps.exif_transpose(_exif_image(hwc(plain), orientation)))
    assert np.array_equal(hwc(fast), turned)
    assert decode.image_size(payload) == reference.shape[:2]
    monkeypatch.setattr(decode, "_simplejpeg", None)
    assert np.array_equal(hwc(decode_image(payload)), reference)  # Pillow path: exactly Pillow's


def _exif_image(array: np.ndarray, orientation: int) -> Image.Image:
    """A Pillow image of ``array`` carrying the EXIF ``orientation`` (PNG round trip)."""
    return Image.open(io.BytesIO(with_orientation(Image.fromarray(array), "PNG", orientation)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_of_other_formats_and_never_of_labels(scene, orientation):
    for fmt in ("PNG", "WEBP", "TIFF"):
        options = {"lossless": True} if fmt == "WEBP" else {}
        payload = with_orientation(Image.fromarray(scene), fmt, orientation, **options)
        reference = upright(payload)
        assert np.array_equal(hwc(decode_image(payload, name=f"x.{fmt}")), reference), fmt
        assert decode.image_size(payload) == reference.shape[:2], fmt
    gray16 = Image.fromarray(scene[..., 0].astype(np.uint16) * 257)
    payload = with_orientation(gray16, "PNG", orientation)
    expected = _apply_reference(scene[..., 0], orientation)
    assert np.array_equal(decode_image(payload)[1].numpy(), expected)  # mode conversion, then turned
    label = with_orientation(Image.fromarray(scene[..., 1]), "PNG", orientation)
    assert np.array_equal(decode.decode_label(label).numpy(), scene[..., 1])  # labels as stored


def _apply_reference(gray: np.ndarray, orientation: int) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(_exif_image(gray, orientation)))


def test_cmyk_jpeg_with_orientation_is_turned_by_the_pillow_path(scene, spy):
    payload = with_orientation(Image.fromarray(scene).convert("CMYK"), "JPEG", 8, quality=95)
    out = decode_image(payload)
    assert spy == [] and np.array_equal(hwc(out), upright(payload)) and out.shape == (3, 96, 64)


def exif_block(order: bytes, entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """b"Exif\\0\\0" + a TIFF header + IFD0 with ``(tag, type, count, 4-byte value)`` entries."""
    e = "<" if order == b"II" else ">"
    ifd = struct.pack(e + "H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack(e + "HHI", tag, kind, count) + value
    return b"Exif\x00\x00" + order + struct.pack(e + "HI", 42, 8) + ifd + struct.pack(e + "I", 0)


def jpeg_with_app1(base: bytes, *segments: bytes) -> bytes:
    """``base`` JPEG with APP1 segments inserted right after SOI."""
    inserted = b"".join(b"\xff\xe1" + struct.pack(">H", len(s) + 2) + s for s in segments)
    return base[:2] + inserted + base[2:]


def test_jpeg_orientation_header_walk(scene, spy, monkeypatch):
    base = jpeg(Image.fromarray(scene), quality=90)
    assert decode._jpeg_orientation(base) == 1  # no Exif segment
    big_endian = jpeg_with_app1(
        base, exif_block(b"MM", [(0x0110, 2, 4, b"cam\x00"), (0x0112, 3, 1, b"\x00\x06\x00\x00")])
    )
    little = jpeg_with_app1(base, exif_block(b"II", [(0x0112, 3, 1, b"\x03\x00\x00\x00")]))
    no_tag = jpeg_with_app1(base, exif_block(b"II", [(0x0110, 2, 4, b"cam\x00")]))
    assert [decode._jpeg_orientation(p) for p in (big_endian, little, no_tag)] == [6, 3, 1]
    # unsure -> None: Pillow reads the orientation (and decodes the pixels)
    long_tag = jpeg_with_app1(base, exif_block(b"II", [(0x0112, 4, 1, b"\x06\x00\x00\x00")]))
    twice = jpeg_with_app1(
        base,
        exif_block(b"II", [(0x0112, 3, 1, b"\x06\x00\x00\x00")]),
        exif_block(b"II", [(0x0112, 3, 1, b"\x03\x00\x00\x00")]),
    )
    xmp = jpeg_with_app1(
        base, b'http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'
    )
    garbage = jpeg_with_app1(base, b"Exif\x00\x00garbage!")
    for payload in (long_tag, twice, xmp, garbage, base[:2] + b"\xff\xe1\xff\xff"):
        assert decode._jpeg_orientation(payload) is None
    references = [_apply_fast_reference(p) for p in (big_endian, little, no_tag)]
    spy.clear()
    for payload, reference in zip((big_endian, little, no_tag), references):
        assert np.array_equal(hwc(decode_image(payload)), reference)
    assert spy == ["RGB"] * 3  # the fast path, rotated or not
    spy.clear()
    for payload in (long_tag, xmp, garbage):  # Pillow decides: its getexif, or 1 for a corrupt block
        assert np.array_equal(hwc(decode_image(payload)), upright(payload))
        assert decode.image_size(payload) == upright(payload).shape[:2]
    assert spy == []
    assert hwc(decode_image(xmp)).shape == (96, 64, 3)  # Pillow honours XMP's tiff:Orientation


def _apply_fast_reference(payload: bytes) -> np.ndarray:
    """Pillow's upright image of ``payload``, pixels decoded by simplejpeg (bit-exact comparison)."""
    stored = simplejpeg.decode_jpeg(payload, colorspace="RGB")
    orientation = Image.open(io.BytesIO(payload)).getexif().get(0x0112, 1)
    return np.asarray(ImageOps.exif_transpose(_exif_image(stored, orientation)))


def test_sixteen_bit_images_are_scaled_as_opencv(tmp_path):
    """16-bit -> 8-bit is v >> 8 (OpenCV's, so mmseg's), for I;16 PNG/TIFF and 32-bit 'I' images."""
    values = np.array([[0, 255, 256, 257 * 7, 32767], [32768, 65279, 65280, 65534, 65535]], np.uint16)
    expected = (values >> 8).astype(np.uint8)
    for fmt in ("PNG", "TIFF"):
        out = decode_image(encoded16(Image.fromarray(values), fmt))
        assert out.dtype == torch.uint8 and torch.equal(out[0], torch.from_numpy(expected)), fmt
        assert torch.equal(out[0], out[2])
    wide = np.array([[-5, 300, 70000, 65535]], np.int32)  # 32-bit: clipped to 0..65535 first
    out = decode_image(encoded16(Image.fromarray(wide), "TIFF"))
    assert out[0].tolist() == [[0, 1, 255, 255]]
    floats = np.array([[-1.0, 0.4, 0.6, 127.5, 300.0]], np.float32)  # F: clipped to 0..255, rounded
    assert decode_image(encoded16(Image.fromarray(floats), "TIFF"))[0].tolist() == [[0, 0, 1, 128, 255]]


def encoded16(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_decode_error_names_and_pickles(tmp_path):
    error = DecodeError(tmp_path / "a.png", "unreadable image (x)")
    assert str(error).startswith(f"{tmp_path / 'a.png'}: ") and error.path == tmp_path / "a.png"
    assert str(pickle.loads(pickle.dumps(error))) == str(error)
    assert str(DecodeError("shard.tar:1.jpg: bad")) == "shard.tar:1.jpg: bad"
    with pytest.raises(DecodeError, match=r"^e\.png: unreadable image \(empty file\)"):
        decode_image(b"", name="e.png")
    with pytest.raises(DecodeError, match=r"^h\.png: unreadable image"):
        decode.image_size(b"not an image", name="h.png")
    with pytest.raises(FileNotFoundError, match="absent.png"):
        decode.image_size(tmp_path / "absent.png")
