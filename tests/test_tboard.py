import io
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lenet_dist.errors import Failure, UserError
from lenet_dist.tboard import (RIGHT, WRONG, Board, ProfileWindow, caption_font,
                               drawable_name, grid_image,
                               parse_profile_steps, read_board, read_events)

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot")
# Bitmap font: 12 px lines, "(T-shirt/top)" is 78 px, narrower than an 84 px image.
CELL_W, CELL_H = 84 + 6, 2 * 12 + 84 + 6


def batch(n=40, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28, 1)).astype(np.uint8)
    labels = rng.integers(0, 10, n)
    predictions = labels.copy()
    predictions[1::3] = (labels[1::3] + 1) % 10  # every third from the second is wrong
    return images, labels, predictions


def event_file(logdir):
    (path,) = logdir.glob("events.out.tfevents.*")
    return path


def test_scalars_hparams_and_image_grid_read_back_exactly(tmp_path):
    logdir = tmp_path / "tb"
    images, labels, predictions = batch()
    with Board(logdir) as board:
        for step in (1, 2, 3):
            board.scalars(step, {"train/loss": 1.5 / step, "lr": 0.1, "images_per_sec": 640})
        board.scalars(3, {"test/accuracy": 0.875})
        board.image_grid("test/predictions", 3, images, labels, predictions, FASHION)
        board.hparams({"learning_rate": 0.003, "optimizer": "adam", "epochs": 2,
                       "nesterov": False, "warmup_epochs": None, "shape": (28, 28),
                       "seed": np.int64(7)}, {"final/test_accuracy": 0.875}, step=3)
    contents = read_board(logdir)

    f32 = lambda v: float(np.float32(v))  # noqa: E731 - scalars are stored as float32
    assert contents.scalars == read_events(logdir)
    assert contents.scalars == {
        "train/loss": [(1, 1.5), (2, 0.75), (3, 0.5)],
        "lr": [(s, f32(0.1)) for s in (1, 2, 3)],
        "images_per_sec": [(s, 640.0) for s in (1, 2, 3)],
        "test/accuracy": [(3, 0.875)],
        "final/test_accuracy": [(3, 0.875)]}
    assert contents.hparams == {"learning_rate": 0.003, "optimizer": "adam", "epochs": 2.0,
                                "nesterov": False, "warmup_epochs": "none",
                                "shape": "(28, 28)", "seed": 7.0}
    assert contents.hparam_metrics == ["final/test_accuracy"]

    [(step, png)] = contents.images["test/predictions"]
    assert step == 3
    grid = np.asarray(Image.open(io.BytesIO(png)))
    assert grid.shape == (4 * CELL_H, 8 * CELL_W, 3)  # 32 of 40 images, 8 a row
    assert np.array_equal(grid, grid_image(images, labels, predictions, FASHION))


