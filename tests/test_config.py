"""Config declared once: the train options, the help's defaults, --config files,
config.json, and the fields a resume compares all come from Config's fields."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import click
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lenet_dist import cli as cli_lib
from lenet_dist import cli_options
from lenet_dist import config as config_lib
from lenet_dist import rundir, settings_io
from lenet_dist.cli import main
from lenet_dist.config import PRESETS, Config
from lenet_dist.errors import UserError

# The train options that are not Config fields (--recipe sets `recipe` through a preset).
NOT_FIELDS = {"recipe", "preset", "config_file", "allow_config_change", "progress",
              "tensorboard", "log_every_steps", "profile_steps", "distributed",
              "coordinator_address", "num_processes", "process_id", "heartbeat_timeout",
              "join_timeout", "stall_timeout", "print_config", "debug", "help"}


def train_options() -> dict[str, click.Option]:
    return {p.name: p for p in cli_lib.train.params}


def test_every_config_field_has_a_train_option_and_back():
    fields = {f.name for f in dataclasses.fields(Config)}
    options = set(train_options())
    assert fields - options == set(), "Config fields without a train option"
    assert options - fields - NOT_FIELDS == set(), "train options without a Config field"
    assert "recipe" in options  # the preset chooser


def test_train_options_keep_their_names_types_and_ranges():
    options = train_options()
    assert options["learning_rate"].opts == ["--learning-rate", "--lr"]
    assert options["augment"].opts == ["--augment"]
    assert options["augment"].secondary_opts == ["--no-augment"]
    assert options["checkpoint"].secondary_opts == ["--no-checkpoint"]
    assert options["preset"].hidden
    for name, (low, high) in config_lib.INT_RANGES.items():
        assert (options[name].type.min, options[name].type.max) == (low, high), name
    for name, (low, high, low_open, high_open) in config_lib.FLOAT_RANGES.items():
        kind = options[name].type
        assert isinstance(kind, cli_options.FiniteFloatRange), name
        assert (kind.min, kind.max, kind.min_open, kind.max_open) == (
            low, high, low_open, high_open), name
    assert options["optimizer"].type.choices == config_lib.OPTIMIZERS
    assert isinstance(options["workdir"].type, cli_options.TextPath)
    for name in {f.name for f in dataclasses.fields(Config)} - {"network"}:
        assert options[name].default is None, name  # unset: the preset or file decides


def test_resume_fields_come_from_the_declarations():
    assert set(config_lib.COMPATIBLE_FIELDS) == {
        "dataset", "batch_size", "optimizer", "learning_rate", "momentum", "seed",
        "train_limit", "network", "schedule", "warmup_epochs", "weight_decay",
        "label_smoothing", "augment", "test_fraction", "skip_bad_files", "validation"}
    assert set(config_lib.REQUIRED_FIELDS) == {
        "dataset", "batch_size", "optimizer", "learning_rate", "momentum", "seed",
        "train_limit"}
    assert set(config_lib.STRUCTURAL_FIELDS) == {"optimizer", "network", "schedule"}
    assert set(config_lib.STRUCTURAL_FIELDS) <= set(config_lib.COMPATIBLE_FIELDS)

    from lenet_dist import checkpoint

    assert checkpoint.COMPATIBLE_FIELDS is config_lib.COMPATIBLE_FIELDS


def help_text(capsys, *args) -> str:
    assert main(["train", *args]) == 0
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_help_shows_every_recipes_defaults(capsys):
    """A default that depends on the recipe names each recipe's; one that does not is
    one value."""
    text = help_text(capsys, "--help")
    assert "[default: d2l: 128, modern: 128, fast: 128, smoke: 16; 1<=x<=65536]" in text
    assert "[default: d2l: 0.1, modern: 0.003, fast: 0.01, smoke: 0.003; 0.0<x<=10.0]" in text
    assert ("[default: d2l: runs/lenet, modern: runs/modern, fast: runs/fast, "
            "smoke: runs/smoke]") in text
    assert "[default: d2l: off, modern: on, fast: off, smoke: off]" in text  # --augment
    assert "[default: all; 1<=x<=2147483647]" in text  # --devices
    assert "[default: d2l: all, modern: all, fast: all, smoke: 2000; 1<=x<=2147483647]" in text
    assert "[default: on]" in text  # --checkpoint: the same in every recipe


@pytest.mark.parametrize("args", [("--recipe", "modern"), ("--preset", "modern")])
def test_recipe_before_help_shows_its_defaults(capsys, args):
    text = help_text(capsys, *args, "--help")
    assert "--lr FLOAT RANGE [default: modern: 0.003; 0.0<x<=10.0]" in text
    assert "[default: modern: runs/modern]" in text
    options = text.split("--config FILE")[1]  # after --recipe's own help
    assert "smoke" not in options and "d2l:" not in options
    assert "[default: modern: on]" in text  # --augment
    assert "[default: 0.9; 0.0<=x<1.0]" in text  # --momentum: the same in every recipe


def test_help_imports_neither_jax_nor_yaml():
    code = ("import sys; from lenet_dist.cli import main; main(['train', '--help']); "
            "print(sorted(m for m in ('jax', 'yaml') if m in sys.modules), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stderr.splitlines() == ["[]"], proc.stderr


# ------------------------------------------------------------------ --config files


@pytest.fixture
def captured(monkeypatch, devices):
    """main(["train", ...]) records the Config it would train instead of training."""
    from lenet_dist import training as train_lib

    seen = []
    monkeypatch.setattr(train_lib, "train", lambda config, **kwargs: seen.append(config))
    return seen


def test_yaml_file_sits_between_the_recipe_and_the_options(tmp_path, captured):
    path = tmp_path / "run.yaml"
    path.write_text("# a run\nrecipe: modern\nbatch_size: 64\nlearning_rate: 1e-3\n"
                    "epochs: 3\ndevices: 2\n")
    assert main(["train", "--config", str(path), "--epochs", "5"]) == 0
    (config,) = captured
    modern = PRESETS["modern"]
    assert config == modern.replace(batch_size=64, learning_rate=0.001, epochs=5, devices=2)


def test_recipe_option_beats_the_files_recipe(tmp_path, captured):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"recipe": "modern", "seed": 7}))
    assert main(["train", "--config", str(path), "--recipe", "smoke"]) == 0
    assert captured == [PRESETS["smoke"].replace(seed=7)]


def test_file_null_clears_a_presets_value(tmp_path, captured):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: smoke\ntrain_limit: null\n")
    assert main(["train", "--config", str(path)]) == 0
    assert captured[0].train_limit is None and captured[0].epochs == 2


def test_config_json_is_written_and_runs_again(tmp_path, captured):
    config = PRESETS["modern"].replace(devices=4, seed=3, train_limit=4096,
                                       workdir=str(tmp_path / "w"))
    os.makedirs(config.workdir)
    settings_io.write_config(config.workdir, config)
    path = tmp_path / "w" / rundir.CONFIG_FILE
    assert json.loads(path.read_text()) == config.to_dict()
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temporary left
    assert main(["train", "--config", str(path)]) == 0
    assert captured == [config]
    smoke = dataclasses.replace(PRESETS["smoke"], workdir=str(tmp_path / "s"))
    os.makedirs(smoke.workdir)
    settings_io.write_config(smoke.workdir, smoke)
    assert main(["train", "--config", os.path.join(smoke.workdir, "config.json")]) == 0
    assert captured[1] == smoke  # smoke's recipe field is d2l: the file holds every field


def test_write_config_refuses_a_planted_link(tmp_path):
    (tmp_path / "elsewhere").write_text("precious")
    (tmp_path / "config.json").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="config.json is a symlink"):
        settings_io.write_config(tmp_path, Config())
    assert (tmp_path / "elsewhere").read_text() == "precious"


@pytest.mark.parametrize("name, content, message", [
    ("run.yaml", "batch_size: 64\nlr: 0.1\n",
     "run.yaml: unknown key 'lr' (did you mean learning_rate?); the keys are Config's "
     "fields: dataset,"),
    ("run.yaml", "batch-size: 64\n", "unknown key 'batch-size' (did you mean batch_size?)"),
    ("run.yaml", "batch_size: 6.4\n", "run.yaml: batch_size must be an integer, got 6.4"),
    ("run.yaml", "batch_size: true\n", "run.yaml: batch_size must be an integer, got True"),
    ("run.yaml", "augment: 1\n", "run.yaml: augment must be true or false, got 1"),
    ("run.yaml", "learning_rate: fast\n", "learning_rate must be a number, got 'fast'"),
    ("run.yaml", "learning_rate: .nan\n", "learning_rate must be a finite number in (0, 10]"),
    ("run.yaml", "epochs: null\n", "run.yaml: epochs cannot be null"),
    ("run.yaml", "batch_size: 0\n", "run.yaml: batch_size must be in 1..65536, got 0"),
    ("run.yaml", "optimizer: lion\n",
     "run.yaml: optimizer must be one of sgd, momentum, adam, adamw, got 'lion'"),
    ("run.yaml", "recipe: huge\n", "run.yaml: recipe must be one of d2l, modern, fast, smoke"),
    ("run.yaml", "workdir: ''\n", "run.yaml: workdir is an empty path"),
    ("run.yaml", "batch_size: [64\n", "run.yaml is not valid YAML (line 2:"),
    ("run.yaml", "- 64\n", "run.yaml must hold a mapping of Config field names to values, "
                           "not list"),
    ("run.yaml", "", "run.yaml must hold a mapping of Config field names to values, "
                     "not nothing"),
    ("run.json", '{"batch_size": 64,}', "run.json is not valid JSON (Expecting"),
    ("run.json", '{"data_dir": "\\udcff"}', "run.json: data_dir is not valid text"),
    ("run.json", b"\xff\xfe", "run.json is not UTF-8 text"),
    ("none.yaml", None, "cannot read --config {tmp}/none.yaml: No such file or directory"),
    ("dir.yaml", "DIR", "cannot read --config {tmp}/dir.yaml: is a directory, not a regular"),
])
def test_bad_config_file_is_one_line_naming_file_and_key(capsys, tmp_path, name, content,
                                                         message):
    path = tmp_path / name
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert message.format(tmp=tmp_path) in err[0], err


def test_file_values_go_through_validate(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("weight_decay: 0.1\n")
    assert main(["train", "--config", str(path)]) == 2
    assert "--weight-decay needs --optimizer adamw" in capsys.readouterr().err


def test_every_field_type_is_readable_from_a_file():
    for field in dataclasses.fields(Config):
        kind, optional = config_lib.field_type(field.name)
        assert kind in config_lib.KIND_NAMES, field.name
        assert optional == (field.default is None), field.name
        value = getattr(PRESETS["modern"], field.name)
        assert config_lib.checked_setting("f", field.name, value) == value


SETTINGS_TEXT = st.one_of(
    st.text(max_size=200),
    st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(Config)] + ["x"]),
                    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                              st.text(max_size=20), st.lists(st.integers(), max_size=2)),
                    max_size=6).map(json.dumps))


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=SETTINGS_TEXT, suffix=st.sampled_from([".json", ".yaml"]))
def test_any_settings_file_is_read_or_refused_in_one_line(tmp_path, text, suffix):
    """Whatever the file holds: settings Config takes, or the project's own error."""
    path = tmp_path / f"run{suffix}"
    path.write_text(text, errors="surrogatepass")
    try:
        settings_read = settings_io.read_settings(str(path))
    except UserError as e:
        assert str(path) in str(e)
        return
    config = config_lib.effective_config(None, settings_read, {})
    try:
        config.validate()
    except UserError:
        pass  # a combination of fields (e.g. weight decay without AdamW), one line


