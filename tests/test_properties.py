"""Whatever a user hands the readers, only the project's own error comes out, in one
line and at once: random and mutated bytes (hypothesis) into the IDX readers and the
image decoding of `predict` and the deployment kit, special files where a regular
file is expected, and SavedModel assets that do not fit the model.

The kit (export/serving_io.py) must agree with lenet-dist: the same file is refused
by both or read as the same pixels by both (the tests named "agree": a mutated or
generated file may still be valid). Random bytes are refused by both (the tests named
"are_refused").
"""

import contextlib
import functools
import gzip
import json
import math
import os
import re
import signal
from pathlib import Path

import hypothesis
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from lenet_dist import config as config_lib
from lenet_dist import data as data_lib
from lenet_dist import images
from lenet_dist import prediction as predict_lib
from lenet_dist import settings_io
from lenet_dist.errors import UserError
from tests.conftest import load_kit_module, make_special, returns_within, write_idx

ROOT = Path(__file__).resolve().parents[1]

# Reproducible in CI (the same examples every run, nothing read from or written to
# a local example database); a hang is caught per example by `time_limit` instead.
# LENET_DIST_FUZZ_EXAMPLES=20000 searches longer, locally.
FUZZ = settings(max_examples=int(os.environ.get("LENET_DIST_FUZZ_EXAMPLES", 300)),
                deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


kit = load_kit_module("serving_io")


@pytest.fixture(scope="module")
def tf():
    from lenet_dist.runtime import import_tensorflow

    return import_tensorflow()


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail the example instead of hanging the run (Python-level loops; pytest runs
    tests in the main thread, where SIGALRM is delivered)."""
    def expire(signum, frame):
        raise TimeoutError(f"no answer in {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(who: str, error_type, fn, path: Path):
    """fn(path)'s result, or the reason as a string when it raises `error_type` in
    one line; any other exception fails the test: that is the property. The kinds of
    outcome show in the statistics, to see that the inputs reach the decoders."""
    try:
        with time_limit(20):
            result = fn(path)
        event(f"{who}: read")
        return result
    except error_type as e:
        assert "\n" not in str(e), repr(str(e))
        reason = re.sub(r"\b(0x)?[0-9a-f]*\d[0-9a-f,x]*\b", "N",
                        str(e).replace(str(path), "FILE"))
        event(f"{who}: {reason[:60]}")
        return reason


def event(what: str) -> None:
    if currently_in_test_context():  # not in the plain tests that share the checks
        hypothesis.event(what)


# ---------------------------------------------------------------- valid seeds


def idx_bytes(array) -> bytes:
    array = np.asarray(array, np.uint8)
    return ((0x0800 | array.ndim).to_bytes(4, "big")
            + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes())


# 2x2 GIF of two frames, white and black checkers (LZW: a clear code before each pixel).
GIF = (b"GIF89a\x02\x00\x02\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00"
       b",\x00\x00\x00\x00\x02\x00\x02\x00\x00\x02\x04\x04\xc3\x10\x05\x00"
       b",\x00\x00\x00\x00\x02\x00\x02\x00\x00\x02\x04\x0cA0\x05\x00;")


def bmp_bytes(gray) -> bytes:
    """24-bit BMP of a [h, w] uint8 image (bottom-up rows padded to 4 bytes)."""
    h, w = gray.shape
    row = (3 * w + 3) // 4 * 4
    pixels = b"".join(np.repeat(gray[y], 3).tobytes().ljust(row, b"\0")
                      for y in range(h - 1, -1, -1))
    header = (b"BM" + (54 + len(pixels)).to_bytes(4, "little") + b"\0" * 4
              + (54).to_bytes(4, "little"))
    info = ((40).to_bytes(4, "little") + w.to_bytes(4, "little") + h.to_bytes(4, "little")
            + (1).to_bytes(2, "little") + (24).to_bytes(2, "little") + b"\0" * 24)
    return header + info + pixels


@functools.cache
def seeds() -> dict[str, bytes]:
    """One small valid file of each kind the readers take, by file name."""
    from lenet_dist.runtime import import_tensorflow

    tf = import_tensorflow()
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (28, 28, 1)).astype(np.uint8)
    small = rng.integers(0, 256, (5, 6, 1)).astype(np.uint8)
    alpha = np.concatenate([small, np.repeat(small, 3, -1)], -1)  # RGBA, 4 channels
    return {
        "images-idx3-ubyte": idx_bytes(img[None, ..., 0]),
        "images-idx3-ubyte.gz": gzip.compress(idx_bytes(img[None, ..., 0]), mtime=0),
        "labels-idx1-ubyte": idx_bytes(rng.integers(0, 10, 6)),
        "gray.png": tf.io.encode_png(small).numpy(),
        "rgba.png": tf.io.encode_png(alpha).numpy(),
        "img.jpg": tf.io.encode_jpeg(small, quality=90).numpy(),
        "img.gif": GIF,
        "img.bmp": bmp_bytes(small[..., 0]),
    }


SEED_NAMES = ["images-idx3-ubyte", "images-idx3-ubyte.gz", "labels-idx1-ubyte", "gray.png",
              "rgba.png", "img.jpg", "img.gif", "img.bmp"]
IDX_SEEDS = SEED_NAMES[:3]
MAGICS = [b"", b"\x00\x00\x08\x01", b"\x00\x00\x08\x03", b"\x1f\x8b\x08\x00",
          b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM"]

# Header-shaped values: sizes 0, 1, at and beyond every limit, and sign boundaries.
EDGES = [0, 1, 28, 255, 8192, 8193, 2**15, 2**16 - 1, 2**30, 2**31 - 1, 2**31, 2**32 - 1]
position = st.integers(0, 2**12)  # taken modulo the length; small ones hit the headers
mutation = st.one_of(
    st.tuples(st.just("flip"), position, st.integers(1, 255)),
    st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), position, st.integers(1, 64)),
    st.tuples(st.just("truncate"), position, st.just(0)),
    st.tuples(st.just("word"), position,
              st.tuples(st.sampled_from(EDGES), st.sampled_from([2, 4]),
                        st.sampled_from(["big", "little"]))),
)
mutations = st.lists(mutation, min_size=1, max_size=4)
random_bytes = st.tuples(st.sampled_from(MAGICS), st.binary(max_size=600))


def mutate(raw: bytes, ops) -> bytes:
    b = bytearray(raw)
    for op, pos, arg in ops:
        pos %= len(b) + 1
        if op == "flip" and b:
            b[pos % len(b)] ^= arg
        elif op == "insert":
            b[pos:pos] = arg
        elif op == "delete":
            del b[pos:pos + arg]
        elif op == "truncate":
            del b[pos:]
        elif op == "word":
            value, size, order = arg
            b[pos:pos + size] = (value % 256**size).to_bytes(size, order)
    return bytes(b)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def put(scratch: Path, name: str, raw: bytes) -> Path:
    path = scratch / name
    path.write_bytes(raw)
    return path


# ---------------------------------------------------------------- IDX readers


def check_idx_readers(path: Path):
    ours = outcome("lenet-dist", UserError, data_lib.read_idx, path)
    theirs = outcome("kit", kit.InputError, kit.read_idx, path)
    assert_alike(ours, theirs)


def assert_refused(ours, theirs):
    """Both readers refused (`outcome` gives a refusal as its reason, a string)."""
    read = [who for who, x in (("lenet-dist", ours), ("the kit", theirs))
            if not isinstance(x, str)]
    assert not read, f"read by {' and '.join(read)}, not refused"


def assert_alike(ours, theirs):
    """Both refused, or both read the same array."""
    refused = [isinstance(x, str) for x in (ours, theirs)]
    assert refused[0] == refused[1], f"lenet-dist refused: {refused[0]}, kit: {refused[1]}"
    if not refused[0]:
        np.testing.assert_array_equal(ours, theirs)


@FUZZ
@given(name=st.sampled_from(IDX_SEEDS), ops=mutations)
def test_both_readers_agree_on_mutated_idx_files(scratch, name, ops):
    check_idx_readers(put(scratch, name, mutate(seeds()[name], ops)))


@st.composite
def idx_files(draw) -> bytes:
    """IDX files built field by field: any type code and rank, dims from the edge
    values, a body of the size the header says when that is small, else a few bytes."""
    ndim = draw(st.integers(0, 5))
    dims = draw(st.lists(st.sampled_from(EDGES) | st.integers(0, 30),
                         min_size=ndim, max_size=ndim))
    code = draw(st.just(0x08) | st.sampled_from([0x09, 0x0B, 0x0D]))  # ubyte half the time
    size = math.prod(dims)
    body = draw(st.binary(min_size=size, max_size=size) if size <= 2048
                else st.binary(max_size=64))
    raw = bytes([0, 0, code, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims) + body
    return gzip.compress(raw, mtime=0) if draw(st.booleans()) else raw


@FUZZ
@given(raw=idx_files())
def test_both_readers_agree_on_generated_idx_files(scratch, raw):
    check_idx_readers(put(scratch, "generated-idx", raw))


def well_formed_idx(raw: bytes) -> bool:
    """An unsigned-byte IDX file of rank 1 or more whose size is the one its header
    says (not gzipped): what both readers must read, worked out here without them."""
    if len(raw) < 4 or raw[:3] != b"\0\0\x08" or raw[3] == 0:
        return False
    header = 4 + 4 * raw[3]
    dims = [int.from_bytes(raw[i:i + 4], "big") for i in range(4, header, 4)]
    return len(raw) >= header and len(raw) == header + math.prod(dims)


def random_file(raw: tuple[bytes, bytes]) -> bytes:
    """A magic number and random bytes, kept only when they are not by chance a valid
    IDX file: a 1-D header of 0 or a few entries followed by as many bytes is the one
    valid file random bytes reach (Hypothesis favours zeros). Images are not filtered:
    a PNG needs its CRCs, a JPEG its markers and tables, a GIF its LZW stream and a
    BMP a consistent header, and 2,000 random (not derandomized) examples of each
    were all refused; should one ever be read, this test fails and shows it."""
    data = raw[0] + raw[1]
    assume(not well_formed_idx(data))
    return data


def test_the_random_files_filter_only_valid_idx_files(scratch):
    """The filter keeps the "are_refused" tests honest: what it removes, both readers
    read; what it keeps includes the near misses."""
    for i, raw in enumerate([idx_bytes(np.zeros(0)), idx_bytes(np.arange(3)),
                             seeds()["labels-idx1-ubyte"], seeds()["images-idx3-ubyte"]]):
        assert well_formed_idx(raw), raw
        path = put(scratch, f"valid-{i}", raw)
        ours = outcome("lenet-dist", UserError, data_lib.read_idx, path)
        theirs = outcome("kit", kit.InputError, kit.read_idx, path)
        assert not isinstance(ours, str) and not isinstance(theirs, str), (ours, theirs)
    for raw in (b"", b"\0\0\x08\x01\0\0\0\x02\x07", b"\0\0\x08\0\x07",
                b"\0\0\x09\x01\0\0\0\x01\x07", b"\0\0\x08\x01\0\0",
                seeds()["images-idx3-ubyte.gz"], GIF):
        assert not well_formed_idx(raw), raw


@FUZZ
@given(raw=random_bytes)
def test_random_bytes_as_idx_are_refused(scratch, raw):
    path = put(scratch, "random-idx", random_file(raw))
    assert_refused(outcome("lenet-dist", UserError, data_lib.read_idx, path),
                   outcome("kit", kit.InputError, kit.read_idx, path))


# ---------------------------------------------------------------- images


def image_outcomes(path: Path):
    """predict's reader and the kit's: each one's batch, or its reason for refusing."""
    ours = outcome("predict", UserError, lambda p: images.load_inputs([str(p)]), path)
    theirs = outcome("kit", kit.InputError, lambda p: kit.load_images([str(p)]), path)
    return ours, theirs


def check_image_readers(path: Path):
    """predict's reader (images.load_inputs) and the kit's (load_images, which picks
    the image decoder by the file's suffix) refuse alike or read the same pixels."""
    ours, theirs = image_outcomes(path)
    assert_alike(*(x if isinstance(x, str) else x[0] for x in (ours, theirs)))
    return ours


@FUZZ
@given(name=st.sampled_from(SEED_NAMES), ops=mutations)
def test_both_readers_agree_on_mutated_inputs(scratch, name, ops):
    check_image_readers(put(scratch, name, mutate(seeds()[name], ops)))


@FUZZ
@given(raw=random_bytes, suffix=st.sampled_from([".png", ".jpg", ".gif", ".bmp", ".idx"]))
def test_random_bytes_as_inputs_are_refused(scratch, raw, suffix):
    assert_refused(*image_outcomes(put(scratch, "random" + suffix, random_file(raw))))


def test_the_seeds_themselves_are_read(scratch):
    """The mutations start from files both readers accept."""
    for name in SEED_NAMES:
        if name.startswith("labels"):
            assert kit.read_labels(put(scratch, name, seeds()[name])).shape == (6,)
            continue
        batch = check_image_readers(put(scratch, name, seeds()[name]))
        assert not isinstance(batch, str) and batch[0].shape == (1, 28, 28, 1), name


# ---------------------------------------------------------------- headers that claim a lot


def gif_frame(width: int, height: int, lzw: bytes = b"\x02\x02D\x01\x00") -> bytes:
    return (b",\x00\x00\x00\x00" + width.to_bytes(2, "little") + height.to_bytes(2, "little")
            + b"\x00" + lzw)


def gif(frames: list[bytes], screen: int = 1) -> bytes:
    return (b"GIF89a" + screen.to_bytes(2, "little") * 2 + b"\x80\x00\x00"
            + b"\xff\xff\xff\x00\x00\x00" + b"".join(frames) + b";")


def huge_jpeg(tf) -> bytes:
    """A real JPEG whose frame header (SOF0) claims 60000x60000 pixels."""
    raw = bytearray(tf.io.encode_jpeg(np.zeros((8, 8, 1), np.uint8)).numpy())
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5:sof + 9] = (60000).to_bytes(2, "big") * 2
    return bytes(raw)


