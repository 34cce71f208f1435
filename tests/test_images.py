"""Image files: predict and the deployment kit decode every format alike."""

import io

import numpy as np
import pytest
from PIL import Image

from lenet_dist import image_decode, images
from lenet_dist.cli import main
from tests.conftest import load_kit_module, png_bytes


# 1x1 GIF, one opaque white pixel (GIF cannot be written by TensorFlow).
WHITE_GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00"
             b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")


def bmp_bytes(gray):
    """24-bit BMP of a [h, w] uint8 image (bottom-up rows padded to 4 bytes)."""
    h, w = gray.shape
    row = (3 * w + 3) // 4 * 4
    pixels = b"".join(np.repeat(gray[y], 3).tobytes().ljust(row, b"\0")
                      for y in range(h - 1, -1, -1))
    header = b"BM" + (54 + len(pixels)).to_bytes(4, "little") + b"\0" * 4 + \
        (54).to_bytes(4, "little")
    info = (40).to_bytes(4, "little") + w.to_bytes(4, "little") + h.to_bytes(4, "little") + \
        (1).to_bytes(2, "little") + (24).to_bytes(2, "little") + b"\0" * 24
    return header + info + pixels


def test_every_image_format_decodes_alike_in_predict_and_the_kit(dataset, tmp_path):
    """RGB, gray+alpha and RGBA PNG, BMP and GIF; transparency is the dataset's black
    background; lenet-dist and the TF-only kit read the same pixels."""
    import tensorflow as tf

    from lenet_dist.images import load_inputs

    kit = load_kit_module("serving_io")
    img = dataset.test.images[0]  # [28, 28, 1], light object on black
    alpha = np.where(img > 0, 255, 0).astype(np.uint8)
    files = {
        "rgb.png": png_bytes(tf, np.repeat(img, 3, axis=-1)),
        "gray-alpha.png": png_bytes(tf, np.concatenate([img, alpha], -1)),
        # transparent pixels are white in colour: they must still read as black
        "rgba.png": png_bytes(tf, np.concatenate(
            [np.repeat(np.where(alpha > 0, img, 255), 3, -1), alpha], -1)),
        "img.bmp": bmp_bytes(img[..., 0]),
        # Pillow writes RGBA as a 32-bit BMP and reads its 4th byte back as padding;
        # TensorFlow read it as alpha, and so does lenet-dist
        "rgba.bmp": encode(np.concatenate(
            [np.repeat(np.where(alpha > 0, img, 255), 3, -1), alpha], -1), "BMP"),
        # a 4th byte that is 0 everywhere is padding: the image is opaque
        "rgbx.bmp": encode(np.concatenate(
            [np.repeat(img, 3, -1), np.zeros_like(img)], -1), "BMP"),
    }
    assert files["rgba.bmp"][28] == 32 and files["rgbx.bmp"][28] == 32  # bits per pixel
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
        paths = [str(tmp_path / name)]
        ours = load_inputs(paths)[0][0]
        np.testing.assert_array_equal(ours, img, err_msg=name)
        np.testing.assert_array_equal(kit.load_images(paths)[0][0], ours, err_msg=name)

    (tmp_path / "white.gif").write_bytes(WHITE_GIF)
    gif = load_inputs([str(tmp_path / "white.gif")])[0][0]
    assert gif.shape == (28, 28, 1) and np.all(gif == 255)
    assert np.all(load_inputs([str(tmp_path / "white.gif")], invert=True)[0][0] == 0)

    (tmp_path / "img.jpg").write_bytes(tf.io.encode_jpeg(img, quality=95).numpy())
    jpg = load_inputs([str(tmp_path / "img.jpg")])[0][0]
    assert np.mean(np.abs(jpg.astype(int) - img)) < 4  # lossy, but the same picture


