"""Settings files: `train --config` reads run.yaml, run.json or a run's config.json into
checked Config fields (with YAML's and JSON's traps closed: duplicate keys, numbers
that are text, oversized files), and writes a run's config.json and `--print-config`'s
YAML that read back to the same Config. config.py holds what the fields are.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any

from lenet_dist import safefs
from lenet_dist.config import Config, checked_setting
from lenet_dist.errors import UserError, first_line, quoted
from lenet_dist.rundir import CONFIG_FILE

MAX_CONFIG_BYTES = 2**20  # a settings file is a few hundred bytes


def write_config(workdir: str | os.PathLike, config: Config) -> None:
    """<workdir>/config.json, in one rename (readers never see half of it); `train
    --config` of it runs the same run again."""
    path = os.path.join(os.fspath(workdir), CONFIG_FILE)
    try:
        safefs.write_atomic(path, config.to_json())
    except safefs.UnsafePath as e:
        raise UserError(f"{e.filename} {e.strerror}") from None
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def read_settings(path: str) -> dict[str, Any]:
    """The Config fields a run.yaml, run.json or a run's config.json sets, each checked,
    so that a mistake is one line naming the file and the key. A .json file is read as
    JSON, anything else as YAML; in either, a key given twice is refused (not last-wins),
    and YAML's aliases are refused (see `_yaml_loader`)."""
    where = f"--config {path}"
    try:
        raw = safefs.read_file(path, MAX_CONFIG_BYTES)
    except OSError as e:
        raise UserError(f"cannot read {where}: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise UserError(f"{where} is over {MAX_CONFIG_BYTES >> 20} MiB; it should hold a few "
                        "settings")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text") from None
    try:
        if path.lower().endswith(".json"):
            settings = _read_json(where, text)
        else:
            settings = _read_yaml(where, text)
    except DuplicateKey as e:
        at = f" (lines {e.first} and {e.line})" if e.line else ""
        raise UserError(f"{where}: key {quoted(e.key)} is given twice{at}; keep one") from None
    if not isinstance(settings, dict):
        raise UserError(f"{where} must hold a mapping of Config field names to values, "
                        f"not {type(settings).__name__ if settings is not None else 'nothing'}")
    return {key: checked_setting(where, key, value) for key, value in settings.items()}


class DuplicateKey(Exception):
    """A mapping of a settings file gives `key` twice (YAML: 1-based lines, else 0)."""

    def __init__(self, key: Any, first: int = 0, line: int = 0):
        super().__init__(key)
        self.key, self.first, self.line = key, first, line


def _read_json(where: str, text: str) -> Any:
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        mapping: dict[str, Any] = {}
        for key, value in pairs:
            if key in mapping:
                raise DuplicateKey(key)  # the json module has no positions to give
            mapping[key] = value
        return mapping

    try:
        return json.loads(text, object_pairs_hook=unique)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{where} is not valid JSON ({first_line(e, 120)})") from None


def _read_yaml(where: str, text: str) -> Any:
    # Lazy: only --config reads YAML, and every start of the CLI (--help too) would
    # pay for the import.
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader: no Python objects
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: 2001-13-01
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        raise UserError(f"{where} is not valid YAML ({at}"
                        f"{getattr(e, 'problem', None) or first_line(e, 120)})") from None


@functools.cache
def _yaml_loader() -> type:
    """yaml.SafeLoader without aliases, with each mapping's keys unique, and YAML 1.2's
    numbers instead of 1.1's: `epochs: 1:30` was 90 (base 60) and `epochs: 010` was 8
    (octal), silently. Now an int is decimal digits only (anything else is text, which
    the field's type check refuses in one line) and 1e-3 is a float.

    Aliases are refused, not counted: nine nested anchors of ten aliases each (a
    "billion laughs") make a few hundred bytes that stand for 10**9 values, and
    anything that walks the value (a message quoting it, a type check of its items)
    runs for minutes. A settings file is a flat mapping of scalars and never needs to
    repeat a value by reference, and config.json (what `train` writes) has none, so
    no limit on alias use would let through anything a config needs; without aliases
    the composed document is at most the file (MAX_CONFIG_BYTES)."""
    import yaml  # lazy, as in _read_yaml
    from yaml.composer import ComposerError

    class ConfigLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ComposerError(
                    None, None, f"alias *{quoted(event.anchor)[1:-1]}: a config file "
                    "cannot use aliases; write the value out", event.start_mark)
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # `<<:` may be overridden by design
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in seen:
                            raise DuplicateKey(key, seen[key], line)
                    except TypeError:
                        continue  # unhashable: SafeConstructor refuses it next
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    int_tag, float_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
    ConfigLoader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (int_tag, float_tag)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    ConfigLoader.add_implicit_resolver(  # first: "10" is an int, not a float
        int_tag, re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789"))
    ConfigLoader.add_implicit_resolver(
        float_tag, re.compile(r"^[-+]?(?:\.[0-9]+|(?:0|[1-9][0-9]*)(?:\.[0-9]*)?)"
                              r"(?:[eE][-+]?[0-9]+)?$"
                              r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
        list("-+0123456789."))
    return ConfigLoader


@functools.cache
def _yaml_dumper() -> type:
    """yaml.SafeDumper that decides what to quote by `_yaml_loader`'s rules for numbers
    (YAML 1.2's), so that what it writes reads back as the same values."""
    import yaml  # lazy, as in _read_yaml

    class ConfigDumper(yaml.SafeDumper):
        pass

    ConfigDumper.yaml_implicit_resolvers = {
        first: list(resolvers)
        for first, resolvers in _yaml_loader().yaml_implicit_resolvers.items()}
    return ConfigDumper


def to_yaml(config: Config) -> str:
    """The fields as YAML, in declaration order (`train --print-config`); `--config`
    reads it back to this Config. Written with the reader's own rules for numbers
    (`_yaml_dumper`), so a text that reads as a number there (a workdir `1e3`) is
    quoted here."""
    import yaml  # lazy, as in _read_yaml

    return yaml.dump(config.to_dict(), Dumper=_yaml_dumper(), sort_keys=False,
                     allow_unicode=True, default_flow_style=False)