HUGE = {  # name -> (bytes, given TensorFlow; what the message says)
    # TensorFlow sizes a GIF by its largest frame, not the screen the header names.
    "frame.gif": (lambda tf: gif([gif_frame(1, 1), gif_frame(60000, 60000)]),
                  "60000x60000 pixels"),
    # giflib holds every frame: 2,000 frames of 2000x2000 are 8e9 pixels.
    "frames.gif": (lambda tf: gif([gif_frame(2000, 2000)] * 2000, screen=2000),
                   "8,000,000,000"),
    "big.png": (lambda tf: b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
                + (100_000).to_bytes(4, "big") * 2 + b"\x08\x00\x00\x00\x00",
                "100000x100000 pixels"),
    "big.bmp": (lambda tf: b"BM" + b"\0" * 16 + (9000).to_bytes(4, "little")
                + (-(2**31)).to_bytes(4, "little", signed=True) + b"\0" * 40,
                "9000x2147483648 pixels"),
    "big.jpg": (huge_jpeg, "60000x60000 pixels"),
}


@pytest.mark.parametrize("name", list(HUGE))
def test_a_header_claiming_a_huge_image_is_refused_before_decoding(scratch, tf, name):
    make, message = HUGE[name]
    path = put(scratch, name, make(tf))
    with pytest.raises(UserError) as ours:
        with time_limit(5):
            images.load_inputs([str(path)])
    with pytest.raises(kit.InputError) as theirs:
        with time_limit(5):
            kit.read_image(path)
    assert message in str(ours.value) and "the limit is" in str(ours.value), ours.value
    assert "the limit is 8192 per side" in str(theirs.value), theirs.value