def test_a_training_run_leaves_its_config_json(trained):
    """train writes <workdir>/config.json, and reading it back gives the run's Config."""
    path = os.path.join(trained.config.workdir, rundir.CONFIG_FILE)
    saved = json.loads(open(path).read())
    assert saved == trained.config.to_dict()
    assert Config(**settings_io.read_settings(path)) == trained.config


def billion_laughs(levels: int = 9, fan: int = 10, key: str = "epochs") -> str:
    """A YAML file of a few hundred bytes whose `key` stands for fan**levels strings."""
    lines = [f"a0: &a0 [{', '.join(['x'] * fan)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan)}]" for i in range(1, levels)]
    return "\n".join([*lines, f"{key}: *a{levels - 1}", ""])


BILLION_LAUGHS_CHILD = """
import json, sys, time, tracemalloc
from lenet_dist import rundir, settings_io
from lenet_dist.errors import UserError
import yaml  # imported before measuring: its import is not the read
tracemalloc.start()
start = time.perf_counter()
try:
    settings_io.read_settings(sys.argv[1])
    message = None
except UserError as e:
    message = str(e)
print(json.dumps({"seconds": time.perf_counter() - start, "message": message,
                  "peak": tracemalloc.get_traced_memory()[1]}))
"""


def test_billion_laughs_is_refused_at_once_in_bounded_memory(tmp_path):
    """9 levels of 10 aliases: 10**9 strings in 300 bytes. It used to be expanded into the
    error message (minutes, gigabytes); now the first alias is refused. A child with a
    1 GiB address-space limit and a timeout, so that a regression fails, not hangs."""
    import resource

    path = tmp_path / "run.yaml"
    path.write_text(billion_laughs())
    assert len(path.read_bytes()) < 1000

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))

    out = subprocess.run([sys.executable, "-c", BILLION_LAUGHS_CHILD, str(path)],
                         capture_output=True, text=True, timeout=30,
                         preexec_fn=limit_memory)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["message"] == (f"--config {path} is not valid YAML (line 2: alias *a0: a "
                                 "config file cannot use aliases; write the value out)")
    assert result["seconds"] < 0.5, result
    assert result["peak"] < 4 * settings_io.MAX_CONFIG_BYTES, result  # the read buffer


