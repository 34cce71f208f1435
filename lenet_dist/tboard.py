"""TensorBoard for one run: event files written with tensorboardX, read back
without TensorFlow, and a jax.profiler trace over chosen steps.

tensorboardX (~0.15 s with numpy), Pillow and jax are imported inside the code
that needs them: importing this module costs ~20 ms, a disabled Board nothing.
"""

from __future__ import annotations

import io
import math
import os
import re
import shutil
import struct
import sys
import time
import unicodedata
from functools import lru_cache
from importlib.util import find_spec
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping, Sequence

from lenet_dist import tempdirs
from lenet_dist.errors import Failure, UserError, first_line
from lenet_dist.records import EpochRecord

SCALE = 3  # 28 px -> 84 px: big enough to tell a shirt from a pullover
COLUMNS = 8
PAD = 3  # pixels around each cell's caption and image
BACKGROUND, RIGHT, WRONG = (40, 40, 40), (70, 210, 70), (240, 70, 70)
EVENT_FILES = "events.out.tfevents.*"
# TrueType fonts for class names the bitmap font cannot draw (it holds Latin-1 only),
# tried in order: by file name, which Pillow looks for in the system's font folders,
# then matplotlib's DejaVu Sans (when the report extra is installed), then Pillow's own.
FONT_FILES = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "NotoSansCJK-Regular.ttc",
              "NotoSansCJKsc-Regular.otf", "DroidSansFallbackFull.ttf", "wqy-microhei.ttc",
              "Arial Unicode.ttf", "arialuni.ttf")
FONT_SIZE = 11  # px: about the bitmap font's height


def is_remote(logdir: str | os.PathLike) -> bool:
    """gs:// and the like. Never through pathlib, which reads gs://b as the local gs:/b."""
    return "://" in os.fspath(logdir)


def warn_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def epoch_scalars(record: EpochRecord, lr: float) -> dict[str, float]:
    """An epoch record's TensorBoard scalars, logged at its step: tag -> value."""
    validation = {"validation/loss": record.validation_loss,
                  "validation/accuracy": record.validation_accuracy} \
        if record.has_validation else {}
    return {"train/loss": record.train_loss, "train/accuracy": record.train_accuracy,
            "test/loss": record.test_loss, "test/accuracy": record.test_accuracy,
            **validation, "lr": lr, "images_per_sec": record.images_per_sec}