# ---------------------------------------------------------------- special files


READERS = {  # name -> (call, the error it may raise)
    "predict inputs": (lambda p: images.load_inputs([str(p)]), UserError),
    "predict --labels": (lambda p: data_lib.read_idx(p, data_lib.LABELS_MAGIC), UserError),
    "labels.txt": (lambda p: predict_lib.read_class_names(p), UserError),
    "kit images": (lambda p: kit.load_images([str(p)]), kit.InputError),
    "kit image": (lambda p: kit.read_image(p), kit.InputError),
    "kit idx": (lambda p: kit.read_idx(p), kit.InputError),
}
EXPECTED = {"fifo": "FIFO", "dev-zero": "device", "directory": "directory", "socket": "socket"}


@pytest.mark.parametrize("kind", list(EXPECTED))
@pytest.mark.parametrize("reader", list(READERS))
def test_special_files_are_refused_at_once(tmp_path, reader, kind):
    path = make_special(tmp_path, kind, ".png")
    call, error = READERS[reader]
    err = returns_within(10, call, path)
    assert isinstance(err, error), repr(err)
    msg = str(err)
    assert "\n" not in msg and str(path) in msg and EXPECTED[kind] in msg, msg


# ---------------------------------------------------------------- SavedModel assets


def tiny_savedmodel(tf, directory: Path, classes: int = 10, outputs=("logits",
                    "probabilities", "classes"), labels: bytes | None = None,
                    dtype: str = "uint8") -> Path:
    """A stand-in SavedModel with lenet-dist's signature (or another), built in a second."""
    class Tiny(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], dtype)])
        def serve(self, images):
            mean = tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2, 3])
            logits = mean[:, None] * tf.range(classes, dtype=tf.float32)[None] / 255.0
            out = {"logits": logits, "probabilities": tf.nn.softmax(logits),
                   "classes": tf.argmax(logits, axis=1)}
            return {k: out[k] for k in outputs}

    module = Tiny()
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})
    if labels is not None:
        (directory / "assets").mkdir(exist_ok=True)
        (directory / "assets" / "labels.txt").write_bytes(labels)
    return directory


