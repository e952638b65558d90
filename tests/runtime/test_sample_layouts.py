"""Every layout a caller may hold a sample in (a row of a pandas frame, a slice with a step,
float64, ints, a list, a tuple) steps a stream to the bit as a contiguous float32 vector does;
a float32 vector in any layout reaches the model's kernel as is, and any other layout is cast
into the stream's own vector (one copy, no allocation, no failed dispatch). Refusals are as
before.

Timing is the benchmark's (`edgeseq bench`: its sample layouts table), never a test's."""

from __future__ import annotations

import contextlib
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edgeseq
from edgeseq.bench.markdown import markdown, targets
from edgeseq.errors import ShapeError

ROOT = Path(__file__).resolve().parents[2]
MODELS = [ROOT / "export" / f"pump-{cell}.onnx" for cell in ("lstm", "gru", "rnn")]
STEPS = 12
pd = pytest.importorskip("pandas")


def _data(n_features: int) -> dict[str, Any]:
    """float64 values that are no float32 (so every cast rounds), and a frame of them."""
    rng = np.random.default_rng(7)
    x64 = rng.standard_normal((STEPS, n_features)) * 3
    ints = np.round(x64).astype(np.int64)
    columns = [f"c{j}" for j in range(n_features)]
    return {"x64": x64, "ints": ints, "frame": pd.DataFrame(x64, columns=columns),
            "int_frame": pd.DataFrame(ints, columns=columns)}  # fmt: skip


