"""A seeded structure fuzzer of ONNX files for `edgeseq.load`, and the workers that load them.

A model file is untrusted input: a board loads whatever it is sent. Whatever the file holds
(a graph input that declares 2^40 features, an Expand to a shape of 2^60 values, an initializer
whose dims disagree with its bytes or whose dtype is a number no ONNX version defines, a node
that feeds itself, an opset from the future, half a file), the contract is the same: `load`
returns a Model or raises an `EdgeseqError` that says what, where and what was expected; it
never raises anything else, never crashes the process and never hangs.

Files are the reference models in export/*.onnx, changed at the protobuf level: declared dims
and element types, node attributes (values, types, presence), initializers (dtype, dims, raw
bytes, values, external data), node inputs and outputs, op types and domains, node order,
graph inputs and outputs, opset and IR versions, edgeseq's metadata; then, sometimes, the
serialized bytes are truncated, bit-flipped or spliced. File `i` of seed `s` is drawn from
`np.random.default_rng([s, i])` alone, so a failure is replayed by its seed and index:

    python -m tests.onnx_structure_fuzz write SEED INDEX out.onnx
    python -m tests.onnx_structure_fuzz run --seed SEED --files N

Each file is loaded in a worker process that has loaded nothing but the reference models before
(a crash or a hang takes only its worker, which is replaced): a worker that dies is a crash, one
that takes longer than the time limit on one file is a hang. Workers run under an address-space
limit, so an absurd allocation is a MemoryError (counted: not an EdgeseqError) instead of the
machine's memory. A loaded model is also run on one probe sequence and stepped once, so the
paths behind load meet what load let through. EDGESEQ_SPECIALIZE=0 in the workers: a plan with
clip, activations or peepholes would otherwise compile its own kernel (seconds each, and a disk
cache entry per mutant); the interpreter kernels and the NumPy graph are what is fuzzed.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto

ROOT = Path(__file__).resolve().parents[1]
# The reference models of export/ (named, not globbed: a model added there later must not change
# what a seed replays; the bench models of 1 MB and more would slow every file down).
REFERENCE_NAMES = (
    "bench-gru", "bench-lstm", "bench-rnn", "classes-classify-gru", "levels-regress-rnn",
    "pump-gru-int8", "pump-gru", "pump-lstm-int8", "pump-lstm", "pump-rnn", "sine-seq2seq-lstm",
    "waves-generate-lstm",
)  # fmt: skip
REFERENCES = [ROOT / "export" / f"{name}.onnx" for name in REFERENCE_NAMES]
TIME_LIMIT = 60.0  # seconds per file: a legitimate model loads in milliseconds, the worst refused
# file within about 15 (graph.LOAD_LIMITS); a machine busy with other work needs the margin
START_LIMIT = 600.0  # a worker's start: imports and the reference models (a cold Numba cache)
MEMORY_LIMIT = 6 << 30  # bytes of address space per worker
MAX_STEPS_RUN = 256  # a loaded model fixed to a longer sequence is not run whole
OUTCOMES = ("loaded", "refused", "raised", "crash", "hang")  # the last three are failures
FAILURES = ("raised", "crash", "hang")
BACKENDS = ("numba", "numpy")
PLANT = "EDGESEQ_FUZZ_PLANT"  # "crash:3,hang:5,raise:7": the harness's own self-test

HOSTILE_INTS = (
    0, 1, 2, 3, 4, 7, 255, 4096, 65536, 2**20, 2**24, 2**31 - 1, 2**31, 2**32, 2**33 + 1,
    2**40, 2**53 + 1, 2**62, 2**63 - 1, -1, -2, -(2**31), -(2**63),
)  # fmt: skip
HOSTILE_FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e30, -1e30, 3.5e38, float("nan"),
                  float("inf"), float("-inf"))  # fmt: skip
HOSTILE_STRINGS = (
    b"", b"forward", b"reverse", b"bidirectional", b"Tanh", b"Sigmoid", b"Relu", b"tanh",
    b"ScaledTanh", b"Affine", b"HardSigmoid", b"Elu", b"Softsign", b"Softplus", b"LeakyRelu",
    b"ThresholdedRelu", b"\xff\xfe", b"\x00", b"A" * 300, b"..", b"../../etc/passwd",
)  # fmt: skip
ATTRIBUTE_NAMES = (
    "hidden_size", "layout", "direction", "clip", "activations", "activation_alpha",
    "activation_beta", "linear_before_reset", "input_forget", "axis", "axes", "perm", "to",
    "value", "value_float", "value_ints", "keepdims", "transA", "transB", "alpha", "beta",
    "allowzero", "block_size", "saturate", "output_dtype",
)  # fmt: skip
OP_TYPES = (
    "RNN", "LSTM", "GRU", "DynamicQuantizeLSTM", "Identity", "Cast", "Constant", "Transpose",
    "Squeeze", "Unsqueeze", "Reshape", "Slice", "Concat", "Shape", "Gather", "Expand",
    "ConstantOfShape", "Equal", "Where", "Add", "Sub", "Mul", "Div", "Relu", "Tanh", "Sigmoid",
    "LeakyRelu", "Softmax", "MatMul", "Gemm", "DequantizeLinear", "DynamicQuantizeLinear",
    "MatMulInteger", "Loop", "Scan", "If", "Tile", "Range", "Pad", "NoSuchOp",
)  # fmt: skip
DOMAINS = ("", "ai.onnx", "com.microsoft", "ai.onnx.ml", "custom", "ai.onnx.preview.training")
OPSETS = (-1, 0, 1, 6, 7, 9, 11, 13, 14, 17, 19, 21, 22, 23, 24, 25, 26, 100, 2**40)
IR_VERSIONS = (-1, 0, 1, 3, 4, 7, 8, 9, 10, 11, 12, 13, 99, 2**40)


# -- mutations ----------------------------------------------------------------------------------


class Mutator:
    """The changes one file gets, all drawn from one generator."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def pick(self, options: Any) -> Any:
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def hostile_int(self) -> int:
        if self.chance(0.7):
            return int(self.pick(HOSTILE_INTS))
        return int(self.rng.integers(-8, 64))

    def name(self, model: onnx.ModelProto) -> str:
        """A value name: usually one the graph already has, else a new or empty one."""
        g = model.graph
        known = [n for node in g.node for n in (*node.input, *node.output)]
        known += [v.name for v in (*g.input, *g.output, *g.initializer)]
        if known and self.chance(0.85):
            return str(self.pick(known))
        return str(self.pick(["", "ghost", "x", "h0", "y", "\x00", "é" * 3]))

    def apply(self, model: onnx.ModelProto) -> list[str]:
        """1 to 3 structural mutations, in place; their names."""
        kinds = []
        for _ in range(int(self.rng.integers(1, 4))):
            kind = self.pick(list(STRUCTURAL))
            if STRUCTURAL[kind](self, model):
                kinds.append(kind)
        return kinds