@pytest.fixture(scope="module")
def idx_input(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("inputs") / "few-idx3-ubyte"
    return str(write_idx(path, np.full((3, 28, 28), 200)))


TEN = "".join(f"class {i}\n" for i in range(10)).encode()


@pytest.mark.parametrize("classes, outputs, labels, message", [
    (10, None, TEN.replace(b"class 9\n", b""),
     "assets/labels.txt has 9 class names for the model's 10 classes; it needs one name "
     "per line, in class order"),
    (10, None, TEN + b"extra\n", "has 11 class names for the model's 10 classes"),
    (10, None, b"\xff\xfe" + TEN, "assets/labels.txt is not UTF-8 text (invalid start byte "
     "at byte 0); it should hold one class name per line"),
    (10, ("logits",), TEN, "serving_default signature has outputs ['logits'], not "
     "probabilities and classes; is it a lenet-dist export?"),
    (10, ("logits", "probabilities"), TEN, "not classes"),
])
def test_a_savedmodel_whose_assets_or_outputs_do_not_fit_is_one_line(
        tmp_path, tf, idx_input, classes, outputs, labels, message):
    kw = {"outputs": outputs} if outputs else {}
    model = tiny_savedmodel(tf, tmp_path / "m", classes, labels=labels, **kw)
    with pytest.raises(UserError) as err:
        predict_lib.predict([idx_input], model=str(model))
    assert message in str(err.value) and "\n" not in str(err.value), err.value
    if outputs is None:  # the kit refuses the same labels file
        with pytest.raises(kit.InputError, match="not 10 class names, one per line"):
            kit.class_names(model)


def test_a_savedmodel_that_does_not_take_uint8_images_is_one_line(tmp_path, tf, idx_input):
    model = tiny_savedmodel(tf, tmp_path / "m", dtype="float32", labels=TEN)
    with pytest.raises(UserError) as err:
        predict_lib.predict([idx_input], model=str(model))
    assert f"{model} fails to run on TensorFlow" in str(err.value), err.value
    assert "expected to be a float tensor but is a uint8 tensor" in str(err.value)

    class OtherInput(tf.Module):  # an input called x, not images
        @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.uint8)])
        def serve(self, x):
            return {"classes": tf.zeros(tf.shape(x)[:1], tf.int64)}

    module = OtherInput()
    tf.saved_model.save(module, str(tmp_path / "x"), signatures={"serving_default": module.serve})
    with pytest.raises(UserError) as err:
        predict_lib.predict([idx_input], model=str(tmp_path / "x"))
    assert str(err.value).startswith(f"{tmp_path / 'x'}'s serving_default signature does not "
                                     "take images uint8 [n, 28, 28, 1]: "), err.value
    assert "\n" not in str(err.value)