class Board:
    """TensorBoard event files in `logdir`. A disabled Board (another process of
    the job, or --no-tensorboard) creates nothing and every method does nothing.

    `purge_step`: on a resumed run, the first step this run will log; TensorBoard
    (and `read_board`) then hide what an earlier run logged from that step on.

    A gs:// `logdir`: the events are written to a local temporary directory and each
    file is copied to `logdir` (through epath and gcsfs, like every other gs:// file)
    at `flush` (train flushes at every epoch end) and `close`. A run killed with
    SIGKILL loses the events since its last flush; its checkpoints do not depend on them.
    A copy that fails is a warning (once), tried again at the next flush; one still
    failing at `close` leaves the events in the staging directory, named.

    A local write that fails (a full disk) is a one-line Failure at the next call,
    whichever thread met it: tensorboardX writes in its own thread, which would
    otherwise die with a traceback and leave its queue to fill and block training.
    """

    def __init__(self, logdir: str | os.PathLike, enabled: bool = True,
                 purge_step: int | None = None, warn: Callable[[str], None] = warn_stderr):
        self.logdir = os.fspath(logdir) if is_remote(logdir) else Path(logdir)
        self._writer = None
        self._local: str | None = None  # the staging directory of a remote logdir
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._guard: _GuardedEvents | None = None
        self._warn = warn
        self._upload_failing = False  # warned once; the next flush tries again
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # late: module note

        # tensorboardX names files by the second and opens them with "wb": two
        # writers in one second would truncate each other's file without this
        # suffix, which also keeps their names in creation order.
        suffix = f".{time.time_ns()}.{os.getpid()}"
        if is_remote(logdir):
            self._local = tempdirs.mkdtemp("lenet-dist-tb-")
        try:
            self._writer = SummaryWriter(self._local or str(self.logdir), purge_step=purge_step,
                                         flush_secs=10, filename_suffix=suffix)
        except OSError as e:
            raise UserError(f"cannot write TensorBoard events in {self.logdir}: "
                            f"{e.strerror or e}") from None
        self._guard = _guard_writes(self._writer)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One point per tag at `step` (stored as float32, TensorBoard's format)."""
        if self._writer is None:
            return
        self._check()
        walltime = time.time()
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), int(step), walltime=walltime)

    def hparams(self, hparams: Mapping[str, object], metrics: Mapping[str, float],
                step: int = 0) -> None:
        """The run's config and final metrics for the HPARAMS tab. The metrics are
        also logged as scalars at `step`: the tab shows each tag's last value."""
        if self._writer is None:
            return
        from tensorboardX.summary import hparams as hparams_summaries  # late: module note

        self._check()
        values = {str(k): hparam_value(v) for k, v in hparams.items()}
        file_writer = self._writer.file_writer
        # Into this run's own file (add_hparams would open a sub-run per call), so
        # the session is the run and its metrics are the run's scalars.
        for summary in hparams_summaries(values, dict(metrics)):
            file_writer.add_summary(summary, int(step))
        self.scalars(step, metrics)

    def image_grid(self, tag: str, step: int, images, labels, predictions,
                   class_names: Sequence[str], n: int = 32) -> None:
        """The first `n` images with their predicted class, as one image."""
        if self._writer is None:
            return
        self._check()
        grid = grid_image(images, labels, predictions, class_names, n)
        self._writer.add_image(tag, grid, int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._writer is not None:
            self._check()
            try:
                self._writer.flush()
            except OSError as e:
                self._fail(e)
            self._check()
            self._upload()

    def close(self) -> None:
        """Flush and close; the Board does nothing afterwards."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                if self._guard is None or self._guard.error is None:
                    writer.close()  # a failed writer is dropped: its files stay as they are
            except OSError as e:
                self._fail(e)
            if self._guard is not None and self._guard.error is not None:
                self._fail(self._guard.error)
            kept = self._upload(final=True)
            if self._local is not None and not kept:
                shutil.rmtree(self._local, ignore_errors=True)

    def _check(self) -> None:
        """Raise what the writer thread met (once the Board is failed, it writes nothing)."""
        if self._guard is not None and self._guard.error is not None:
            self._fail(self._guard.error)

    def _fail(self, e: OSError) -> None:
        self._writer = None  # dropped, not closed: nothing more is written
        where = str(self.logdir)
        if self._local is not None:
            where = f"{self._local} (staged for {self.logdir})"
            shutil.rmtree(self._local, ignore_errors=True)
        raise Failure(f"cannot write TensorBoard events in {where}: "
                      f"{e.strerror or first_line(e)}")

    def _upload(self, final: bool = False) -> bool:
        """A remote logdir: copy the event files that grew since the last copy. A
        failure warns once and is tried again at the next flush; True when the final
        copy failed and the staging directory is kept for the user."""
        if self._local is None:
            return False
        from lenet_dist.gcs import upload_tree  # late: module note

        try:
            upload_tree(self._local, self.logdir, self._uploaded)
        except OSError as e:
            why = e.strerror or first_line(e)
            if final:
                self._warn(f"warning: cannot copy TensorBoard events to {self.logdir}: {why}; "
                           f"they are left in {self._local}")
                return True
            if not self._upload_failing:
                self._warn(f"warning: cannot copy TensorBoard events to {self.logdir}: {why}; "
                           "trying again at the next flush")
            self._upload_failing = True
            return False
        self._upload_failing = False
        return False

    def __enter__(self) -> Board:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the error already on its way is the one to report
            self.close()
        except Failure:
            pass


class _GuardedEvents:
    """tensorboardX's EventsWriter, shared by the writer thread and flush: the first
    OSError is kept (for the Board to raise) and everything after it is dropped, so
    the thread lives on, drains its queue, and prints nothing."""

    def __init__(self, events):
        self._events = events
        self.error: OSError | None = None

    def _guarded(self, name: str, *args) -> None:
        if self.error is not None:
            return
        try:
            getattr(self._events, name)(*args)
        except OSError as e:
            self.error = e

    def write_event(self, event) -> None:
        self._guarded("write_event", event)

    def flush(self) -> None:
        self._guarded("flush")

    def close(self) -> None:
        self._guarded("close")

    def __getattr__(self, name: str):
        return getattr(self._events, name)


def _guard_writes(writer) -> _GuardedEvents | None:
    """Put a _GuardedEvents between tensorboardX's writer thread (and flush) and the
    event file. None where tensorboardX's internals differ: then a thread's error
    prints as Python prints it, and flush and close still fail in one line."""
    event_writer = getattr(getattr(writer, "file_writer", None), "event_writer", None)
    worker = getattr(event_writer, "_worker", None)
    events = getattr(event_writer, "_ev_writer", None)
    if events is None or getattr(worker, "_record_writer", None) is not events:
        return None
    guard = _GuardedEvents(events)
    event_writer._ev_writer = worker._record_writer = guard
    return guard


def hparam_value(value: object) -> str | float | int | bool:
    """A config value as one of the types the hparams plugin shows (None -> "none")."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # a numpy or jax scalar
    if value is None:
        return "none"
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def grid_image(images, labels, predictions, class_names: Sequence[str], n: int = 32,
               scale: int = SCALE):
    """uint8 [H, W, 3]: up to `COLUMNS` cells a row, each an image upscaled `scale`
    times under its predicted class name, green if right, red with the true class
    in brackets if wrong."""
    import numpy as np  # late: module note
    from PIL import Image, ImageDraw, ImageFont  # late: module note

    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [n, h, w, 1], got {images.dtype} "
                         f"{list(images.shape)}")
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    count = min(n, len(images), len(labels), len(predictions))
    if count < 1:
        raise ValueError("no images to draw")

    def name(index) -> str:
        index = int(index)
        return class_names[index] if 0 <= index < len(class_names) else str(index)

    shown = [drawable_name(t) for t in (*class_names, *(name(i) for i in
                                                        (*labels[:count], *predictions[:count])))]
    font, write = caption_font(shown)
    line = (font.getbbox("Mg")[3] if isinstance(font, ImageFont.ImageFont)
            else sum(font.getmetrics())) + 1

    def caption(index) -> str:
        return write(drawable_name(name(index)))

    # Wide enough for any class's caption, so the grid's size depends on the classes.
    texts = [write(t) for t in shown]
    text_width = max(int(math.ceil(font.getlength(f"({t})"))) for t in texts)
    side_h, side_w = images.shape[1] * scale, images.shape[2] * scale
    cell_w = max(side_w, text_width) + 2 * PAD
    cell_h = 2 * line + side_h + 2 * PAD
    columns = min(COLUMNS, count)
    rows = -(-count // columns)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for k in range(count):
        x, y = (k % columns) * cell_w, (k // columns) * cell_h
        right = int(labels[k]) == int(predictions[k])
        captions = [caption(predictions[k])] + ([] if right else [f"({caption(labels[k])})"])
        for row, text in enumerate(captions):
            left = x + (cell_w - font.getlength(text)) / 2
            draw.text((left, y + PAD + row * line), text, fill=RIGHT if right else WRONG,
                      font=font)
        picture = Image.fromarray(images[k]).resize((side_w, side_h), Image.Resampling.NEAREST)
        grid.paste(picture.convert("RGB"), (x + (cell_w - side_w) // 2, y + PAD + 2 * line))
    return np.asarray(grid)


def drawable_name(name: str) -> str:
    """A class name as pictures show it: NFC (a decomposed "café" is drawn with one é), and
    without format characters (zero-width and direction marks), which are invisible and
    which a font without their glyph draws as a box. A name of nothing else is escaped."""
    text = "".join(c for c in unicodedata.normalize("NFC", name)
                   if unicodedata.category(c) != "Cf")
    return text or escaped(name)


def escaped(text: str) -> str:
    r"""Characters outside ASCII as \uXXXX: what no font can fail to draw."""
    return text.encode("ascii", "backslashreplace").decode("ascii")


def caption_font(texts: Sequence[str]) -> tuple[object, Callable[[str], str]]:
    r"""(the font to draw `texts` with, how to write a text in it). Latin-1 texts get the
    bitmap font, the same pixels on every host; others the first TrueType font with a
    glyph for each of their characters, else the one that lacks fewest, the rest written
    as \uXXXX: drawing a class name never fails a run, nor shows a box in its place."""
    from PIL import ImageFont  # late: module note

    bitmap = ImageFont.load_default_imagefont()
    if all(_is_latin1(t) for t in texts):
        return bitmap, str
    chars = set("".join(texts))
    best, lacking = None, chars
    for font in _truetype_fonts():
        missing = {c for c in chars if not _has_glyph(font, c)}
        if not missing:
            return font, str
        if best is None or len(missing) < len(lacking):
            best, lacking = font, missing
    if best is None:  # Pillow without FreeType: only the bitmap font draws
        return bitmap, lambda t: "".join(c if _is_latin1(c) else escaped(c) for c in t)
    return best, lambda t: "".join(escaped(c) if c in lacking else c for c in t)


def _is_latin1(text: str) -> bool:
    return all(ord(c) < 256 for c in text)


def _truetype_fonts() -> Iterator[object]:
    """The TrueType fonts of FONT_FILES found here, loaded once each when first needed."""
    for name in FONT_FILES:
        font = _truetype(name)
        if font is not None:
            yield font
    spec = find_spec("matplotlib")  # its path only: importing it costs 0.1 s
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            font = _truetype(os.path.join(folder, "mpl-data", "fonts", "ttf", "DejaVuSans.ttf"))
            if font is not None:
                yield font
    font = _truetype(None)
    if font is not None:
        yield font


@lru_cache(maxsize=None)
def _truetype(name: str | None):
    """A TrueType font by file name or path (None: Pillow's own), or None when there is
    none here or Pillow has no FreeType."""
    from PIL import ImageFont  # late: module note

    try:
        if name is None:
            font = ImageFont.load_default(FONT_SIZE)
            return font if isinstance(font, ImageFont.FreeTypeFont) else None
        return ImageFont.truetype(name, FONT_SIZE)
    except (OSError, ImportError, ValueError):
        return None


@lru_cache(maxsize=None)
def _notdef(font) -> tuple[tuple[int, int], bytes]:
    mask = font.getmask("\U0010ffff")  # a noncharacter: no font maps it
    return mask.size, bytes(mask)


@lru_cache(maxsize=4096)
def _has_glyph(font, char: str) -> bool:
    """Whether `font` draws `char` as something other than its missing-glyph box."""
    mask = font.getmask(char)
    return (mask.size, bytes(mask)) != _notdef(font)


@dataclass
class BoardContents:
    """What a run's event files hold, as TensorBoard would show it."""

    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    images: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)  # PNG bytes
    hparams: dict[str, str | float | bool] = field(default_factory=dict)  # last session's
    hparam_metrics: list[str] = field(default_factory=list)  # tags the experiment names


def read_events(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in `logdir`'s event files: tag -> [(step, value)] in order."""
    return read_board(logdir).scalars


def read_board(logdir: str | os.PathLike) -> BoardContents:
    """Scalars, images and hparams of the event files directly in `logdir`, read
    in file-name (creation) order, honouring purge steps as TensorBoard does."""
    from google.protobuf.message import DecodeError  # late: module note
    from tensorboardX.proto.event_pb2 import Event  # late: module note

    contents = BoardContents()
    if is_remote(logdir):
        from etils import epath  # late: module note

        folder = epath.Path(logdir)
    else:
        folder = Path(logdir)
    paths = sorted((p for p in folder.glob(EVENT_FILES) if p.is_file()), key=lambda p: p.name)
    for path in paths:
        for record in _records(io.BytesIO(path.read_bytes())):
            try:
                _add_event(contents, Event.FromString(record))
            except DecodeError:
                break  # a framed record that does not parse: trust nothing after it
    return contents


def _add_event(contents: BoardContents, event) -> None:
    from tensorboardX.proto.event_pb2 import SessionLog  # late: module note
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData  # late: module note

    if event.session_log.status == SessionLog.START:
        _purge(contents, event.step)
    for value in event.summary.value:
        kind = value.WhichOneof("value")
        if kind == "simple_value":
            contents.scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
        elif kind == "image":
            contents.images.setdefault(value.tag, []).append(
                (event.step, value.image.encoded_image_string))
        elif value.metadata.plugin_data.plugin_name == "hparams":
            data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
            if data.HasField("session_start_info"):
                contents.hparams = {k: getattr(v, v.WhichOneof("kind"))
                                    for k, v in data.session_start_info.hparams.items()
                                    if v.WhichOneof("kind")}
            elif data.HasField("experiment"):
                contents.hparam_metrics = [m.name.tag for m in data.experiment.metric_infos]


def _purge(contents: BoardContents, step: int) -> None:
    """Drop points at or after `step`: a resumed run logs them again."""
    for series in (contents.scalars, contents.images):
        for tag, points in series.items():
            series[tag] = [p for p in points if p[0] < step]


def _records(f: BinaryIO) -> Iterator[bytes]:
    """Each TFRecord's data, stopping quietly at the first short or corrupt record
    (a killed writer leaves a partial one at the end)."""
    from tensorboardX.record_writer import masked_crc32c  # late: module note

    while True:
        header = f.read(12)
        if len(header) < 12:
            return
        length, header_crc = struct.unpack("<QI", header)
        if masked_crc32c(header[:8]) != header_crc:
            return  # checked before the length is trusted for a read
        data, footer = f.read(length), f.read(4)
        if len(footer) < 4 or masked_crc32c(data) != struct.unpack("<I", footer)[0]:
            return
        yield data


def parse_profile_steps(spec: str) -> tuple[int, int]:
    """'A:B' -> (A, B): 1-based global steps, A <= B."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", spec)
    if match is None:
        raise UserError(f"--profile-steps {spec!r} is not A:B (1-based steps, e.g. 10:20)")
    first, last = int(match[1]), int(match[2])
    if first < 1:
        raise UserError(f"--profile-steps {spec!r}: steps start at 1")
    if first > last:
        raise UserError(f"--profile-steps {spec!r}: A must not be after B")
    return first, last


class ProfileWindow:
    """A jax.profiler trace of steps A..B into `logdir` (TensorBoard's PROFILE tab
    reads <logdir>/plugins/profile/*/*.xplane.pb). With spec None it does nothing.
    A gs:// `logdir`: the trace is written to a local temporary directory and copied
    there when it stops (the profiler's own gs:// support ignores the endpoint settings
    that gcsfs follows)."""

    def __init__(self, spec: str | None, logdir: str | os.PathLike):
        self.window = None if spec is None else parse_profile_steps(spec)
        self.logdir = os.fspath(logdir) if is_remote(logdir) else Path(logdir)
        self._local: str | None = None  # the staging directory of a remote logdir
        self.active = False  # a trace is running
        self.traced = False  # a trace was written

    def before_step(self, step: int) -> None:
        """Start tracing at A, or at a later step inside the window when the run
        resumed there."""
        if self.window is None or self.active or self.traced:
            return
        if self.window[0] <= step <= self.window[1]:
            import jax  # late: module note

            if is_remote(self.logdir):
                self._local = tempdirs.mkdtemp("lenet-dist-trace-")
            try:
                jax.profiler.start_trace(self._local or str(self.logdir))
            except RuntimeError as e:  # another trace running in this process
                raise Failure(f"--profile-steps: cannot start the profiler: "
                              f"{first_line(e)}") from None
            self.active = True

    def after_step(self, step: int, outputs=None) -> None:
        """Stop after B. Pass the step's outputs to wait for them: dispatch is
        asynchronous, and work still running when the trace stops is missing."""
        if self.active and step >= self.window[1]:
            self._stop(outputs)

    def close(self, outputs=None) -> None:
        """Stop a trace still running (the run ended or failed inside the window)."""
        if self.active:
            self._stop(outputs)

    def _stop(self, outputs) -> None:
        import jax  # late: module note

        self.active = False
        try:
            if outputs is not None:
                jax.block_until_ready(outputs)
        finally:
            try:
                jax.profiler.stop_trace()
            except RuntimeError as e:  # e.g. the trace could not be written
                raise Failure(f"--profile-steps: cannot save the trace: "
                              f"{first_line(e)}") from None
            finally:
                self._upload()
        self.traced = True

    def _upload(self) -> None:
        if self._local is None:
            return
        from lenet_dist.gcs import upload_tree  # late: module note

        local, self._local = self._local, None
        try:
            upload_tree(local, self.logdir)
        except OSError as e:
            raise Failure(f"--profile-steps: cannot copy the trace to {self.logdir}: "
                          f"{e.strerror or first_line(e)}") from None
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def __enter__(self) -> ProfileWindow:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