def _read_only(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x.flags.writeable = False
    return x


def _unaligned(x: np.ndarray) -> np.ndarray:
    raw = np.zeros(x.nbytes + 1, np.uint8)
    view = raw[1:].view(x.dtype)
    view[:] = x
    return view


# name -> (sample t in that layout, whether its values are the ints)
# fmt: off
LAYOUTS = {
    "frame.to_numpy(float32) row": (lambda d, t: d["frame"].to_numpy(np.float32)[t], False),
    "frame.iloc row (float64)": (lambda d, t: d["frame"].iloc[t].to_numpy(), False),
    "frame.values row (float64)": (lambda d, t: d["frame"].values[t], False),
    "int frame row": (lambda d, t: d["int_frame"].to_numpy()[t], True),
    "int frame.to_numpy(float32) row": (lambda d, t: d["int_frame"].to_numpy(np.float32)[t],
                                        True),
    "float32 slice with a step": (lambda d, t: np.repeat(d["x64"][t], 3).astype(np.float32)[::3],
                                  False),
    "float32 reversed": (lambda d, t: d["x64"][t].astype(np.float32)[::-1].copy()[::-1], False),
    "float32 read-only": (lambda d, t: _read_only(d["x64"][t].astype(np.float32)), False),
    "float32 unaligned": (lambda d, t: _unaligned(d["x64"][t].astype(np.float32)), False),
    "float32 big-endian": (lambda d, t: d["x64"][t].astype(">f4"), False),
    "float64 contiguous": (lambda d, t: d["x64"][t].copy(), False),
    "float64 slice with a step": (lambda d, t: np.repeat(d["x64"][t], 2)[::2], False),
    "float64 big-endian": (lambda d, t: d["x64"][t].astype(">f8"), False),
    "float16": (lambda d, t: d["x64"][t].astype(np.float16), False),
    "longdouble": (lambda d, t: d["x64"][t].astype(np.longdouble), False),
    "int64": (lambda d, t: d["ints"][t].copy(), True),
    "int32 strided": (lambda d, t: np.repeat(d["ints"][t], 2).astype(np.int32)[::2], True),
    "uint8": (lambda d, t: np.abs(d["ints"][t]).astype(np.uint8), True),
    "bool": (lambda d, t: d["ints"][t] > 0, True),
    "list of floats": (lambda d, t: d["x64"][t].tolist(), False),
    "tuple of floats": (lambda d, t: tuple(d["x64"][t].tolist()), False),
    "list of float32 scalars": (lambda d, t: list(d["x64"][t].astype(np.float32)), False),
    "list of float64 scalars": (lambda d, t: list(d["x64"][t]), False),
    "list of ints": (lambda d, t: d["ints"][t].tolist(), True),
    "tuple of int64 scalars": (lambda d, t: tuple(d["ints"][t]), True),
    "list of bools": (lambda d, t: (d["ints"][t] > 0).tolist(), True),
    "list of mixed ints and floats": (lambda d, t: [int(v) if j % 2 else float(v)
                                                    for j, v in enumerate(d["ints"][t])], True),
}
# fmt: on


def _expected(sample: Any) -> np.ndarray:
    """The sample as the general conversion reads it (np.asarray, then float32), contiguous."""
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(np.asarray(sample).astype(np.float32))


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_steps_to_the_bit_as_a_contiguous_float32_vector(path, layout):
    model = edgeseq.load(path)
    data = _data(model.n_features)
    make, _ = LAYOUTS[layout]
    plain, other = model.stream(), model.stream()
    for t in range(STEPS):
        sample = make(data, t)
        before = np.array(sample, copy=True)
        got = other.step(sample)
        np.testing.assert_array_equal(got, plain.step(_expected(sample)))
        np.testing.assert_array_equal(np.asarray(sample), before)  # the input is not modified
    for key, value in other.state.items():
        np.testing.assert_array_equal(value, plain.state[key])


def test_the_layouts_hold_the_values_they_are_named_for():
    """The float layouts carry the float64 values rounded to float32, the int ones the ints:
    so the test above compares the same numbers, not layouts that agree by accident."""
    data = _data(3)
    for layout, (make, ints) in LAYOUTS.items():
        want = data["ints"][0] if ints else data["x64"][0].astype(np.float32)
        if layout == "uint8":
            want = np.abs(want)
        elif layout in ("bool", "list of bools"):
            want = want > 0
        got, want = _expected(make(data, 0)), np.float32(want)
        if layout == "float16":  # rounded to 11 bits: the same numbers to float16's precision
            np.testing.assert_allclose(got, want, rtol=1e-3, err_msg=layout)
        else:
            np.testing.assert_array_equal(got, want, err_msg=layout)


class _Spy:
    """Stands in for a stream's kernel, recording the sample array each call receives (and a
    copy of its values, as the stream's own vector is overwritten by the next cast)."""

    def __init__(self, kernel: Any) -> None:
        self.kernel, self.seen, self.values = kernel, [], []

    def __call__(self, params: Any, x: np.ndarray, work: Any, out: Any) -> int:
        self.seen.append(x)
        self.values.append(np.array(x))
        return self.kernel(params, x, work, out)


def _spied(path: Path = MODELS[0]) -> tuple[Any, _Spy]:
    stream = edgeseq.load(path).stream()
    spy = _Spy(stream._kernel)
    stream._kernel = spy
    return stream, spy


# Native float32 vectors in any layout: the kernel's signature takes them as they are.
FLOAT32 = {"frame.to_numpy(float32) row", "int frame.to_numpy(float32) row",
           "float32 slice with a step", "float32 reversed", "float32 read-only",
           "float32 unaligned"}  # fmt: skip


@pytest.mark.parametrize("layout", sorted(FLOAT32 | {"contiguous"}))
def test_a_float32_vector_reaches_the_kernel_as_is(layout):
    stream, spy = _spied()
    data = _data(stream.n_features)
    plain = lambda d, t: d["x64"][t].astype(np.float32)  # noqa: E731
    make = LAYOUTS[layout][0] if layout in LAYOUTS else plain
    xs = [make(data, t) for t in range(3)]
    for x in xs:
        stream.step(x)
    assert all(seen is x for seen, x in zip(spy.seen, xs, strict=True))


# Left to the general conversion (np.asarray): a list mixing ints and floats is a float64
# vector to NumPy unless an int is beyond 64 bits (then it holds objects, and is refused); a
# long double has no exact Python float to go through.
GENERAL = {"list of mixed ints and floats", "longdouble"}


@pytest.mark.parametrize("layout", sorted(set(LAYOUTS) - GENERAL - FLOAT32))
def test_any_other_layout_is_cast_into_the_streams_own_vector(layout):
    """One copy into a vector the stream keeps: nothing is allocated per step for it."""
    stream, spy = _spied()
    data = _data(stream.n_features)
    make, _ = LAYOUTS[layout]
    for t in range(3):
        stream.step(make(data, t))
    assert all(x is spy.seen[0] for x in spy.seen)
    assert spy.seen[0] is stream._staging.x and spy.seen[0].flags.carray


def test_streams_do_not_share_their_own_vectors():
    model = edgeseq.load(MODELS[0])
    data = _data(model.n_features)
    a, b = model.stream(), model.stream()
    both = [(a.step(data["x64"][t]), b.step(data["x64"][-1 - t])) for t in range(STEPS)]
    alone_a, alone_b = model.stream(), model.stream()
    for t in range(STEPS):
        np.testing.assert_array_equal(both[t][0], alone_a.step(_expected(data["x64"][t])))
        np.testing.assert_array_equal(both[t][1], alone_b.step(_expected(data["x64"][-1 - t])))


def test_an_output_is_the_callers_own_array_not_the_streams_vector():
    stream = edgeseq.load(MODELS[0]).stream()
    first = stream.step([1.0, 40.0, 2.5])
    kept = first.copy()
    stream.step([3.0, 41.0, 2.0])
    np.testing.assert_array_equal(first, kept)


REFUSED = {
    "float64 row beyond float32": (np.full((3, 2), 1e300)[:, 0], r"\[0\] is inf"),
    "strided float32 NaN": (np.array([[1.0, np.nan, 2.0]] * 2, np.float32, order="F")[1],
                            r"\[1\] is nan"),
    "float64 too narrow": (np.zeros(4)[::2], r"shape \(2,\)"),
    "float64 big-endian beyond float32": (np.full(3, -1e300, ">f8"), r"\[0\] is -inf"),
    "longdouble beyond float32": (np.full(3, 1e300, np.longdouble), r"\[0\] is inf"),
    "int too wide": (np.zeros(4, np.int64), r"shape \(4,\)"),
    "float32 2-D": (np.zeros((1, 3), np.float32), r"shape \(1, 3\)"),
    "float32 0-d": (np.float32(1.0), r"shape \(\)"),
    "complex": (np.array([1 + 5j, 40, 2.5]), "complex128"),
    "strings": (np.array(["1", "2", "3"]), "<U1"),
    "list of strings": (["1", "2", "3"], "<U1"),
    "list with None": ([1.0, None, 2.5], "object"),
    "list with a complex": ([1.0, 2j, 2.5], "complex128"),
    "list of Decimals": ([Decimal(1), Decimal(2), Decimal(3)], "object"),
    "list of ints beyond 64 bits": ([10**400] * 3, "object"),
    "list of ints beyond uint64": ([2**64, 1, 2], "object"),
    "list beyond float32": ([1.0, 1e300, 2.5], r"\[1\] is inf"),
    "list with infinity": ((1.0, float("inf"), 2.5), r"\[1\] is inf"),
    "list too short": ([1.0, 2.0], r"shape \(2,\)"),
    "list of lists": ([[1.0], [2.0], [3.0]], r"shape \(3, 1\)"),
    "nested list": ([[1.0, 2.0, 3.0]], r"shape \(1, 3\)"),
    "ragged list": ([1.0, [2.0], 3.0], "real numbers|sequence"),
    "datetimes": (np.array(["2020-01-01"] * 3, "datetime64[D]"), "datetime64"),
    "a string": ("abc", "sample"),
    "None": (None, "sample"),
}  # fmt: skip


@pytest.mark.parametrize(("bad", "message"), list(REFUSED.values()), ids=list(REFUSED))
def test_what_is_no_sample_is_refused_as_before_and_the_state_kept(bad, message):
    """Warnings are errors in this suite: a cast that overflows must not warn either."""
    stream = edgeseq.load(MODELS[0]).stream()
    stream.step([1.0, 40.0, 2.5])
    before = stream.state
    with pytest.raises(ShapeError, match=message):
        stream.step(bad)
    for key, value in stream.state.items():
        np.testing.assert_array_equal(value, before[key])


@pytest.mark.parametrize(
    "big", [[2**63, 1, 2], [2**53 + 1, -(2**53) - 1, 3], (2**60 + 12345, 0, -1)], ids=str
)
def test_ints_too_large_for_an_exact_double_are_read_as_numpy_reads_them(big):
    """Beyond 2**53 an int would be rounded twice through a float: the general path's."""
    stream, twin = edgeseq.load(MODELS[0]).stream(), edgeseq.load(MODELS[0]).stream()
    np.testing.assert_array_equal(stream.step(big), twin.step(_expected(big)))


def test_mixed_lists_cast_to_the_bit_as_numpy_reads_them():
    """Every mix of Python and NumPy scalars a list or tuple may hold, against np.asarray:
    what reaches the kernel, whether the stream cast it itself or np.asarray did."""
    stream, spy = _spied()
    rng = np.random.default_rng(3)
    pool = [0, -7, 2**53 + 1, 2**60 + 12345, 2**63 - 1, True, np.True_, np.int64(2**61 + 7),
            np.int32(-5), np.uint32(2**32 - 1), np.uint8(255), 1.1, 1e300, -3.4028235e38, 1e-46,
            np.float64(0.1), np.float32(0.1), np.float16(0.1), float("nan"), 2**31, -(2**31),
            2**31 - 1, 12345678]  # fmt: skip
    cast_here = 0
    for _ in range(3000):
        x = [pool[i] for i in rng.integers(len(pool), size=stream.n_features)]
        sample = tuple(x) if rng.random() < 0.5 else x
        calls = len(spy.seen)
        with contextlib.suppress(ShapeError):  # NaN or infinity, in it or in what it drove
            stream.step(sample)
        assert len(spy.seen) == calls + 1, sample  # every such list reaches the kernel
        got = spy.values[-1]
        assert np.array_equal(got.view(np.uint32), _expected(sample).view(np.uint32)), sample
        cast_here += spy.seen[-1] is stream._staging.x
    assert 300 < cast_here < 2700  # both the stream's own casts and np.asarray's are tried


def _figures(layout_us: float) -> dict[str, Any]:
    timing = {"median_us": 2.0, "p99_us": 4.0}
    return {
        "model": "m.onnx", "plan": "fused", "c_step_us": None, "feed_us_per_sample": 2.0,
        "step": {"numba": timing, "onnxruntime run()": {"median_us": 50.0, "p99_us": 60.0}},
        "layouts": {"float32, contiguous (the fast path)": timing,
                    "list of floats": {"median_us": layout_us, "p99_us": 5.0}},
        "pool": {1: {"edgeseq_samples_per_s": 2e5, "onnxruntime_samples_per_s": 1e5,
                     "backends": {}}},
        "first_prediction_cold_s": 20.0, "first_prediction_warm_s": 0.8, "rss_mib": 120.0,
    }  # fmt: skip


def test_the_report_has_a_sample_layouts_table_and_judges_the_slowest():
    report = markdown([_figures(2.6)], "edgeseq bench m.onnx")
    assert "| float32, contiguous (the fast path) | 2.00 | 4.00 | 1.00 |" in report
    assert "| list of floats | 2.60 | 5.00 | 1.30 |" in report
    met = {n: ok for n, _, _, ok in targets(_figures(2.6))}
    assert met["slowest sample layout / contiguous float32"]
    assert not {n: ok for n, _, _, ok in targets(_figures(3.2))}[
        "slowest sample layout / contiguous float32"
    ]