@pytest.mark.parametrize("text", [
    "epochs: &n 3\nbatch_size: *n\n",           # a scalar alias
    "base: &b {epochs: 3}\n<<: *b\n",           # a merge key takes an alias
    "epochs: &x 3\n",                            # the anchor alone is harmless
])
def test_yaml_aliases_are_refused_anchors_alone_are_not(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    if "*" not in text:
        assert settings_io.read_settings(str(path)) == {"epochs": 3}
        return
    with pytest.raises(UserError, match=r"is not valid YAML \(line 2: alias \*[nb]: a config "
                                        r"file cannot use aliases; write the value out\)$"):
        settings_io.read_settings(str(path))


@pytest.mark.parametrize("text, expected", [
    ("epochs: 1:30\n", "epochs must be an integer, got '1:30'"),  # YAML 1.1: 90 (base 60)
    ("epochs: 010\n", "epochs must be an integer, got '010'"),    # YAML 1.1: 8 (octal)
    ("epochs: 0x10\n", "epochs must be an integer, got '0x10'"),
    ("epochs: 1_0\n", "epochs must be an integer, got '1_0'"),
    ("learning_rate: 1:30.5\n", "learning_rate must be a number, got '1:30.5'"),
    ("epochs: 12\n", {"epochs": 12}),
    ("learning_rate: 1e-3\n", {"learning_rate": 0.001}),              # YAML 1.1: text
    ("learning_rate: .5\nseed: -0\n", {"learning_rate": 0.5, "seed": 0}),
])
def test_yaml_numbers_are_yaml_1_2_decimal_never_base_60_or_octal(tmp_path, text, expected):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    if isinstance(expected, dict):
        assert settings_io.read_settings(str(path)) == expected
        return
    with pytest.raises(UserError, match=re.escape(expected) + "$"):
        settings_io.read_settings(str(path))


BIG = "x" * 5000


@pytest.mark.parametrize("name, content, message", [
    # a key given twice: refused, not last-wins
    ("run.yaml", "epochs: 3\nbatch_size: 64\nepochs: 5\n",
     "run.yaml: key 'epochs' is given twice (lines 1 and 3); keep one"),
    ("run.yaml", "epochs: 3\n'epochs': 5\n",
     "run.yaml: key 'epochs' is given twice (lines 1 and 2); keep one"),
    ("run.yaml", "{epochs: 3, epochs: 3}\n",
     "run.yaml: key 'epochs' is given twice (lines 1 and 1); keep one"),
    ("run.json", '{"epochs": 3, "batch_size": 64, "epochs": 5}',
     "run.json: key 'epochs' is given twice; keep one"),
    ("run.json", '{"epochs": 3, "x": {"a": 1, "a": 2}}',
     "run.json: key 'a' is given twice; keep one"),
    # text fields: what no file name can hold, and a bound on length
    ("run.yaml", 'workdir: "runs/a\\0b"\n',
     "run.yaml: workdir contains a NUL byte, which no file name can hold"),
    ("run.json", '{"data_dir": "d\\u0000"}',
     "run.json: data_dir contains a NUL byte, which no file name can hold"),
    ("run.yaml", f"workdir: {BIG}\n",
     "run.yaml: workdir is 5,000 characters long; the most a path can be is 4,096"),
    # a value is quoted in at most 80 characters, whatever its size
    ("run.yaml", f"dataset: {BIG}\n",
     f"run.yaml: dataset '{'x' * 76}... is not a dataset; give fashion_mnist or mnist"),
    ("run.json", f'{{"epochs": "{BIG}"}}',
     f"run.json: epochs must be an integer, got '{'x' * 76}..."),
    ("run.json", f'{{"epochs": [{", ".join(["1"] * 100_000)}]}}',
     "run.json: epochs must be an integer, got [1, 1, 1, 1, 1, 1, ...]"),
    ("run.json", f'{{"{BIG}": 1}}', f"run.json: unknown key '{'x' * 76}...; the keys are "),
    ("run.json", f'{{"batch_size": 1{"0" * 4000}}}',
     f"batch_size must be in 1..65536, got 1{'0' * 76}..."),
    # an int too large for a float used to be a traceback (OverflowError)
    ("run.json", f'{{"learning_rate": 1{"0" * 400}}}',
     "run.json: learning_rate must be a finite number in (0, 10], got inf"),
    # the CLI's bounds, from a file
    ("run.yaml", "epochs: 0\n", "run.yaml: epochs must be in 1..10000, got 0"),
    ("run.yaml", "devices: -1\n", "run.yaml: devices must be in 1..2147483647, got -1"),
    ("run.yaml", "learning_rate: .nan\n",
     "run.yaml: learning_rate must be a finite number in (0, 10], got nan"),
    ("run.yaml", f"batch_size: {10**12}\n",
     "run.yaml: batch_size must be in 1..65536, got 1000000000000"),
    # validation: an integer is a count, a decimal a fraction
    ("run.yaml", "validation: 5000.0\n",
     "run.yaml: validation must be a count (an integer) or a fraction in (0, 1), got 5000.0"),
    ("run.json", '{"validation": true}',
     "run.json: validation must be a count (an integer) or a fraction in (0, 1), got True"),
    ("run.yaml", "validation: -1\n", "run.yaml: validation must be in 0..2147483647, got -1"),
])
def test_settings_files_get_the_clis_bounds_in_one_short_line(tmp_path, name, content,
                                                               message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError) as caught:
        settings_io.read_settings(str(path))
    text = str(caught.value)
    assert message in text, text
    assert "\n" not in text and len(text) < len(str(path)) + 500, text


def test_every_bound_of_the_cli_is_a_bound_of_the_file():
    """Each range field: one past either end, nan and inf are refused by the file reader
    exactly as by the train option, with one line naming the key."""
    options = train_options()
    for name, (low, high) in config_lib.INT_RANGES.items():
        for value in (low - 1, high + 1):
            with pytest.raises(UserError, match=rf"^f: {name} must be in {low}\.\.{high}, "):
                config_lib.checked_setting("f", name, value)
            with pytest.raises(click.BadParameter):
                options[name].type.convert(str(value), options[name], None)
    for name, (low, high, _, _) in config_lib.FLOAT_RANGES.items():
        for value in (math.nan, math.inf, -math.inf, low - 1, high + 1):
            with pytest.raises(UserError, match=rf"^f: {name} must be a finite number in "):
                config_lib.checked_setting("f", name, value)
            with pytest.raises(click.BadParameter):
                options[name].type.convert(str(value), options[name], None)


# Config with which any one field may take any value it takes alone: no combination
# rule (weight decay needs AdamW, early stop a validation split, ...) is in play.
ANY_ONE_FIELD = Config(dataset="folder:x", optimizer="adamw", schedule="cosine",
                       validation=100, batch_size=1)
VALUES = st.one_of(st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                   st.sampled_from(["sgd", "adamw", "cosine", "modern", "mnist", "idx:d", "",
                                    "a\0b", "runs/x"]),
                   st.lists(st.integers(), max_size=2), st.binary(max_size=3))


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(field=st.sampled_from(list(config_lib.FIELDS)), value=VALUES)
def test_a_value_is_judged_alike_by_config_and_by_a_settings_file(field, value):
    """The rules of a field live once (config.check_field): Config.validate and the
    settings-file reader take the same values, as the same Python values, and refuse
    the others in the same words. (A file may also give a float as text, as YAML 1.1
    wrote 1e-3, and says null; Python says None: those are the file's parsing.)"""
    kind, _ = config_lib.field_type(field)
    assume(not (kind is float and isinstance(value, str)))
    try:
        from_file, file_error = config_lib.checked_setting("f", field, value), None
    except UserError as e:
        from_file, file_error = None, str(e)
    try:
        held, error = getattr(dataclasses.replace(ANY_ONE_FIELD, **{field: value}).validate(),
                              field), None
    except UserError as e:
        held, error = None, str(e)
    assert (error and f"f: {error}") == file_error
    assert held == from_file or (held != held and from_file != from_file)  # nan
    assert type(held) is type(from_file)


def test_quoted_is_bounded_and_cheap_for_any_value():
    shared = ["x"] * 10
    for _ in range(9):  # 10**9 strings by reference, as YAML aliases build them
        shared = [shared] * 10
    loop: list = []
    loop.append(loop)
    for value in (shared, loop, "y" * 10**6, b"z" * 10**6, 10**4000, {i: i for i in range(10**5)}):
        assert len(config_lib.quoted(value)) <= config_lib.QUOTE_CHARS
    assert config_lib.quoted("epochs") == "'epochs'"
    assert config_lib.quoted(3.5) == "3.5"


def test_print_config_shows_the_effective_config_and_reads_back(tmp_path, capsys):
    """Recipe, then --config, then options; printed as YAML that --config reads back to
    the same config (printed again: the same text); nothing trained, no workdir made."""
    import yaml

    (tmp_path / "run.yaml").write_text("epochs: 4\nseed: 3\n")
    workdir = tmp_path / "w"
    args = ["train", "--recipe", "modern", "--config", str(tmp_path / "run.yaml"),
            "--seed", "5", "--workdir", str(workdir), "--print-config"]
    assert main(args) == 0
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    assert printed == {**config_lib.PRESETS["modern"].to_dict(), "epochs": 4, "seed": 5,
                       "workdir": str(workdir)}
    assert list(printed) == list(config_lib.FIELDS)  # declaration order
    (tmp_path / "again.yaml").write_text(text)
    assert main(["train", "--config", str(tmp_path / "again.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == text
    assert not workdir.exists()


@pytest.mark.parametrize("changes", [
    {"workdir": "1e3", "data_dir": "010", "dataset": "idx:yes"},  # texts that look like others
    {"weight_decay": 1e-05, "learning_rate": 10.0, "seed": 2**32 - 1, "devices": 8},
    {"workdir": "runs/w\xf6rk: a # b", "test_fraction": 0.25, "dataset": "folder:x",
     "augment": True, "train_limit": 512},
    {"validation": 1 / 12, "early_stop": 2}, {"validation": 5000},
])
def test_to_yaml_reads_back_to_the_same_config(tmp_path, changes):
    config = dataclasses.replace(PRESETS["smoke"], **changes)
    (tmp_path / "run.yaml").write_text(settings_io.to_yaml(config), encoding="utf-8")
    settings = settings_io.read_settings(str(tmp_path / "run.yaml"))
    assert config_lib.effective_config(None, settings, {}) == config