def test_a_corrupt_jpeg_is_one_line_even_at_the_file_descriptor(exported, capfd, tmp_path):
    """libjpeg writes to fd 2 itself; predict keeps stderr to its one line."""
    import tensorflow as tf

    model, _ = exported
    good = tf.io.encode_jpeg(np.full((40, 30, 1), 200, np.uint8)).numpy()
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(good[:300])
    assert main(["predict", "--model", str(model), str(bad)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad} cannot be decoded as JPEG"), err


def encode(pixels, fmt, **options) -> bytes:
    """A Pillow-written file: `pixels` [h, w] or [h, w, 3|4] uint8, or an Image."""
    im = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    out = io.BytesIO()
    im.save(out, fmt, **options)
    return out.getvalue()


SIZES = [(1, 1), (27, 29), (28, 28), (56, 56), (100, 37), (300, 300), (1, 8192), (8192, 1)]


@pytest.mark.parametrize("height, width", SIZES)
def test_images_of_any_size_decode_alike_in_predict_and_the_kit(tmp_path, height, width):
    """RGBA PNG, RGB BMP and JPEG, palette GIF with a transparent entry: the kit's copy
    of the decoding and resize gives predict's pixels exactly, at every size."""
    from lenet_dist.images import load_inputs

    kit = load_kit_module("serving_io")
    rng = np.random.default_rng(height * 10_000 + width)
    rgba = rng.integers(0, 256, (height, width, 4)).astype(np.uint8)
    palette = Image.fromarray(rng.integers(0, 8, (height, width)).astype(np.uint8), "P")
    palette.putpalette(rng.integers(0, 256, 24).astype(np.uint8).tolist())
    files = {"rgba.png": encode(rgba, "PNG"), "rgb.bmp": encode(rgba[..., :3], "BMP"),
             "rgb.jpg": encode(rgba[..., :3], "JPEG", quality=90),
             "palette.gif": encode(palette, "GIF", transparency=3)}
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
        paths = [str(tmp_path / name)]
        ours = load_inputs(paths)[0]
        assert ours.shape == (1, 28, 28, 1), name
        np.testing.assert_array_equal(kit.load_images(paths)[0], ours, err_msg=name)
        inverted = load_inputs(paths, invert=True)[0]  # transparency: a light background
        assert inverted.shape == (1, 28, 28, 1), name


def test_a_28x28_image_reads_back_exactly(tmp_path):
    """Lossless formats give back the pixels (the resize is then the identity); JPEG
    the same picture within its loss."""
    from lenet_dist.images import load_inputs

    kit = load_kit_module("serving_io")
    gray = np.random.default_rng(28).integers(0, 256, (28, 28)).astype(np.uint8)
    files = {"gray.png": encode(gray, "PNG"), "rgb.png": encode(np.repeat(gray[..., None], 3, -1),
             "PNG"), "gray.bmp": encode(gray, "BMP"), "gray.gif": encode(gray, "GIF"),
             "gray.jpg": encode(gray, "JPEG", quality=95)}
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
        paths = [str(tmp_path / name)]
        ours = load_inputs(paths)[0][0, ..., 0]
        np.testing.assert_array_equal(kit.load_images(paths)[0][0, ..., 0], ours, err_msg=name)
        if name.endswith(".jpg"):
            assert np.mean(np.abs(ours.astype(int) - gray)) < 4
        else:
            np.testing.assert_array_equal(ours, gray, err_msg=name)
        np.testing.assert_array_equal(load_inputs(paths, invert=True)[0][0, ..., 0], 255 - ours)


@pytest.mark.parametrize("height, width", SIZES + [(13, 5000), (8192, 8192)])
def test_the_area_resize_is_tensorflows_bit_for_bit(height, width):
    """The numpy resize reproduces tf.image.resize(method="area") to the last bit, so
    the model sees the pixels it saw when TensorFlow decoded for predict."""
    import tensorflow as tf

    rng = np.random.default_rng(height + width)
    gray = (rng.integers(0, 256, (height, width, 1)) * np.float32(0.587)).astype(np.float32)
    expected = tf.image.resize(gray, (28, 28), method="area").numpy()
    np.testing.assert_array_equal(image_decode.resize_area(gray).view(np.uint32),
                                  expected.view(np.uint32))


def too_wide(kind: str) -> bytes:
    """A small valid file whose header claims 8193 pixels across."""
    raw = bytearray(encode(np.zeros((8, 8), np.uint8), kind.upper()))
    if kind == "png":
        raw[16:20] = (8193).to_bytes(4, "big")
    elif kind == "bmp":
        raw[18:22] = (8193).to_bytes(4, "little")
    elif kind == "gif":
        raw[6:8] = (8193).to_bytes(2, "little")  # the screen Pillow would allocate
    else:
        sof = raw.index(b"\xff\xc0")
        raw[sof + 7:sof + 9] = (8193).to_bytes(2, "big")
    return bytes(raw)


@pytest.mark.parametrize("kind", ["png", "bmp", "gif", "jpeg"])
def test_a_header_over_8192_wide_is_refused_by_the_kit_too(tmp_path, monkeypatch, kind):
    """The kit refuses it in lenet-dist's words, from the header: Pillow never opens it."""
    from lenet_dist.errors import UserError
    from lenet_dist.images import load_inputs

    kit = load_kit_module("serving_io")
    path = tmp_path / f"wide.{kind}"
    path.write_bytes(too_wide(kind))

    def never(*args, **kwargs):
        raise AssertionError("decoding started")

    monkeypatch.setattr(Image, "open", never)
    with pytest.raises(kit.InputError) as theirs:
        kit.read_image(path)
    with pytest.raises(UserError) as ours:
        load_inputs([str(path)])
    assert str(theirs.value) == str(ours.value) == (
        f"{path} is 8193x8 pixels; the limit is 8192 per side (resize it first)")


def test_the_kits_decoder_is_a_byte_identical_copy_of_predicts():
    """The kit cannot import lenet_dist, so it holds a copy of the decoder: the same
    file, byte for byte, and the kit's reader and predict's both decode through it."""
    from tests.conftest import ROOT

    ours = (ROOT / "lenet_dist" / "image_decode.py").read_bytes()
    theirs = (ROOT / "export" / "image_decode.py").read_bytes()
    assert theirs == ours, ("export/image_decode.py differs from lenet_dist/image_decode.py: "
                            "cp lenet_dist/image_decode.py export/")
    kit = load_kit_module("serving_io")
    assert kit.decoded.__module__ == "image_decode"
    assert images.decoded is image_decode.decoded
