"""Set up JAX before it initialises: CPU device simulation and XLA:CPU flags.

Both must happen before the first JAX backend call, so every command calls
`configure()` first and nothing in this package touches devices at import.
`configure` checks XLA_FLAGS with XLA's own parser (XLA would end the process on a
flag it rejects), then starts the backend, so that a platform that is not there is
one line at once; Ctrl-C while JAX (or TensorFlow) loads exits with one line.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import threading
import warnings
from pathlib import Path

# `signal` without its enums: __main__ imports this module first, and the enum
# set-up of `signal` alone took 50+ ms on a busy machine, a window for Ctrl-C.
# LAZY_ERRORS: for the same reason lenet_dist.errors (which imports `signal`) and
# lenet_dist.extras are imported inside the functions that raise.
import _signal

# Measured on the 2-core dev machine (see README, "Throughput"): routing
# XLA:CPU convolutions and matmuls to oneDNN made the per-step loop about
# 1.5x faster. They only affect the CPU backend.
CPU_XLA_FLAGS = (
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_use_onednn=true",
)


# Options for one program's compilation (jax.jit's compiler_options), per recipe: unlike
# XLA_FLAGS they leave every other program of the process alone. Measured on the 2-core
# dev machines (in-process A/B of the same step compiled both ways, alternating rounds,
# paired medians, 2026-12-04): for the d2l recipe's train step, YNNPACK fusions off
# (its Dense matmuls and the weight gradients of both convolutions then go to XLA's
# own dot and to oneDNN) made it 1.05-1.14x faster on 1 and 8 devices at batch 128
# and 256 on an AVX2 CPU (Zen 3), with the same numbers (tests/test_fast_paths.py); on
# an AVX-512 CPU (Zen 4) XLA's defaults were as fast or faster (1.00-1.07x, four runs,
# within that host's noise), so these apply only where the CPU has no AVX-512. The
# modern recipe keeps the defaults everywhere (0.87x at batch 128).
CPU_TRAIN_OPTIONS: dict[str, dict[str, str | bool]] = {
    "d2l": {"xla_cpu_experimental_ynn_fusion_type": ""},
}


def train_compiler_options(network: str, platform: str) -> dict | None:
    """`CPU_TRAIN_OPTIONS[network]` on the CPU backend of a CPU without AVX-512, less any
    option the user set in XLA_FLAGS (theirs wins, as with `add_xla_flags`); None when
    none apply, and with LENET_DIST_ONEDNN=0 (lenet-dist's CPU tuning off, to compare)."""
    if platform != "cpu" or not tuning_on() or cpu_has_avx512():
        return None
    entries = split_xla_flags(os.environ.get("XLA_FLAGS", ""))[0]
    names = {f.split("=")[0].lstrip("-") for f in entries}
    options = {k: v for k, v in CPU_TRAIN_OPTIONS.get(network, {}).items() if k not in names}
    return options or None


@functools.cache
def cpu_has_avx512() -> bool:
    """Whether this host's CPU has AVX-512 (Linux's /proc/cpuinfo; False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


# glibc's mallopt parameters (<malloc.h>) and the size under which freed memory stays in
# the process. Measured on the 2-core dev machine (2026-12-04): XLA:CPU allocates a
# program's temporaries afresh at every run, and glibc hands a block over its mmap
# threshold (dynamic, 32 MiB at most) a fresh mmap, whose pages the kernel faults in and
# zeroes at every step. The modern recipe's step at batch 256 has 59 MB of them: 14,000
# page faults a step, and 0.62-0.73x batch 128's speed per image; with the block kept
# on the heap (and the heap not trimmed back after each step), 0.91-1.12x, and the page
# faults of a run down from 1.5 million to those of batch 128. The d2l step (under
# 32 MiB) is unchanged. The cost: freed memory up to this size is not handed back to
# the system while the process runs.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
KEEP_FREED_BYTES = 1 << 30
# A thread's arena (XLA:CPU's workers allocate there) drops a heap of its own once
# all of it is free, whatever the thresholds, unless the top pad is larger than a heap
# (64 MiB): the pad is address space reserved ahead, not memory used.
TOP_PAD_BYTES = 256 << 20
_USER_MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def tuning_on() -> bool:
    """lenet-dist's CPU tuning (XLA flags, per-program options, malloc) is on unless
    LENET_DIST_ONEDNN=0, which turns all of it off, to compare."""
    return os.environ.get("LENET_DIST_ONEDNN", "1") != "0"


def tune_cpu() -> None:
    """Before JAX starts: the XLA:CPU flags, and large blocks kept on the heap."""
    if tuning_on():
        add_xla_flags()
        keep_freed_memory()


def keep_freed_memory() -> bool:
    """Keep freed blocks under KEEP_FREED_BYTES in the process (glibc only; a user's own
    _USER_MALLOC_SETTINGS or GLIBC_TUNABLES malloc settings win). True when set."""
    if (not sys.platform.startswith("linux") or any(k in os.environ for k in _USER_MALLOC_SETTINGS)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (ValueError, OSError):  # not glibc (musl has no such name)
        return False
    import ctypes

    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
                and mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
                and mallopt(_M_TOP_PAD, TOP_PAD_BYTES))


_XLA_SPACE = " \t\r\n"  # what XLA's parser takes for whitespace


def add_xla_flags(flags: tuple[str, ...] = CPU_XLA_FLAGS) -> None:
    """Append flags to XLA_FLAGS unless the user already set them. XLA_FLAGS that names
    a file of flags (it does not start with -) is left as it is: XLA reads the whole
    value as the file's path, so anything appended would break it."""
    current = os.environ.get("XLA_FLAGS", "")
    if current.strip(_XLA_SPACE) and not current.lstrip(_XLA_SPACE).startswith("-"):
        return
    names = {f.split("=")[0] for f in split_xla_flags(current)[0]}
    extra = [f for f in flags if f.split("=")[0] not in names]
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


# XLA reads XLA_FLAGS when its backend starts, and a flag it does not know (or a value it
# cannot read, or a file of flags it cannot open) ends the process from C++: XLA's own
# line (or a 90-line flag list), exit 1, out of Python's reach. So XLA's parser is first
# run on XLA_FLAGS in a child process, beside `import jax`: the child loads jaxlib and
# builds compile options, which parses XLA_FLAGS exactly as the backend will, with every
# flag this jaxlib knows. Only when XLA_FLAGS holds something besides CPU_XLA_FLAGS: an
# unset XLA_FLAGS costs nothing. Measured on the 2-core dev machine (2026-12-07, busy):
# the child alone takes 0.18-0.23 s (0.23 s of CPU) and always ended before `import jax`
# (12 runs), but it shares the cores with the import: `lenet-dist devices` with a flag of
# the user's took 1.60 s, 1.33 s before (medians of 16 alternating runs); unset, 1.21 s.
XLA_FLAGS_PROBE = "import jaxlib._jax as x; x.CompileOptions()"
XLA_FLAGS_PROBE_TIMEOUT = 60.0  # a probe that hangs is given up: XLA then decides
_XLA_FLAG_NAME = re.compile(r"[-_A-Za-z0-9]*")


def split_xla_flags(text: str) -> tuple[list[str], str]:
    """XLA_FLAGS's entries as XLA's parser reads them (parse_flags_from_env.cc): each
    starts with -, its name is letters, digits, - and _, and a value after = may be
    quoted ("a b" or 'a b', quotes dropped). Also what is left from the first word that
    does not start with - on, which XLA ignores without a word: (entries, rest)."""
    entries, i = [], len(text) - len(text.lstrip(_XLA_SPACE))
    while i < len(text) and text[i] == "-":
        end = _XLA_FLAG_NAME.match(text, i).end()
        quote = text[end + 1:end + 2]
        if text[end:end + 1] == "=" and quote in ("'", '"'):
            value, j = [], end + 2
            while j < len(text) and text[j] != quote:
                if quote == '"' and text[j] == "\\" and j + 1 < len(text):
                    j += 1  # a backslash escapes the next character in double quotes
                value.append(text[j])
                j += 1
            entries.append(text[i:end + 1] + "".join(value))
            i = j + 1
        else:
            j = i
            while j < len(text) and text[j] not in _XLA_SPACE:
                j += 1
            entries.append(text[i:j])
            i = j
        i = len(text) - len(text[i:].lstrip(_XLA_SPACE))
    return entries, text[i:]


@contextlib.contextmanager
def checked_xla_flags():
    """Check XLA_FLAGS with XLA's own parser while the block runs (the block imports
    JAX): on leaving it, a flag XLA would reject is one UserError that names it."""
    from lenet_dist.errors import UserError  # see LAZY_ERRORS

    value = os.environ.get("XLA_FLAGS", "")
    entries, rest = split_xla_flags(value)
    if entries and rest:  # XLA reads up to `rest` and drops it (and any flag after it)
        word = re.match(r"[^ \t\r\n]+", rest).group()
        raise UserError(f"XLA_FLAGS: {word!r} is not a flag (a flag starts with --), and XLA "
                        "would ignore it and every flag after it; correct or remove it, or "
                        "unset XLA_FLAGS")
    if not value or (entries and set(entries) <= set(CPU_XLA_FLAGS)):
        yield  # nothing but lenet-dist's own flags: nothing to check
        return
    import subprocess  # here: only when XLA_FLAGS holds the user's flags

    try:
        # XLA names the flag in an ERROR log line, which TF_CPP_MIN_LOG_LEVEL=3 (the
        # user's, to silence TensorFlow) would drop.
        env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
        probe = subprocess.Popen([sys.executable, "-P", "-c", XLA_FLAGS_PROBE],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, env=env) if sys.executable else None
    except OSError:
        probe = None  # no interpreter to run it with (an embedded Python): XLA decides
    try:
        yield
        if probe is None:
            return
        try:
            _, report = probe.communicate(timeout=XLA_FLAGS_PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            return
    finally:
        if probe is not None and probe.returncode is None:
            probe.kill()
            probe.wait()
    if probe.returncode != 0:
        problem = xla_flags_problem(report.decode(errors="replace"), entries)
        if problem:
            raise UserError(problem)


def xla_flags_problem(report: str, entries: list[str]) -> str | None:
    """The one line for XLA's report on XLA_FLAGS (`report`: what its parser printed
    before it ended the process), naming the flag; None if the report is not about
    XLA_FLAGS (the probe failed for another reason: then XLA decides at start-up)."""
    fix = "correct or remove it, or unset XLA_FLAGS"
    unknown = re.search(r"Unknown flags? in XLA_FLAGS: (.*)", report)
    if unknown:
        names = [w.split("=")[0] for w in unknown.group(1).split() if w.startswith("-")]
        theirs = [n for n in names if n not in {f.split("=")[0] for f in CPU_XLA_FLAGS}]
        if not theirs:
            from lenet_dist.versions import installed  # here: only on this rare path

            return (f"XLA_FLAGS: jaxlib {installed(('jaxlib',))['jaxlib']} does not know "
                    f"lenet-dist's own flag(s) {', '.join(names)}; set LENET_DIST_ONEDNN=0 "
                    "to run without them")
        theirs = list(dict.fromkeys(theirs))
        hint = (" (one that takes a value is written --name=VALUE)"
                if any("=" not in w for w in unknown.group(1).split()) else "")
        many = len(theirs) > 1
        return (f"XLA_FLAGS: unknown flag{'s' * many} {', '.join(theirs)[:300]}: not among "
                f"this jaxlib's XLA flags{hint}; correct or remove {'them' if many else 'it'},"
                " or unset XLA_FLAGS")
    bad = re.search(r"Couldn't interpret value (.*) for flag (\S+?)\.?$", report, re.M)
    if bad:
        value, name = bad.group(1).removeprefix("="), bad.group(2)
        kind = re.search(rf"^\t--{re.escape(name)}=(.*?)\s*\t(\w+)\t", report, re.M)
        takes = f" (it takes a{'n' * (kind.group(2)[0] in 'aeiou')} {kind.group(2)}, " \
                f"default {kind.group(1)})" if kind else ""
        return f"XLA_FLAGS: --{name}: XLA cannot read the value {value[:100]!r}{takes}; {fix}"
    missing = re.search(r'Could not open file "(.*)" to read flags', report, re.S)
    if missing:
        return (f"XLA_FLAGS={missing.group(1)[:200]!r} does not start with --, so XLA reads "
                "it as the path of a file of flags, and cannot open it; give flags "
                "as --name=VALUE (or a readable file's path), or unset XLA_FLAGS")
    if "Flag parsing failed" in report:
        said = re.search(r"^E\d{4} [\d:.]+\s+\d+ \S+\] (.*)", report, re.M)
        if said:
            return f"XLA_FLAGS: XLA rejects it: {said.group(1)[:200]}; {fix}"
        if "--help" in entries:
            return ("XLA_FLAGS: --help is not a flag here (XLA prints its flag list and "
                    "stops); remove it, or unset XLA_FLAGS")
        return f"XLA_FLAGS: XLA cannot parse {' '.join(entries)[:200]!r}; {fix}"
    fatal = re.search(r"^F\d{4} [\d:.]+\s+\d+ parse_flags_from_env\.cc:\d+\] (.*)", report,
                      re.M)
    if fatal:
        return f"XLA_FLAGS: XLA rejects it: {fatal.group(1)[:200]}; {fix}"
    return None


def exit_interrupted(*_, fd: int = 2) -> None:
    """A SIGINT handler: one line and exit 130 at once, without unwinding."""
    os.write(fd, b"error: interrupted\n")
    os._exit(130)


@contextlib.contextmanager
def quick_interrupts():
    """Ctrl-C exits at once (`exit_interrupted`) while heavy modules import and JAX
    starts. A KeyboardInterrupt raised there lands anywhere: in a native module's
    init (measured: an abort with a traceback), in JAX's gc callback (measured:
    ignored, and the command went on to exit 0), or in a half-imported module.
    Nothing is written yet at that point, so there is nothing to unwind."""
    # Leave SIGINT alone when it is ignored (a background job) or handled by someone
    # else, and outside the main thread (where handlers cannot be set).
    if (_signal.getsignal(_signal.SIGINT) is not _signal.default_int_handler
            or threading.current_thread() is not threading.main_thread()):
        yield
        return
    err = os.dup(2)  # the line goes here even while fd 2 is captured (filtered_stderr)
    _signal.signal(_signal.SIGINT, lambda *_: exit_interrupted(fd=err))
    try:
        yield
    finally:
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)
        os.close(err)


# Simulated CPU devices cost memory and start-up time that grow faster than their
# number. Measured on the 2-core dev machine: `lenet-dist devices --devices N` took
# 0.8 s for 8, 1.2 s for 512, 3.5 s for 2,048 and 13 s for 4,096 (1.4 GB); one
# epoch of a tiny run on 512 took 27 s and 2.7 GB. Real accelerators are not capped.
MAX_SIMULATED_CPU_DEVICES = 512


def configure(cpu_devices: int | None = None, job=None, sync_preemption: bool = False,
              quick_exit: bool = True) -> None:
    """Prepare JAX: join the multi-process `job` (a `joining.JobSpec`) if any,
    then `cpu_devices` simulated CPU devices (the global count: each process of a
    job simulates its share), fast CPU kernels; then start the backend, so that a
    platform that is not here fails now, in one line.

    Joining a job installs JAX's SIGTERM notifier, which only a training loop asks
    (`sync_preemption`); any other command takes SIGTERM back, so that it still
    stops (one line, 143) instead of running on until SIGKILL.

    Simulating devices only changes the CPU backend; on a GPU/TPU host the
    accelerators stay the default backend. `quick_exit`: Ctrl-C while JAX starts exits
    the process at once (the CLI's `quick_interrupts`); the Python API passes False, so
    a KeyboardInterrupt reaches its caller.
    """
    tune_cpu()
    with quick_interrupts() if quick_exit else contextlib.nullcontext():
        _configure(cpu_devices, job)
    if job is not None and job.enabled and not sync_preemption:
        from lenet_dist.preemption import exit_on_sigterm  # JAX-free; after the join

        exit_on_sigterm(replace_jax=True)


def _configure(cpu_devices: int | None, job) -> None:
    from lenet_dist.errors import UserError, first_line  # see LAZY_ERRORS

    with checked_xla_flags():
        try:
            import jax
        except ValueError as e:  # JAX parses its JAX_* variables at import
            raise UserError(f"JAX rejects its environment: {first_line(e)}; fix or unset "
                            "that variable") from None
    use_compile_cache(jax)
    if jax.config.jax_num_cpu_devices > MAX_SIMULATED_CPU_DEVICES:
        raise UserError(f"JAX_NUM_CPU_DEVICES={jax.config.jax_num_cpu_devices} asks for more "
                        f"simulated CPU devices than the {MAX_SIMULATED_CPU_DEVICES} that can "
                        "be; lower or unset it (lenet-dist's --devices sets the count)")
    if job is not None:
        from lenet_dist import joining

        cpu_devices = joining.join(job, cpu_devices)
    simulate = cpu_devices is not None and cpu_devices <= MAX_SIMULATED_CPU_DEVICES
    if simulate and cpu_devices > jax.config.jax_num_cpu_devices:
        try:
            jax.config.update("jax_num_cpu_devices", cpu_devices)
        except RuntimeError:  # the backend already started with fewer: never ignore it
            raise UserError(
                f"--devices {cpu_devices} asks for more CPU devices than the "
                f"{jax.config.jax_num_cpu_devices} present; JAX has already started, "
                "so no more can be simulated") from None
    start_backend()
    if cpu_devices is not None and not simulate and jax.default_backend() == "cpu":
        per_process = " per process" if jax.process_count() > 1 else ""
        raise UserError(
            f"--devices asks for {cpu_devices:,} simulated CPU devices{per_process}; at "
            f"most {MAX_SIMULATED_CPU_DEVICES} can be simulated, so ask for fewer (on a "
            "GPU/TPU host, install lenet-dist[cuda13] or [tpu] to use the accelerators)")


def use_compile_cache(jax) -> Path | None:
    """JAX's persistent compilation cache in `caches.compile_cache_dir()`, every program
    (a small step compiles in well under JAX's 1 s threshold), unless the user set JAX's
    own JAX_COMPILATION_CACHE_DIR (theirs wins). A folder that cannot be made leaves the
    cache off: a cache never fails a run. The folder, or None."""
    from lenet_dist import caches  # stdlib only

    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    directory = caches.compile_cache_dir()
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            return None
    except OSError:
        return None
    # An entry JAX cannot write (XLA:CPU cannot serialize oneDNN custom calls) or read
    # (torn by a kill mid-write) is compiled instead; its warning would break the
    # one-line output, and says nothing a user can act on.
    warnings.filterwarnings("ignore", message="Error (reading|writing) persistent "
                            "compilation cache entry", category=UserWarning)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory


def start_backend() -> None:
    """Start JAX's backend now; a platform asked for (JAX_PLATFORMS) that is not here,
    or an accelerator plugin that fails to load, becomes one UserError, where JAX
    would raise a RuntimeError (an AssertionError for CUDA without a GPU) from
    whichever line first touched a device."""
    import jax

    from lenet_dist.errors import UserError, first_line  # see LAZY_ERRORS

    try:
        jax.devices()
    except (RuntimeError, AssertionError) as e:
        wanted = jax.config.jax_platforms
        text = str(e)
        if "Unable to initialize backend" not in text and not (
                isinstance(e, AssertionError) and wanted):
            raise  # not about platforms (e.g. a job's topology exchange failed)
        # JAX's own advice ("set JAX_PLATFORMS=''") is replaced by ours below.
        hint = re.compile(r"\s*\((set JAX_PLATFORMS|you may need)[^)]*\)\.?\s*$")
        reason = first_line(RuntimeError(hint.sub("", text)), limit=300).rstrip(".")
        if wanted:
            if isinstance(e, AssertionError):
                reason = "no NVIDIA GPU is visible"
            raise UserError(
                f"JAX_PLATFORMS={wanted} asks for a platform that is not available here: "
                f"{reason}; unset JAX_PLATFORMS (or set it to cpu) to use what is "
                "present") from None
        raise UserError(f"JAX could not start: {reason}; set JAX_PLATFORMS=cpu to skip "
                        "the failing accelerator, or fix or uninstall its plugin") from None


# INFO lines TensorFlow's C++ prints while it loads. Once jaxlib has set up
# absl logging, TF_CPP_MIN_LOG_LEVEL no longer silences them.
TF_IMPORT_NOISE = ("absl::InitializeLog", "oneDNN custom operations are on",
                   "This TensorFlow binary is optimized", "rebuild TensorFlow with")


@contextlib.contextmanager
def filtered_stderr(noise: tuple[str, ...] = ("",)):
    """Capture file descriptor 2 (where C/C++ libraries log); replay the lines that
    contain none of `noise` (by default none are replayed)."""
    import tempfile  # here: __main__ imports this module before anything else

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines()
                    if not any(n in line for n in noise)]
            if kept:
                print("\n".join(kept), file=sys.stderr)


TENSORFLOW_PIN = "tensorflow-cpu==2.21.0"  # the version pyproject.toml pins


def import_tensorflow():
    """TensorFlow, quiet, or a UserError that says how to install it.

    Imported only by the commands that need it (export, predict), so training
    never pays its import time.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with quick_interrupts(), filtered_stderr(TF_IMPORT_NOISE):
            import tensorflow as tf
    except ImportError as e:
        from lenet_dist import extras  # see LAZY_ERRORS
        from lenet_dist.errors import UserError  # see LAZY_ERRORS

        error = extras.missing("tensorflow", f" ({e})")
        raise UserError(f"{error}; or `pip install {TENSORFLOW_PIN}` alone (`tensorflow` "
                        "on a GPU or non-x86 host)") from None
    tf.get_logger().setLevel("ERROR")  # deprecation notices from TF1 APIs
    return tf
