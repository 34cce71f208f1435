"""How the command line fails: every exception `cli.main` catches becomes one line on
stderr and an exit status (the traceback only with --debug), and a job whose peer died
exits at once with a line naming it."""

from __future__ import annotations

import dataclasses
import errno
import os
import sys
import time
import traceback

import click

from lenet_dist import extras, faults, joining
from lenet_dist.errors import RESTART_EXIT_CODE, Failure, Preempted, UserError, first_line
from lenet_dist.fatal_filter import describe_loss

DEBUG_ENV = "LENET_DIST_DEBUG"
NUL_PATH = "the path contains a NUL byte, which no file name can hold"


@dataclasses.dataclass
class Session:
    """What `main` needs to know about the parsed command line after it fails."""

    debug: bool = False


def run_command(group: click.Group, argv=None) -> int:
    """`group` on `argv` (cli.main): every failure is one line on stderr and a non-zero
    exit; with --debug (or LENET_DIST_DEBUG=1) the traceback follows the line."""
    session = Session()
    safe_streams()
    try:
        faults.check()
        code = group.main(args=argv, prog_name="lenet-dist", standalone_mode=False, obj=session)
        return code if isinstance(code, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.NoArgsIsHelpError as e:  # `lenet-dist` alone: the help, as click
        e.show()
        return e.exit_code
    except click.ClickException as e:
        return report(f"error: {e.format_message()}", e, e.exit_code, session)
    except UserError as e:
        if isinstance(e, Failure):  # e.g. a save whose barrier met a dead process
            lost_process_exit(e)
        return report(f"error: {e}", e, e.exit_code, session)
    except Preempted as e:
        return report(f"{e}", e, e.exit_code, session)
    except OSError as e:  # permissions, full disk, ...: the last line of defence
        lost_process_exit(e)
        where = f" ({e.filename})" if e.filename else ""
        # a name too long is the name given (bad input), not the system failing
        code = 2 if e.errno == errno.ENAMETOOLONG else 1
        return report(f"error: {e.strerror or e}{where}", e, code, session)
    except (KeyboardInterrupt, click.exceptions.Abort) as e:
        return report("error: interrupted", e, 130, session)
    except ModuleNotFoundError as e:
        hint = extras.missing(e.name or "")
        if hint is None:  # a core module: a broken install, reported as internal below
            return internal_error(e, session)
        return report(f"error: {hint}", e, hint.exit_code, session)
    except MemoryError as e:
        lost_process_exit(e)
        return report("error: out of memory (MemoryError); free memory, or use a smaller "
                      "--batch-size or fewer --devices", e, 1, session)
    except Exception as e:
        known = known_failure(e)
        if known is not None:
            return report(f"error: {known[0]}", e, known[1], session)
        return internal_error(e, session)


def known_failure(e: Exception) -> tuple[str, int] | None:
    """Library errors that are not OSErrors but say the same kind of thing: (the line,
    the exit code), or None for a bug. Recognised by class name, so that naming them
    imports neither TensorFlow nor JAX."""
    names = {cls.__name__ for cls in type(e).__mro__}
    text = first_line(e)
    if "ResourceExhaustedError" in names:  # TensorFlow: a full disk, or memory
        return f"out of resources: {text}", 1
    if "PermissionDeniedError" in names:  # TensorFlow
        return f"permission denied: {text}", 1
    if "XlaRuntimeError" in names and text.startswith("RESOURCE_EXHAUSTED"):
        return f"out of device memory: {text}", 1
    if isinstance(e, ValueError) and "null byte" in str(e):  # os.* on a path with "\0"
        return NUL_PATH, 2
    if isinstance(e, UnicodeError):  # text this system cannot encode or decode
        return f"text that cannot be encoded here: {text}", 2
    return None


def safe_streams() -> None:
    """Printing never fails on a character the terminal's encoding lacks
    (PYTHONIOENCODING=ascii, LC_ALL=C and a non-ASCII path): it is escaped."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a closed or detached stream
                pass


def internal_error(e: Exception, session: Session) -> int:
    """A bug or a broken install: one line, the traceback only with --debug."""
    lost_process_exit(e)
    what = type(e).__name__ + (f": {first_line(e)}" if str(e).strip() else "")
    return report(f"error: internal error: {what}; rerun with --debug (or {DEBUG_ENV}=1) "
                  "for the traceback", e, 1, session)


def debug_from_env() -> bool:
    """LENET_DIST_DEBUG as click reads a flag, for failures before the group parsed it."""
    value = os.environ.get(DEBUG_ENV, "").strip().lower()
    return value in ("1", "true", "t", "yes", "y", "on")


# A word of an error line longer than this (a path quoted whole: up to 4,096 characters,
# or a component over the 255 a file name may have) is cut, saying its length.
LONGEST_WORD = 200


def one_line(text: str) -> str:
    """`text` on one line, each word at most LONGEST_WORD characters (and its length;
    the punctuation that ends it kept)."""
    def cut(word: str) -> str:
        if len(word) <= LONGEST_WORD:
            return word
        core = word.rstrip(";,:.)]'\"")
        return f"{core[:LONGEST_WORD]}... ({len(core):,} characters){word[len(core):]}"

    return " ".join(cut(word) for word in text.split())


def report(line: str, e: BaseException, code: int, session: Session) -> int:
    """Print the one line; in debug mode, then the traceback, with the library error
    that a `raise ... from None` hid (the part worth seeing)."""
    click.echo(one_line(line), err=True)
    if session.debug or debug_from_env():
        seen, chain = e, set()
        while seen is not None and id(seen) not in chain:
            chain.add(id(seen))
            seen.__suppress_context__ = False
            seen = seen.__cause__ or seen.__context__
        sys.stderr.write("".join(traceback.format_exception(e)))
    return code


def lost_process_exit(e: BaseException) -> None:
    """In a job, an error from a barrier or collective usually means a process died:
    say which in one line and exit at once (the shutdown barrier would wait for the
    dead process, then abort with a second report). When the error does not name it
    (gloo only sees a closed socket), wait for JAX's heartbeat check, which names
    it through the output filter."""
    if joining.JOINED is None:
        return
    chain, seen = [], e
    while seen is not None:
        chain.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    text = "\n".join(chain)
    message = describe_loss(text)
    if message is None and not any(k in text for k in ("Gloo", "barrier", "Barrier")):
        return
    if message is None:
        time.sleep(joining.JOINED.heartbeat_timeout + 10)  # JAX aborts us before that
        message = f"error: a collective across the job's processes failed: {text[:200]}"
    click.echo(message, err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(RESTART_EXIT_CODE)  # a lost peer: the whole job's restart can go on
