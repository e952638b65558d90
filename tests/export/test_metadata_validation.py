"""Hostile edgeseq metadata: every bad value is refused with a ModelFormatError that names the file,
the key path and what was expected; through the CLI, one `error:` line and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest

import edgeseq
from edgeseq.artifact import METADATA_KEY
from edgeseq.errors import ModelFormatError
from edgeseq.spec import DataSpec, ModelSpec, Scaling

EXPORT = Path(__file__).resolve().parents[2] / "export"
REFERENCE = EXPORT / "pump-lstm.onnx"  # forecast, 3 features, 2 LSTM layers, sample_period 1.0
CLI = Path(sys.executable).with_name("edgeseq")
EXPECTATION = r"must be|expected|requires"  # every message says what a good file holds

Mutation = Callable[[dict[str, Any]], Any]


def put(path: str, value: Any) -> Mutation:
    """Set the value at a dotted key path, e.g. `data_spec.input_scaling.mean`."""
    *parents, last = path.split(".")

    def mutate(meta: dict[str, Any]) -> None:
        for key in parents:
            meta = meta[key]
        meta[last] = value

    return mutate


def drop(path: str) -> Mutation:
    """Remove the key at a dotted key path."""
    *parents, last = path.split(".")

    def mutate(meta: dict[str, Any]) -> None:
        for key in parents:
            meta = meta[key]
        del meta[last]

    return mutate


def raw(text: str) -> Mutation:
    """Replace the whole metadata string."""
    return lambda meta: text


def case(mutate: Mutation, named: str, case_id: str) -> Any:
    return pytest.param(mutate, named, id=case_id)


MEAN = "data_spec.input_scaling.mean"
BAD_SPECS = [
    case(drop("model_spec.task"), "model_spec.task", "task-missing"),
    case(drop("model_spec.hidden_size"), "model_spec.hidden_size", "hidden-size-missing"),
    case(put("model_spec.hidden_size", "32"), "model_spec.hidden_size", "hidden-size-string"),
    case(put("model_spec.hidden_size", True), "model_spec.hidden_size", "hidden-size-bool"),
    case(put("model_spec.hidden_size", 32.0), "model_spec.hidden_size", "hidden-size-float"),
    case(put("model_spec.num_layers", 10**12), "model_spec.num_layers", "layers-absurd"),
    case(put("model_spec.input_size", 0), "model_spec.input_size", "input-size-zero"),
    case(put("model_spec.output_size", None), "model_spec.output_size", "output-size-null"),
    case(put("model_spec.horizon", 1.5), "model_spec.horizon", "horizon-fraction"),
    case(put("model_spec.horizon", [1]), "model_spec.horizon", "horizon-list"),
    case(put("model_spec.n_targets", -1), "model_spec.n_targets", "n-targets-negative"),
    case(put("model_spec.task", 5), "model_spec.task", "task-number"),
    case(put("model_spec.cell", "transformer"), "model_spec.cell", "cell-unknown"),
    case(put("model_spec.nonlinearity", ["tanh"]), "model_spec.nonlinearity", "nonlin-list"),
    case(put("model_spec.dropout", "0"), "model_spec.dropout", "dropout-string"),
    case(put("model_spec.dropout", float("nan")), "model_spec.dropout", "dropout-nan"),
    case(put("model_spec.dropout", 1.0), "model_spec.dropout", "dropout-one"),
    case(put("model_spec.dropout", False), "model_spec.dropout", "dropout-bool"),
    case(put("model_spec.depth", 3), "model_spec", "model-spec-unknown-key"),
    case(put("model_spec", []), "model_spec", "model-spec-array"),
    case(drop(MEAN), MEAN, "mean-missing"),
    case(put(MEAN, ["a", "b", "c"]), f"{MEAN}[0]", "mean-strings"),
    case(put(MEAN, 5), MEAN, "mean-number"),
    case(put(MEAN, "0,0,0"), MEAN, "mean-string"),
    case(put(MEAN, [None, 0, 0]), f"{MEAN}[0]", "mean-null"),
    case(put(MEAN, [0, 0, 10**400]), f"{MEAN}[2]", "mean-overflows"),
    case(put(MEAN, [0, float("inf"), 0]), f"{MEAN}[1]", "mean-infinite"),
    case(put(MEAN, [0, True, 0]), f"{MEAN}[1]", "mean-bool"),
    case(put(MEAN, [0, 0]), "data_spec.input_scaling", "mean-short"),
    case(put("data_spec.input_scaling.std", [1, 0, 1]), "input_scaling.std[1]", "std-zero"),
    case(put("data_spec.input_scaling", None), "data_spec.input_scaling", "scaling-null"),
    case(put("data_spec.input_scaling.skew", []), "data_spec.input_scaling", "scaling-extra"),
    case(put("data_spec.target_scaling", "x"), "data_spec.target_scaling", "target-scaling-text"),
    case(put("data_spec.target_scaling.mean", [0, 0]), "data_spec.target_scaling", "target-cols"),
    case(put("data_spec.features", 5), "data_spec.features", "features-number"),
    case(put("data_spec.features", "pft"), "data_spec.features", "features-string"),
    case(put("data_spec.features", [1, 2, 3]), "data_spec.features[0]", "features-numbers"),
    case(put("data_spec.targets", "pressure"), "data_spec.targets", "targets-string"),
    case(put("data_spec.labels", [None]), "data_spec.labels[0]", "labels-null"),
    case(drop("data_spec.features"), "data_spec.features", "features-missing"),
    case(put("data_spec.sample_period", "1"), "data_spec.sample_period", "period-string"),
    case(put("data_spec.sample_period", -1.0), "data_spec.sample_period", "period-negative"),
    case(put("data_spec.sample_period", True), "data_spec.sample_period", "period-bool"),
    case(put("data_spec.time_unit", 5), "data_spec.time_unit", "time-unit-number"),
    case(put("data_spec.time_col", ["t"]), "data_spec.time_col", "time-col-list"),
    case(put("data_spec.id_col", 1), "data_spec.id_col", "id-col-number"),
    case(put("data_spec.label_col", False), "data_spec.label_col", "label-col-bool"),
    case(put("data_spec", "none"), "data_spec", "data-spec-string"),
    case(put("model_spec.input_size", 2), "model_spec.input_size", "features-disagree"),
]
BAD_DOCUMENTS = [
    case(put("format_version", True), "format_version", "version-true"),
    case(put("format_version", 1.0), "format_version", "version-float"),
    case(put("format_version", "1"), "format_version", "version-string"),
    case(put("format_version", 2), "format_version", "version-newer"),
    case(drop("format_version"), "format_version", "version-missing"),
    case(drop("model_spec"), "model_spec", "model-spec-missing"),
    case(put("task", 5), "task", "task-number"),
    case(put("feature_names", "pressure"), "feature_names", "feature-names-string"),
    case(put("class_labels", [1]), "class_labels[0]", "class-labels-number"),
    case(put("sample_rate_hz", "fast"), "sample_rate_hz", "rate-string"),
    case(put("sample_period", 0), "sample_period", "period-zero"),
    case(put("output_layout", None), "output_layout", "layout-null"),
    case(put("state", [{"input": "h0"}]), "state", "state-partial"),
    case(put("state", 5), "state", "state-number"),
    case(put("parity.torch_vs_onnxruntime_full_sequence", "x"), "parity.torch", "parity-text"),
    case(put("parity", []), "parity", "parity-array"),
]
NOT_OBJECTS = [
    case(raw("[" * 100_000 + "]" * 100_000), "nested too deeply", "nested-100000-deep"),
    case(raw("{"), "not JSON", "truncated"),
    case(raw("[1, 2]"), "must be a JSON object", "array"),
    case(raw("1" * 5000), "not JSON", "5000-digit-number"),
]
CLI_CASES = ["task-missing", "mean-strings", "features-number", "version-true", "nested-100000"]


def hostile_copy(tmp_path: Path, mutate: Mutation) -> Path:
    """The reference model with its metadata rewritten by `mutate`, saved under tmp_path."""
    model = onnx.load(str(REFERENCE), load_external_data=False)
    prop = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    meta = json.loads(prop.value)
    replaced = mutate(meta)
    prop.value = replaced if isinstance(replaced, str) else json.dumps(meta)
    path = tmp_path / "hostile.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize(("mutate", "named"), BAD_SPECS + BAD_DOCUMENTS)
def test_bad_metadata_is_refused_naming_the_file_the_key_and_the_expectation(
    tmp_path, mutate, named
):
    path = hostile_copy(tmp_path, mutate)
    with pytest.raises(ModelFormatError, match=EXPECTATION) as refused:
        edgeseq.load(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ")
    assert named in message


@pytest.mark.parametrize(("mutate", "named"), NOT_OBJECTS)
def test_metadata_that_is_not_a_json_object_is_refused_naming_the_file(tmp_path, mutate, named):
    path = hostile_copy(tmp_path, mutate)
    with pytest.raises(ModelFormatError, match=named) as refused:
        edgeseq.load(path)
    assert str(refused.value).startswith(f"{path}: edgeseq metadata")


@pytest.mark.parametrize(
    ("mutate", "named"),
    [p for p in BAD_SPECS + BAD_DOCUMENTS + NOT_OBJECTS if p.id.startswith(tuple(CLI_CASES))],
)
def test_edgeseq_inspect_prints_one_error_line_for_bad_metadata(tmp_path, mutate, named):
    path = hostile_copy(tmp_path, mutate)
    result = subprocess.run(
        [str(CLI), "inspect", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and named in lines[0]


@pytest.mark.parametrize("path", sorted(EXPORT.glob("*.onnx")), ids=lambda p: p.stem)
def test_every_reference_model_still_loads(path):
    model = edgeseq.load(path)
    assert model.info is not None
    assert len(model.info.data_spec.features) == model.info.model_spec.input_size


def test_specs_survive_a_json_round_trip():
    meta = json.loads(
        next(p.value for p in onnx.load(str(REFERENCE)).metadata_props if p.key == METADATA_KEY)
    )
    spec = ModelSpec.from_dict(meta["model_spec"])
    data = DataSpec.from_dict(meta["data_spec"])
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert DataSpec.from_dict(json.loads(json.dumps(data.to_dict()))) == data


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (lambda: ModelSpec("forecast", "lstm", True, 8, 1, 1), "ModelSpec.input_size"),
        (lambda: ModelSpec("forecast", "lstm", 3, 8, 1, 1, dropout=-0.5), "ModelSpec.dropout"),
        (lambda: Scaling((0.0, float("nan")), (1.0, 1.0)), "Scaling.mean[1]"),
        (lambda: DataSpec(("a", "b"), input_scaling=Scaling.identity(3)), "DataSpec.input_scaling"),
    ],
    ids=["bool-size", "negative-dropout", "nan-mean", "scaling-columns"],
)
def test_specs_built_in_code_obey_the_same_rules(build, named):
    with pytest.raises(ModelFormatError, match=EXPECTATION) as refused:
        build()
    assert named in str(refused.value)