def _value_infos(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    g = model.graph
    return [*g.input, *g.output, *g.value_info]


def mutate_dim(m: Mutator, model: onnx.ModelProto) -> bool:
    """A declared dim of a graph input, output or value_info: a hostile size, a name, none;
    or a dim added or taken away."""
    infos = [v for v in _value_infos(model) if v.type.HasField("tensor_type")]
    if not infos:
        return False
    shape = m.pick(infos).type.tensor_type.shape
    choice = int(m.rng.integers(5))
    if choice == 0 or not shape.dim:
        shape.dim.add().dim_value = m.hostile_int()
    elif choice == 1:
        del shape.dim[int(m.rng.integers(len(shape.dim)))]
    else:
        dim = shape.dim[int(m.rng.integers(len(shape.dim)))]
        if choice == 2:
            dim.dim_param = m.pick(["batch", "time", "", "features", "N"])
        elif choice == 3 and m.chance(0.5):
            dim.Clear()
        else:
            dim.dim_value = m.hostile_int()
    return True


def mutate_elem_type(m: Mutator, model: onnx.ModelProto) -> bool:
    infos = [v for v in _value_infos(model) if v.type.HasField("tensor_type")]
    if not infos:
        return False
    m.pick(infos).type.tensor_type.elem_type = int(m.pick([*range(30), 99, 2**31 - 1]))
    return True


def _attribute_value(m: Mutator, attr: AttributeProto) -> None:
    """A hostile value of the attribute's own type, or of another type."""
    kind = attr.type if m.chance(0.8) else int(m.pick([1, 2, 3, 4, 6, 7, 8, 0, 5, 9, 11, 13]))
    for f in ("f", "i", "s", "t", "floats", "ints", "strings"):
        attr.ClearField(f)
    attr.type = kind
    if kind == AttributeProto.FLOAT:
        attr.f = m.pick(HOSTILE_FLOATS)
    elif kind == AttributeProto.INT:
        attr.i = m.hostile_int()
    elif kind == AttributeProto.STRING:
        attr.s = m.pick(HOSTILE_STRINGS)
    elif kind == AttributeProto.TENSOR:
        attr.t.CopyFrom(_hostile_tensor(m, attr.name))
    elif kind == AttributeProto.FLOATS:
        attr.floats.extend(m.pick(HOSTILE_FLOATS) for _ in range(int(m.rng.integers(0, 7))))
    elif kind == AttributeProto.INTS:
        attr.ints.extend(m.hostile_int() for _ in range(int(m.rng.integers(0, 7))))
    elif kind == AttributeProto.STRINGS:
        attr.strings.extend(m.pick(HOSTILE_STRINGS) for _ in range(int(m.rng.integers(0, 7))))


def _hostile_tensor(m: Mutator, name: str) -> TensorProto:
    t = TensorProto(name=name, data_type=int(m.pick([1, 6, 7, 11, 3, 0, 8, 16, 99])))
    t.dims.extend(m.hostile_int() for _ in range(int(m.rng.integers(0, 4))))
    t.raw_data = m.rng.bytes(int(m.pick([0, 1, 4, 8, 16, 64])))
    return t


def mutate_attribute(m: Mutator, model: onnx.ModelProto) -> bool:
    """A node attribute changed (value or type), removed, or one added."""
    nodes = list(model.graph.node)
    if not nodes:
        return False
    node = m.pick(nodes)
    if node.attribute and m.chance(0.6):
        attr = node.attribute[int(m.rng.integers(len(node.attribute)))]
        if m.chance(0.15):
            node.attribute.remove(attr)
        else:
            _attribute_value(m, attr)
        return True
    attr = node.attribute.add()
    attr.name = m.pick(ATTRIBUTE_NAMES)
    attr.type = m.pick([1, 2, 3, 4, 6, 7, 8])
    _attribute_value(m, attr)
    return True


def _tensors(model: onnx.ModelProto) -> list[TensorProto]:
    """Initializers and the tensors of Constant nodes (what a graph computes from)."""
    found = list(model.graph.initializer)
    for node in model.graph.node:
        found += [a.t for a in node.attribute if a.type == AttributeProto.TENSOR]
    return found


def mutate_tensor_dtype(m: Mutator, model: onnx.ModelProto) -> bool:
    tensors = _tensors(model)
    if not tensors:
        return False
    m.pick(tensors).data_type = int(m.pick([*range(30), 99, -1]))
    return True


def mutate_tensor_dims(m: Mutator, model: onnx.ModelProto) -> bool:
    """An initializer's dims: one hostile, one added or dropped, or their order reversed
    (its bytes stay as they were)."""
    tensors = _tensors(model)
    if not tensors:
        return False
    dims = m.pick(tensors).dims
    choice = int(m.rng.integers(4))
    if choice == 0 or not dims:
        dims.append(m.hostile_int())
    elif choice == 1:
        del dims[int(m.rng.integers(len(dims)))]
    elif choice == 2:
        dims[int(m.rng.integers(len(dims)))] = m.hostile_int()
    else:
        dims.reverse()
    return True


def mutate_tensor_data(m: Mutator, model: onnx.ModelProto) -> bool:
    """An initializer's bytes: cut, extended, random, NaN, moved to a typed field, or pointed
    at external data that is not there (or outside the model's folder)."""
    tensors = _tensors(model)
    if not tensors:
        return False
    t = m.pick(tensors)
    raw = bytes(t.raw_data)
    choice = int(m.rng.integers(7))
    if choice == 0:
        t.raw_data = raw[: int(m.rng.integers(len(raw) + 1))]
    elif choice == 1:
        t.raw_data = raw + m.rng.bytes(int(m.pick([1, 3, 4, 8, 1024])))
    elif choice == 2:
        t.raw_data = m.rng.bytes(len(raw))
    elif choice == 3:
        t.raw_data = np.full(len(raw) // 4, np.nan, np.float32).tobytes() + raw[len(raw) // 4 * 4 :]
    elif choice == 4:
        t.ClearField("raw_data")
        t.float_data.extend(m.pick(HOSTILE_FLOATS) for _ in range(int(m.rng.integers(0, 9))))
    elif choice == 5:
        t.ClearField("raw_data")
        t.int64_data.extend(m.hostile_int() for _ in range(int(m.rng.integers(0, 9))))
    else:
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", m.pick(["w.bin", "../w.bin", "/etc/passwd", ""])),
                           ("offset", m.pick(["0", "-8", "99999999999", "x"])),
                           ("length", m.pick(["4", "0", "-1", str(2**62)]))):  # fmt: skip
            if m.chance(0.8):
                t.external_data.add(key=key, value=value)
    return True


def mutate_tensor_values(m: Mutator, model: onnx.ModelProto) -> bool:
    """Hostile numbers inside an integer tensor: the shapes of Reshape and Expand, the axes of
    Slice and Squeeze, the indices of Gather, sequence lengths (2^40 costs 8 bytes)."""
    tensors = [t for t in _tensors(model) if t.data_type in (6, 7) and t.raw_data]
    if not tensors:
        return False
    t = m.pick(tensors)
    dtype = np.int64 if t.data_type == 7 else np.int32
    raw = bytes(t.raw_data)
    values = np.frombuffer(raw[: len(raw) // np.dtype(dtype).itemsize * np.dtype(dtype).itemsize],
                           dtype).copy()  # fmt: skip
    if values.size == 0:
        return False
    info = np.iinfo(dtype)
    for _ in range(int(m.rng.integers(1, 3))):
        values[int(m.rng.integers(values.size))] = np.clip(m.hostile_int(), info.min, info.max)
    t.raw_data = values.tobytes()
    return True


def mutate_node_io(m: Mutator, model: onnx.ModelProto) -> bool:
    """A node input or output renamed (to another value, which may make a cycle or a second
    producer), emptied, dropped or added."""
    nodes = list(model.graph.node)
    if not nodes:
        return False
    node = m.pick(nodes)
    names = node.input if m.chance(0.6) else node.output
    choice = int(m.rng.integers(4))
    if choice == 0 or not names:
        names.append(m.name(model))
    elif choice == 1:
        del names[int(m.rng.integers(len(names)))]
    else:
        names[int(m.rng.integers(len(names)))] = m.name(model) if choice == 2 else ""
    return True


def mutate_op(m: Mutator, model: onnx.ModelProto) -> bool:
    nodes = list(model.graph.node)
    if not nodes:
        return False
    node = m.pick(nodes)
    if m.chance(0.8):
        node.op_type = m.pick(OP_TYPES)
    else:
        node.domain = m.pick(DOMAINS)
    return True


def mutate_nodes(m: Mutator, model: onnx.ModelProto) -> bool:
    """A node removed, duplicated, or the order of two swapped (ONNX wants topological order)."""
    nodes = model.graph.node
    if not nodes:
        return False
    i, j = (int(v) for v in m.rng.integers(len(nodes), size=2))
    choice = int(m.rng.integers(3))
    if choice == 0:
        del nodes[i]
    elif choice == 1:
        nodes.insert(j, nodes[i])
    else:
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(nodes[i])
        b.CopyFrom(nodes[j])
        nodes[i].CopyFrom(b)
        nodes[j].CopyFrom(a)
    return True


def mutate_graph_io(m: Mutator, model: onnx.ModelProto) -> bool:
    """Graph inputs, outputs and initializers: one dropped, duplicated or reordered, an
    initializer also declared as an input, a value_info declared as an output."""
    g = model.graph
    choice = int(m.rng.integers(6))
    seq: Any = m.pick([g.input, g.output, g.initializer])
    if choice == 0 and seq:
        del seq[int(m.rng.integers(len(seq)))]
    elif choice == 1 and seq:
        seq.add().CopyFrom(seq[int(m.rng.integers(len(seq)))])
    elif choice == 2 and len(seq) > 1:
        seq.add().CopyFrom(seq[0])
        del seq[0]
    elif choice == 3 and g.initializer:
        t = m.pick(list(g.initializer))
        g.input.add().CopyFrom(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    elif choice == 4 and g.value_info:
        g.output.add().CopyFrom(m.pick(list(g.value_info)))
    elif choice == 5 and g.input:
        g.input[int(m.rng.integers(len(g.input)))].name = m.name(model)
    else:
        return False
    return True


def mutate_opset(m: Mutator, model: onnx.ModelProto) -> bool:
    """The opset versions and IR version a file claims."""
    choice = int(m.rng.integers(4))
    if choice == 0 and model.opset_import:
        model.opset_import[int(m.rng.integers(len(model.opset_import)))].version = m.pick(OPSETS)
    elif choice == 1:
        model.opset_import.add(domain=m.pick(DOMAINS), version=m.pick(OPSETS))
    elif choice == 2 and model.opset_import:
        del model.opset_import[int(m.rng.integers(len(model.opset_import)))]
    else:
        model.ir_version = m.pick(IR_VERSIONS)
    return True


def mutate_metadata(m: Mutator, model: onnx.ModelProto) -> bool:
    """edgeseq's metadata JSON: a number replaced by a hostile one, cut short, or dropped."""
    props = list(model.metadata_props)
    if not props:
        return False
    prop = m.pick(props)
    text = prop.value
    choice = int(m.rng.integers(4))
    if choice == 0:
        prop.value = text[: int(m.rng.integers(len(text) + 1))]
    elif choice == 1:
        digits = [i for i, c in enumerate(text) if c.isdigit()]
        if digits:
            at = m.pick(digits)
            prop.value = text[:at] + str(m.hostile_int()) + text[at + 1 :]
    elif choice == 2:
        prop.value = text.replace("true", "null", 1).replace('"', "'", int(m.rng.integers(2)))
    else:
        model.metadata_props.remove(prop)
    return True


STRUCTURAL: dict[str, Callable[[Mutator, onnx.ModelProto], bool]] = {
    "dim": mutate_dim,
    "elem_type": mutate_elem_type,
    "attribute": mutate_attribute,
    "tensor_dtype": mutate_tensor_dtype,
    "tensor_dims": mutate_tensor_dims,
    "tensor_data": mutate_tensor_data,
    "tensor_values": mutate_tensor_values,
    "node_io": mutate_node_io,
    "op": mutate_op,
    "nodes": mutate_nodes,
    "graph_io": mutate_graph_io,
    "opset": mutate_opset,
    "metadata": mutate_metadata,
}


def mutate_bytes(m: Mutator, raw: bytes) -> tuple[bytes, str]:
    """The serialized file truncated, bit-flipped or with a chunk of itself spliced in."""
    choice = int(m.rng.integers(3))
    if choice == 0:
        return raw[: int(m.rng.integers(len(raw) + 1))], "truncate"
    if choice == 1:
        data = bytearray(raw)
        for _ in range(int(m.rng.integers(1, 9))):
            data[int(m.rng.integers(len(data)))] ^= 1 << int(m.rng.integers(8))
        return bytes(data), "flip"
    a, b = sorted(int(v) for v in m.rng.integers(len(raw) + 1, size=2))
    at = int(m.rng.integers(len(raw) + 1))
    return raw[:at] + raw[a:b] + raw[at:], "splice"


# -- one file -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FuzzFile:
    index: int
    reference: str
    backend: str
    kinds: tuple[str, ...]
    data: bytes


_REFERENCE_MODELS: dict[Path, onnx.ModelProto] = {}


def _reference(path: Path) -> onnx.ModelProto:
    if path not in _REFERENCE_MODELS:
        _REFERENCE_MODELS[path] = onnx.load(path)
    return _REFERENCE_MODELS[path]


def make_file(seed: int, index: int) -> FuzzFile:
    """File `index` of `seed`: a reference model, 1-3 structural mutations, sometimes (15%) a
    byte-level one; and the backend it is loaded with."""
    m = Mutator(np.random.default_rng([seed, index]))
    path = m.pick(REFERENCES)
    model = onnx.ModelProto()
    model.CopyFrom(_reference(path))
    kinds = m.apply(model)
    data = model.SerializeToString()
    if m.chance(0.15) or not kinds:
        data, kind = mutate_bytes(m, data)
        kinds.append(kind)
    return FuzzFile(index, path.name, m.pick(BACKENDS), tuple(kinds), data)


# -- the worker: loads files, one at a time, and says what happened ----------------------------


def _use(model: Any) -> None:
    """What a caller does next: one probe sequence through `run`, one sample through a
    stream (when the model streams). Refusals are fine; anything else is not."""
    from edgeseq.errors import EdgeseqError

    steps = model.inputs.fixed_steps or 2
    if steps <= MAX_STEPS_RUN:  # a run is the caller's own size: unbounded, unlike loading
        model.run({model.inputs.x: model.inputs.zeros(steps)})
    try:
        stream = model.stream()
    except EdgeseqError:
        return
    stream.step(np.zeros(model.n_features, np.float32))


def load_one(path: Path, backend: str) -> tuple[str, str]:
    """(outcome, detail) for loading one file: loaded, refused (an EdgeseqError) or raised."""
    import edgeseq
    from edgeseq.errors import EdgeseqError

    try:
        model = edgeseq.load(path, backend=backend)
        _use(model)
    except EdgeseqError as exc:
        return "refused", f"{type(exc).__name__}: {str(exc).replace(str(path), '<file>')[:300]}"
    except BaseException as exc:  # the point: anything else is a finding
        return "raised", f"{type(exc).__name__}: {str(exc)[:300]}"
    return "loaded", model.plan_note[:120]


def _planted(index: int) -> str | None:
    """The harness's self-test: misbehave on purpose at the indices EDGESEQ_FUZZ_PLANT names."""
    for item in filter(None, os.environ.get(PLANT, "").split(",")):
        what, at = item.split(":")
        if int(at) == index:
            return what
    return None


def _misbehave(what: str) -> tuple[str, str]:
    if what == "crash":
        os.abort()
    if what == "hang":
        time.sleep(3600)
    try:
        raise ValueError("planted")
    except ValueError as exc:
        return "raised", f"{type(exc).__name__}: {exc}"


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def worker(seed: int) -> None:
    """Read indices from stdin, one per line; answer each with one JSON line on stdout."""
    _limit_memory()
    for path in REFERENCES:  # imports, kernels and caches: what every later file shares
        for backend in BACKENDS:
            outcome, detail = load_one(path, backend)
            if outcome != "loaded":  # mutants of a broken reference would prove nothing
                sys.exit(f"reference model {path} does not load on {backend}: {detail}")
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    with tempfile.TemporaryDirectory(prefix="onnx-fuzz-") as tmp:
        for line in sys.stdin:
            index = int(line)  # the runner sends indices only
            start = time.perf_counter()
            f = make_file(seed, index)
            path = Path(tmp) / f"{index}.onnx"
            path.write_bytes(f.data)
            planted = _planted(index)
            outcome, detail = _misbehave(planted) if planted else load_one(path, f.backend)
            path.unlink()
            ms = round(1e3 * (time.perf_counter() - start), 2)
            answer = {"index": index, "outcome": outcome, "detail": detail, "ms": ms}
            out.write(json.dumps(answer) + "\n")
            out.flush()


# -- the runner: workers, deadlines, the tally --------------------------------------------------


@dataclass
class Report:
    seed: int
    files: int
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)  # mutations applied, over all files
    refusals: Counter[str] = field(default_factory=Counter)  # error class of each refusal
    failures: list[dict[str, Any]] = field(default_factory=list)  # every raised, crash, hang
    slowest: tuple[float, int] = (0.0, -1)  # (ms, index)
    restarts: int = 0

    def summary(self) -> str:
        counts = ", ".join(f"{k} {self.outcomes[k]}" for k in OUTCOMES)
        return (f"seed {self.seed}: {self.files} files in {self.seconds:.1f} s ({counts}); "
                f"slowest file {self.slowest[0]:.0f} ms (index {self.slowest[1]}); "
                f"{self.restarts} worker restarts")  # fmt: skip

    def record(self, f: FuzzFile, outcome: str, detail: str, ms: float | None) -> None:
        self.outcomes[outcome] += 1
        self.kinds.update(f.kinds)
        if outcome == "refused":
            self.refusals[detail.split(":")[0]] += 1
        if ms is not None and ms > self.slowest[0]:
            self.slowest = (ms, f.index)
        if outcome in FAILURES:
            self.failures.append({"index": f.index, "outcome": outcome, "detail": detail,
                                  "reference": f.reference, "backend": f.backend,
                                  "kinds": list(f.kinds)})  # fmt: skip


class Worker:
    """One worker process and the file it is on."""

    def __init__(self, seed: int, env: dict[str, str], log: Path) -> None:
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.onnx_structure_fuzz", "worker", "--seed", str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, cwd=ROOT, env=env,
        )  # fmt: skip
        self.index: int | None = None
        self.deadline = time.monotonic() + START_LIMIT
        self.ready = False
        self.buffer = b""

    def send(self, index: int, limit: float) -> None:
        assert self.proc.stdin is not None
        self.index, self.deadline = index, time.monotonic() + limit
        self.proc.stdin.write(f"{index}\n".encode())
        self.proc.stdin.flush()

    def lines(self) -> list[bytes] | None:
        """Complete lines read so far; None at end of file (the worker died)."""
        assert self.proc.stdout is not None
        chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
        if not chunk:
            return None
        self.buffer += chunk
        *done, self.buffer = self.buffer.split(b"\n")
        return done

    def stop(self) -> int | None:
        """End this worker (only ours: by its own handle); its exit status."""
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self.log.close()
        return code


def _worker_env(plant: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != PLANT}
    if plant:
        env[PLANT] = plant
    env["EDGESEQ_SPECIALIZE"] = "0"
    env["PYTHONWARNINGS"] = "ignore"  # a worker's stderr is its crash log, not a warning feed
    return env


def _tail(log: Path) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return " | ".join(text[-3:])[:300]


class Run:
    """`files` files of `seed`, spread over `workers` workers; each file's deadline is
    `time_limit` seconds from when its worker got it."""

    def __init__(self, seed: int, files: int, workers: int, time_limit: float,
                 plant: str = "") -> None:  # fmt: skip
        self.seed, self.files, self.time_limit = seed, files, time_limit
        self.n_workers = workers
        self.report = Report(seed, files)
        self.next_index = 0
        self.sel = selectors.DefaultSelector()
        self.logdir = Path(tempfile.mkdtemp(prefix="onnx-fuzz-logs-"))
        self.spawned = 0
        self.env = _worker_env(plant)

    def start_worker(self) -> None:
        w = Worker(self.seed, self.env, self.logdir / f"worker-{self.spawned}.log")
        self.spawned += 1
        assert w.proc.stdout is not None
        self.sel.register(w.proc.stdout, selectors.EVENT_READ, w)

    def give(self, w: Worker) -> None:
        if self.next_index < self.files:
            w.send(self.next_index, self.time_limit)
            self.next_index += 1
        else:
            w.index = None

    def replace(self, w: Worker, outcome: str, why: str) -> None:
        """Count the worker's file as a crash or hang, end it and start another."""
        assert w.proc.stdout is not None
        self.sel.unregister(w.proc.stdout)
        code = w.stop()
        if w.index is None and not w.ready:
            raise RuntimeError(f"a fuzz worker failed to start ({why}, exit {code}): "
                               f"{_tail(Path(w.log.name))}")  # fmt: skip
        if w.index is not None:
            f = make_file(self.seed, w.index)
            detail = f"{why} (exit status {code}): {_tail(Path(w.log.name))}"
            self.report.record(f, outcome, detail, None)
            self.report.restarts += 1
        if self.next_index < self.files:
            self.start_worker()

    def take(self, w: Worker, line: bytes) -> None:
        if line == b"ready":
            w.ready = True
        else:
            answer = json.loads(line)
            f = make_file(self.seed, answer["index"])
            self.report.record(f, answer["outcome"], answer["detail"], answer["ms"])
        self.give(w)

    def busy(self) -> list[Worker]:
        return [key.data for key in self.sel.get_map().values() if key.data.index is not None
                or not key.data.ready]  # fmt: skip

    def go(self) -> Report:
        start = time.monotonic()
        for _ in range(min(self.n_workers, max(1, self.files))):
            self.start_worker()
        try:
            while self.busy():
                self.step()
        finally:
            for key in list(self.sel.get_map().values()):
                self.sel.unregister(key.fileobj)
                key.data.stop()
            shutil.rmtree(self.logdir, ignore_errors=True)  # a failure's log tail is in its detail
        self.report.seconds = time.monotonic() - start
        return self.report

    def step(self) -> None:
        busy = self.busy()
        timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic())
        for key, _ in self.sel.select(timeout):
            w = key.data
            lines = w.lines()
            if lines is None:
                self.replace(w, "crash", "the worker died")
                continue
            for line in lines:
                self.take(w, line)
        now = time.monotonic()
        for w in self.busy():
            if now > w.deadline:
                self.replace(w, "hang", f"no answer within {self.time_limit:g} s")


