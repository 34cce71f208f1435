"""The one place that reconciles what jax writes with what TensorFlow reads.

A jax2tf SavedModel carries the model as a StableHLO portable artifact inside
an XlaCallModule op. jax 0.12 writes StableHLO 1.18 (its "4 weeks old" target)
and calling convention 10; TensorFlow 2.21 reads at most StableHLO 1.13.7.
`tf.saved_model.save` does not notice, and the model then fails at its first
call. So: read both sides' limits, pick the newest versions both accept
(`negotiate`), serialize for them (`serialize_for`), and check the saved graph
(`check_graph`) - all at export time, never at serving time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from pathlib import Path
from typing import Iterator

import jax
from jax import export as jax_export
from jaxlib.mlir.dialects import stablehlo

from lenet_dist import jax_compat
from lenet_dist.errors import UserError

_ARTIFACT_VERSION = re.compile(rb"StableHLO_v(\d+\.\d+\.\d+)")


def parse_version(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in v.strip().split("."))
    except ValueError:
        raise UserError(f"cannot parse StableHLO version {v!r}") from None


@dataclasses.dataclass(frozen=True)
class Producer:
    """What the installed jax can write."""
    stablehlo_default: str        # what jax.export targets on its own
    stablehlo_min: str            # the oldest version jax's StableHLO can downgrade to
    calling_convention_min: int
    calling_convention_default: int


@dataclasses.dataclass(frozen=True)
class Consumer:
    """What the installed TensorFlow can read."""
    stablehlo_max: str
    calling_convention_max: int


@dataclasses.dataclass(frozen=True)
class Plan:
    stablehlo: str
    calling_convention: int
    producer: Producer
    consumer: Consumer

    def to_dict(self) -> dict:
        return {"stablehlo_version": self.stablehlo,
                "calling_convention_version": self.calling_convention,
                "jax_default_stablehlo": self.producer.stablehlo_default,
                "jax_min_stablehlo": self.producer.stablehlo_min,
                "jax_calling_convention_range": [self.producer.calling_convention_min,
                                                 self.producer.calling_convention_default],
                "tensorflow_max_stablehlo": self.consumer.stablehlo_max,
                "tensorflow_max_calling_convention": self.consumer.calling_convention_max}


def producer() -> Producer:
    default = stablehlo.get_version_from_compatibility_requirement(
        stablehlo.StablehloCompatibilityRequirement.WEEK_4)
    return Producer(stablehlo_default=default,
                    stablehlo_min=stablehlo.get_minimum_version(),
                    calling_convention_min=jax_export.minimum_supported_calling_convention_version,
                    calling_convention_default=jax.config.jax_export_calling_convention_version)


def consumer() -> Consumer:
    # TensorFlow here and below: heavy, and the [export] extra.
    from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo
    from tensorflow.compiler.tf2xla.python import xla as tfxla

    return Consumer(stablehlo_max=tf_stablehlo.get_current_version(),
                    calling_convention_max=int(tfxla.call_module_maximum_supported_version()))


def negotiate(prod: Producer, cons: Consumer, jax_version: str = "?",
              tf_version: str = "?") -> Plan:
    """The newest StableHLO and calling convention both sides accept, or a UserError
    that names the versions and what to install."""
    pv = parse_version
    if pv(cons.stablehlo_max) < pv(prod.stablehlo_min):
        raise UserError(
            f"TensorFlow {tf_version} reads StableHLO <= {cons.stablehlo_max}, but jax "
            f"{jax_version} can only write >= {prod.stablehlo_min}; install a newer "
            "tensorflow (pip install -U tensorflow) or an older jax")
    stablehlo = min(prod.stablehlo_default, cons.stablehlo_max, key=pv)
    if cons.calling_convention_max < prod.calling_convention_min:
        raise UserError(
            f"TensorFlow {tf_version} runs XlaCallModule <= v{cons.calling_convention_max}, "
            f"but jax {jax_version} writes >= v{prod.calling_convention_min}; install a "
            "newer tensorflow (pip install -U tensorflow) or an older jax")
    cc = min(prod.calling_convention_default, cons.calling_convention_max)
    return Plan(stablehlo, cc, prod, cons)


def installed_plan() -> Plan:
    import tensorflow as tf

    return negotiate(producer(), consumer(), jax.__version__, tf.__version__)


def downgrade(artifact: bytes, target: str) -> bytes:
    """Re-serialize a StableHLO portable artifact for an older reader."""
    try:
        return stablehlo.serialize_portable_artifact_str(
            stablehlo.deserialize_portable_artifact_str(artifact), target)
    except ValueError as e:
        raise UserError(f"the model cannot be written as StableHLO {target} (it uses "
                        f"newer operations): {e}; install a newer tensorflow") from None


@contextlib.contextmanager
def serialize_for(plan: Plan) -> Iterator[None]:
    """While active, jax.export (and so jax2tf) writes `plan`'s versions.

    jax has no public knob for the StableHLO target, so this wraps its one
    serialization function; `check_graph` then proves it took effect.
    """
    def wrap(original):
        def to_bytecode(module):
            return downgrade(original(module), plan.stablehlo)
        return to_bytecode

    previous_cc = jax.config.jax_export_calling_convention_version
    with jax_compat.stablehlo_serializer_wrapped(wrap):
        jax.config.update("jax_export_calling_convention_version", plan.calling_convention)
        try:
            yield
        finally:
            jax.config.update("jax_export_calling_convention_version", previous_cc)


def artifact_version(artifact: bytes) -> str | None:
    m = _ARTIFACT_VERSION.search(artifact)
    return m.group(1).decode() if m else None


def xla_call_modules(graph_def) -> list[tuple[int, str | None]]:
    """(calling convention, StableHLO version) of every XlaCallModule op in a GraphDef."""
    nodes = list(graph_def.node)
    for fdef in graph_def.library.function:
        nodes.extend(fdef.node_def)
    return [(int(n.attr["version"].i), artifact_version(n.attr["module"].s))
            for n in nodes if n.op == "XlaCallModule"]


def check_saved_model(model_dir, plan: Plan) -> None:
    """check_graph over every meta graph of a written SavedModel (saved_model.pb)."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((Path(model_dir) / "saved_model.pb").read_bytes())
    for meta_graph in saved.meta_graphs:
        check_graph(meta_graph.graph_def, plan)


def check_graph(graph_def, plan: Plan) -> None:
    """Every embedded module must be readable by the installed TensorFlow."""
    modules = xla_call_modules(graph_def)
    if not modules:
        raise UserError("export produced no XlaCallModule op; jax2tf did not serialize")
    for cc, version in modules:
        if version is None or parse_version(version) > parse_version(plan.consumer.stablehlo_max):
            raise UserError(f"export wrote StableHLO {version}, newer than TensorFlow reads "
                            f"({plan.consumer.stablehlo_max})")
        if cc > plan.consumer.calling_convention_max:
            raise UserError(f"export wrote XlaCallModule v{cc}, newer than TensorFlow runs "
                            f"(v{plan.consumer.calling_convention_max})")