def test_image_grid_cells_show_the_image_and_colour_the_caption():
    images, labels, predictions = batch(n=10)
    grid = grid_image(images, labels, predictions, FASHION, n=10)
    assert grid.shape == (2 * CELL_H, 8 * CELL_W, 3)
    for k in range(10):
        y, x = (k // 8) * CELL_H, (k % 8) * CELL_W
        picture = grid[y + 3 + 24: y + 3 + 24 + 84, x + 3: x + 3 + 84]
        expected = images[k, :, :, 0].repeat(3, 0).repeat(3, 1)
        assert all(np.array_equal(picture[..., c], expected) for c in range(3))
        caption = grid[y: y + 3 + 24, x: x + CELL_W].reshape(-1, 3)
        right = labels[k] == predictions[k]
        colour = np.array(RIGHT if right else WRONG)
        other = np.array(WRONG if right else RIGHT)
        assert (caption == colour).all(axis=1).any(), k
        assert not (caption == other).all(axis=1).any(), k
        second_line = grid[y + 3 + 12: y + 3 + 24, x: x + CELL_W].reshape(-1, 3)
        assert (second_line == colour).all(axis=1).any() == (not right), k  # true class


def test_disabled_board_creates_nothing_and_imports_nothing_heavy(tmp_path):
    logdir = tmp_path / "tb"
    code = f"""
import sys
from lenet_dist.tboard import Board, ProfileWindow
with Board({str(logdir)!r}, enabled=False) as board:
    board.scalars(1, {{"train/loss": 1.0}})
    board.hparams({{"lr": 0.1}}, {{"final/loss": 1.0}})
    board.image_grid("x", 1, None, None, None, ())
    board.flush()
window = ProfileWindow(None, {str(logdir)!r})
for step in (1, 2):
    window.before_step(step)
    window.after_step(step)
window.close()
assert not board.enabled
heavy = {{"tensorboardX", "jax", "PIL", "numpy"}} & set(sys.modules)
assert not heavy, heavy
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert not logdir.exists()


def test_an_unusable_logdir_is_a_user_error(tmp_path):
    (tmp_path / "tb").write_text("a file, not a directory")
    with pytest.raises(UserError, match="cannot write TensorBoard events in .*tb: "):
        Board(tmp_path / "tb")


@pytest.mark.parametrize("damage", ["cut footer", "cut data", "cut header", "bad data crc",
                                    "bad length", "garbage tail"])
def test_a_damaged_tail_is_read_up_to_the_last_good_record(tmp_path, damage):
    with Board(tmp_path) as board:
        for step in range(1, 6):
            board.scalars(step, {"train/loss": float(step)})
    path = event_file(tmp_path)
    raw = bytearray(path.read_bytes())
    last = 0  # where the step-5 event, the last record, starts: walk the framing
    while last + 16 + int.from_bytes(raw[last: last + 8], "little") < len(raw):
        last += 16 + int.from_bytes(raw[last: last + 8], "little")
    if damage == "cut footer":
        raw = raw[:-2]
    elif damage == "cut data":
        raw = raw[:-10]
    elif damage == "cut header":
        raw = raw[: last + 5]
    elif damage == "bad data crc":
        raw[-6] ^= 0xFF
    elif damage == "bad length":
        raw[last] ^= 0x01
    else:
        raw += b"\x00" * 7
    path.write_bytes(bytes(raw))
    expected = [(s, float(s)) for s in range(1, 6 if damage == "garbage tail" else 5)]
    assert read_events(tmp_path) == {"train/loss": expected}


def test_a_file_the_writer_never_flushed_reads_as_empty(tmp_path):
    (tmp_path / "events.out.tfevents.1.host").write_bytes(b"")
    (tmp_path / "events.out.tfevents.2.host").write_bytes(b"\x05")
    assert read_events(tmp_path) == {}


def test_a_resumed_run_hides_the_steps_it_logs_again(tmp_path):
    with Board(tmp_path) as board:
        for step in range(1, 6):
            board.scalars(step, {"train/loss": float(step)})
    # Resumed from a checkpoint at step 3, in the same second: a second file.
    with Board(tmp_path, purge_step=4) as board:
        for step in range(4, 7):
            board.scalars(step, {"train/loss": 10.0 * step})
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert read_events(tmp_path) == {"train/loss": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0),
                                                    (5, 50.0), (6, 60.0)]}


@pytest.mark.parametrize("spec, expected", [("2:3", (2, 3)), ("5:5", (5, 5)),
                                            (" 1 : 10 ", (1, 10))])
def test_profile_steps_parse(spec, expected):
    assert parse_profile_steps(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("3", "is not A:B"), ("a:b", "is not A:B"), ("", "is not A:B"), ("1:2:3", "is not A:B"),
    ("-1:3", "is not A:B"), ("0:3", "steps start at 1"), ("5:2", "A must not be after B")])
def test_bad_profile_steps_are_one_line_user_errors(spec, message):
    with pytest.raises(UserError, match=message) as info:
        parse_profile_steps(spec)
    assert str(info.value).startswith(f"--profile-steps {spec!r}")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError):
        ProfileWindow(spec, "unused")


def traces(logdir):
    return sorted(logdir.glob("plugins/profile/*/*.xplane.pb"))


def run_steps(window, steps):
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    x = jnp.ones((16, 16))
    active = []
    for step in steps:
        window.before_step(step)
        active.append(window.active)
        y = f(x + step)
        window.after_step(step, y)
    return active


def test_profile_window_traces_steps_2_to_3(tmp_path):
    window = ProfileWindow("2:3", tmp_path)
    assert run_steps(window, range(1, 6)) == [False, True, True, False, False]
    window.close()
    assert window.traced and not window.active
    [trace] = traces(tmp_path)
    assert trace.stat().st_size > 0


def test_close_stops_a_trace_the_run_ended_inside(tmp_path):
    with ProfileWindow("2:9", tmp_path) as window:
        # A run resumed at step 3, inside the window, ends at 5.
        assert run_steps(window, range(3, 6)) == [True, True, True]
    assert window.traced and not window.active
    assert len(traces(tmp_path)) == 1


def test_profile_window_outside_the_run_traces_nothing(tmp_path):
    window = ProfileWindow("7:9", tmp_path)
    assert run_steps(window, range(1, 6)) == [False] * 5
    window.close()
    assert not window.traced and not tmp_path.joinpath("plugins").exists()


def test_a_trace_already_running_is_a_failure(tmp_path):
    jax.profiler.start_trace(str(tmp_path / "other"))
    try:
        with pytest.raises(Failure, match="--profile-steps: cannot start the profiler: "):
            ProfileWindow("1:2", tmp_path).before_step(1)
    finally:
        jax.profiler.stop_trace()


# ------------------------------------------------------------------ failing writes


def test_a_full_disk_in_the_writer_thread_is_one_failure_and_no_traceback(
        tmp_path, monkeypatch, capfd):
    """tensorboardX writes in its own thread: an ENOSPC there printed the thread's
    traceback (13 lines) before the run's error line. Now the Board raises it at its
    next call, as one Failure, and nothing is printed."""
    import errno
    import time

    from tensorboardX.event_file_writer import EventsWriter

    board = Board(tmp_path / "tb")
    board.scalars(1, {"loss": 1.0})
    board.flush()

    def full(self, event):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(EventsWriter, "write_event", full)
    board.scalars(2, {"loss": 0.5})  # the thread meets the error
    worker = board._writer.file_writer.event_writer._worker
    deadline = time.monotonic() + 10  # until the thread has met it (or died of it)
    while (getattr(getattr(board, "_guard", None), "error", None) is None
           and worker.is_alive() and time.monotonic() < deadline):
        time.sleep(0.01)
    with pytest.raises(Failure, match=r"^cannot write TensorBoard events in .*tb: "
                                      r"No space left on device$"):
        board.scalars(3, {"loss": 0.25})
    board.close()  # the failed writer is dropped: nothing more to say, nothing blocks
    board.flush()
    assert capfd.readouterr().err == ""


def test_a_full_disk_at_flush_is_one_failure(tmp_path, monkeypatch, capfd):
    import errno

    from tensorboardX.event_file_writer import EventsWriter

    board = Board(tmp_path / "tb")
    board.scalars(1, {"loss": 1.0})

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(EventsWriter, "flush", full)
    with pytest.raises(Failure, match="No space left on device$"):
        board.flush()
    board.close()
    assert "Traceback" not in capfd.readouterr().err


def test_a_failed_gs_upload_warns_once_and_is_retried_at_the_next_flush(
        tmp_path, monkeypatch):
    from lenet_dist import gcs

    copied, failing = tmp_path / "bucket", [True]
    copied.mkdir()
    real = gcs.upload_tree

    def upload(local, url, done=None, last=None):
        if failing[0]:
            raise OSError(f"cannot write {url}/x: HttpError: 503 Service Unavailable")
        real(local, copied, done, last)

    monkeypatch.setattr(gcs, "upload_tree", upload)
    warnings = []
    board = Board("gs://bucket/run/tb", warn=warnings.append)
    board.scalars(1, {"loss": 1.0})
    board.flush()
    board.scalars(2, {"loss": 0.5})
    board.flush()
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("warning: cannot copy TensorBoard events to "
                                  "gs://bucket/run/tb: cannot write gs://bucket/run/tb/x: "
                                  "HttpError: 503"), warnings
    assert warnings[0].endswith("trying again at the next flush")
    failing[0] = False
    board.scalars(3, {"loss": 0.25})
    board.close()
    assert read_events(copied) == {"loss": [(1, 1.0), (2, 0.5), (3, 0.25)]}
    assert len(warnings) == 1


def test_a_gs_upload_still_failing_at_close_keeps_the_events_and_says_where(
        tmp_path, monkeypatch):
    from lenet_dist import gcs

    def upload(local, url, done=None, last=None):
        raise OSError("cannot write: HttpError: 403 Forbidden")

    monkeypatch.setattr(gcs, "upload_tree", upload)
    warnings = []
    board = Board("gs://bucket/run/tb", warn=warnings.append)
    board.scalars(1, {"loss": 1.0})
    board.close()
    assert len(warnings) == 1, warnings
    kept = warnings[0].rpartition("they are left in ")[2]
    try:
        assert read_events(kept) == {"loss": [(1, 1.0)]}
    finally:
        shutil.rmtree(kept)


# Class names a folder can hold that Latin-1 cannot: Cyrillic, CJK, a decomposed "café"
# with a zero-width space and a right-to-left mark, Hebrew.
UNICODE_NAMES = ("кошка", "猫", "cafe\u0301\u200b\u200f", "שלום", "собака")


def test_image_grid_draws_class_names_outside_latin_1(tmp_path):
    images, labels, predictions = batch(n=10)
    labels, predictions = labels % 5, predictions % 5
    logdir = tmp_path / "tb"
    with Board(logdir) as board:  # was: UnicodeEncodeError ('latin-1' codec) at epoch 1
        board.image_grid("test/predictions", 1, images, labels, predictions, UNICODE_NAMES)
    [(step, png)] = read_board(logdir).images["test/predictions"]
    grid = np.asarray(Image.open(io.BytesIO(png)))
    assert np.array_equal(grid, grid_image(images, labels, predictions, UNICODE_NAMES, n=10))
    # Each cell's caption is drawn in its colour, and different names draw differently.
    cell_w, cell_h = grid.shape[1] // 8, grid.shape[0] // 2
    captions = {}
    for k in range(10):
        y, x = (k // 8) * cell_h, (k % 8) * cell_w
        caption = grid[y: y + cell_h - 84 - 3, x: x + cell_w]
        colour = RIGHT if labels[k] == predictions[k] else WRONG
        assert (caption.reshape(-1, 3) == colour).all(axis=1).any(), k
        if labels[k] == predictions[k]:
            captions.setdefault(int(predictions[k]), caption.tobytes())
    assert len(set(captions.values())) == len(captions) > 1


def test_caption_font_keeps_the_bitmap_font_for_latin_1_and_escapes_what_no_font_has():
    from PIL import ImageFont

    font, write = caption_font(["T-shirt/top", "Café"])
    assert isinstance(font, ImageFont.ImageFont) and write("Café") == "Café"
    font, write = caption_font(["кошка", "a\U0010fffd"])  # a private-use character
    assert isinstance(font, ImageFont.FreeTypeFont)
    assert write("кошка") == "кошка"
    assert write("a\U0010fffd") == "a\\U0010fffd"
    assert drawable_name("cafe\u0301\u200b\u200f") == "café"
    assert drawable_name("\u200b") == "\\u200b"  # nothing visible: shown escaped
