"""Image files: predict and the deployment kit decode every format alike."""

import numpy as np

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
    }
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
        paths = [str(tmp_path / name)]
        ours = load_inputs(paths)[0][0]
        np.testing.assert_array_equal(ours, img, err_msg=name)
        np.testing.assert_array_equal(kit.load_images(paths, tf)[0][0], ours, err_msg=name)

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