def run(seed: int, files: int, workers: int = 2, time_limit: float = TIME_LIMIT,
        plant: str = "") -> Report:  # fmt: skip
    """Fuzz `files` files of `seed`; `plant` (for the harness's self-test) makes the workers
    crash, hang or raise at the indices it names ("crash:3,hang:5,raise:7")."""
    return Run(seed, files, workers, time_limit, plant).go()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.onnx_structure_fuzz")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--seed", type=int, required=True)
    r = sub.add_parser("run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--files", type=int, default=1000)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--time-limit", type=float, default=TIME_LIMIT)
    o = sub.add_parser("write")
    o.add_argument("seed", type=int)
    o.add_argument("index", type=int)
    o.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "worker":
        worker(args.seed)
    elif args.command == "write":
        f = make_file(args.seed, args.index)
        args.out.write_bytes(f.data)
        print(f"{args.out}: from {f.reference}, {', '.join(f.kinds)}; load with "
              f"backend={f.backend!r} (EDGESEQ_SPECIALIZE=0)")  # fmt: skip
    else:
        report = run(args.seed, args.files, args.workers, args.time_limit)
        print(report.summary())
        print("mutations:", dict(report.kinds.most_common()))
        print("refusals:", dict(report.refusals.most_common()))
        for failure in report.failures[:50]:
            print(json.dumps(failure))


if __name__ == "__main__":
    main()