def test_a_savedmodel_without_labels_names_its_classes_by_number(tmp_path, tf, idx_input):
    model = tiny_savedmodel(tf, tmp_path / "m", classes=3)
    result = predict_lib.predict([idx_input], model=str(model), top=3)
    assert [c for c, _ in result["rows"][0][1]] == ["2", "1", "0"]


def test_a_fifo_labels_file_in_a_savedmodel_is_one_line(tmp_path, tf, idx_input):
    model = tiny_savedmodel(tf, tmp_path / "m")
    (model / "assets").mkdir(exist_ok=True)
    os.mkfifo(model / "assets" / "labels.txt")
    err = returns_within(30, predict_lib.predict, [idx_input], str(model))
    assert isinstance(err, UserError) and str(err) == (
        f"{model / 'assets' / 'labels.txt'} is a FIFO, not a regular file"), err


# ---------------------------------------------------------------- settings files (YAML)

FIELD_NAMES = sorted(config_lib.FIELDS)


@st.composite
def aliased_yaml(draw) -> str:
    """A settings file whose values are built from anchors and aliases: up to 9 levels
    of up to 12 aliases each (10**9 and more items once expanded), used as a field's
    value, inside a list, as a merge or as a key, in flow or block style."""
    levels = draw(st.integers(1, 9))
    fan = draw(st.integers(1, 12))
    leaf = draw(st.sampled_from(['"x"', "1", "1.5", "{a: 1}", "null", "[]"]))
    lines = [f"a0: &a0 [{', '.join([leaf] * fan)}]"]
    for i in range(1, levels):
        items = [f"*a{i - 1}"] * fan
        if draw(st.booleans()):
            lines.append(f"a{i}: &a{i} [{', '.join(items)}]")
        else:
            lines += [f"a{i}: &a{i}", *(f"  - {item}" for item in items)]
    last = f"*a{levels - 1}"
    use = draw(st.sampled_from([f"{{key}}: {last}", f"{{key}}: [1, {last}]", f"<<: {last}",
                                f"? {last}\n: 1", f"{{key}}: {{{{x: {last}}}}}"]))
    lines.append(use.format(key=draw(st.sampled_from(FIELD_NAMES))))
    if draw(st.booleans()):  # the anchors after valid settings, not first
        lines.insert(0, "epochs: 2")
    return "\n".join(lines) + "\n"


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=aliased_yaml())
def test_yaml_aliases_are_refused_at_once_however_nested(tmp_path, text):
    """No alias reaches a setting: the first is refused, in one short line, before
    anything walks the value it stands for."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with time_limit(1):
        with pytest.raises(UserError) as err:
            settings_io.read_settings(str(path))
    message = str(err.value)
    assert "\n" not in message and len(message) < len(str(path)) + 200, message
    assert "a config file cannot use aliases; write the value out" in message, message


@st.composite
def keys_with_a_repeat(draw) -> tuple[list[str], str]:
    """Field names with at least one given twice (more may repeat too), and the first
    that comes a second time: the one the error must name."""
    keys = draw(st.lists(st.sampled_from(FIELD_NAMES), min_size=1, max_size=7))
    again = draw(st.sampled_from(keys))
    at = draw(st.integers(keys.index(again) + 1, len(keys)))  # after its first time
    keys.insert(at, again)
    return keys, next(k for i, k in enumerate(keys) if k in keys[:i])


def settings_file(directory: Path, keys: list[str], suffix: str) -> Path:
    """The keys with the preset's own values, so only a repetition can be wrong."""
    defaults = config_lib.Config()
    pairs = [f"{json.dumps(k)}: {json.dumps(getattr(defaults, k))}" for k in keys]
    path = directory / f"run{suffix}"
    path.write_text("{" + ", ".join(pairs) + "}" if suffix == ".json"
                    else "\n".join(pairs) + "\n")
    return path


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=keys_with_a_repeat(), suffix=st.sampled_from([".json", ".yaml"]))
def test_a_key_given_twice_is_refused_not_last_wins(tmp_path, keys, suffix):
    """Settings with any field repeated are refused naming the first repeated key."""
    keys, repeated = keys
    with pytest.raises(UserError, match=f"key '{repeated}' is given twice"):
        settings_io.read_settings(str(settings_file(tmp_path, keys, suffix)))


@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=st.lists(st.sampled_from(FIELD_NAMES), min_size=1, max_size=8, unique=True),
       suffix=st.sampled_from([".json", ".yaml"]))
def test_distinct_keys_are_all_read(tmp_path, keys, suffix):
    """The other side of the refusal: no repetition, every key is read."""
    path = settings_file(tmp_path, keys, suffix)
    assert set(settings_io.read_settings(str(path))) == set(keys)
