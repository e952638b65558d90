"""The harness behind `edgeseq bench` and `make bench`: speed, start-up and memory, as ratios
measured in one run on one machine (absolute figures on a shared machine are noise).

What it measures for a model: `stream.step` latency (median, p99) for each backend and for
PyTorch eager when torch is installed; a C step built the fast way (benchmarks/step.c, the same
program as the kernels, with the same fast-math licence); these and `feed` are measured in
alternating rounds, best round each (see _interleaved); `step` with the sample in each layout a
caller may hold (a row of a frame, float64, a list...); `feed` over a 10,000-step block; pool
throughput for 1, 64 and 1,024 streams against ONNX Runtime on a batch of the same size; process
start to first prediction with a cold and a warm Numba cache; resident memory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgeseq.artifact import sample_feeds
from edgeseq.errors import EdgeseqError
from edgeseq.runtime import Model, load
from edgeseq.runtime.kernels.program import OWN_KERNEL_ONLY, c_header

C_SOURCE = Path(__file__).resolve().parents[2] / "benchmarks" / "step.c"
POOL_SIZES = (1, 64, 1024)
OTHER_BACKENDS = ("onnxruntime", "numpy")  # measured beside numba (the default) in pools, start-up
FEED_STEPS = 10_000


QUIESCE_S = 0.25  # idle time before each contender's round: see _quiesce


def _quiesce() -> None:
    """Let the last contender's worker threads go to sleep before the next one is timed.

    OpenBLAS (behind numpy's GEMMs), ONNX Runtime and PyTorch's OpenMP keep their worker
    threads spinning for a while after each call, in case more work comes. On a 2-core
    machine a spinning thread left by one contender takes a core from the next: alternating
    ONNX Runtime's batch with edgeseq's pool back to back made *both* up to 2.5x slower than
    either alone. A deployed process runs one engine, so each is timed after the others idle.
    """
    time.sleep(QUIESCE_S)


def _latencies(fn: Any, calls: int) -> dict[str, float]:
    """Median and p99 of single calls, in microseconds (after a warm-up), less the cost of
    the stopwatch itself (two clock reads and a call of an empty function, about 0.1 us)."""
    for _ in range(min(calls, 500)):
        fn()
    raw = _timed_calls(fn, calls)
    empty = float(np.median(_timed_calls(_nothing, min(calls, 5000))))
    samples = np.maximum(raw - empty, 0.0)
    return {"median_us": float(np.median(samples)) / 1e3,
            "p99_us": float(np.percentile(samples, 99)) / 1e3}  # fmt: skip


def _nothing() -> None:
    return None


def _timed_calls(fn: Any, calls: int) -> np.ndarray:
    """ns of each of `calls` single calls of fn."""
    samples = np.empty(calls)
    clock = time.perf_counter_ns
    for i in range(calls):
        start = clock()
        fn()
        samples[i] = clock() - start
    return samples


def _inputs(model: Model, rows: int, seed: int = 0) -> np.ndarray:
    """Samples spread like the training data: with a target transform, target columns that
    move as the training targets did (artifact.sample_feeds), not its changes' spread."""
    info = model.info
    if info is not None and info.data_spec.target_transform is not None:
        return sample_feeds(info.model_spec, info.data_spec, 1, rows, seed)["x"][0]
    x = np.random.default_rng(seed).standard_normal((rows, model.n_features)).astype(np.float32)
    if info is not None:
        scaling = info.data_spec.input_scaling
        x = x * np.asarray(scaling.std, np.float32) + np.asarray(scaling.mean, np.float32)
    return x


def _ort_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_step(path: Path, model: Model, batch: int) -> Any:
    """A closure running ONNX Runtime on (batch, 1, F) with the state outputs fed back."""
    session = _ort_session(path)
    names = [i.name for i in session.get_inputs()]
    x = _inputs(model, batch)
    x = x[None] if model.time_first else x[:, None]
    state = {}
    for spec in session.get_inputs()[1:]:
        state[spec.name] = np.zeros([d if isinstance(d, int) else batch for d in spec.shape],
                                    np.float32)  # fmt: skip

    def step() -> None:
        out = session.run(None, {names[0]: x, **state})
        state.update(zip(names[1:], out[1:], strict=False))

    return step


def _torch_step(model: Model) -> Any | None:
    """PyTorch eager on a module of the same shape (weights do not change the speed)."""
    try:
        import torch
    except ImportError:
        return None
    if model.info is None:
        return None
    from edgeseq.train.networks import build_model

    spec = model.info.model_spec
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = build_model(spec).eval()
    x = torch.from_numpy(_inputs(model, 1)).reshape(1, 1, -1)
    state: list[Any] = [None]

    def step() -> None:
        with torch.no_grad():
            _, state[0] = net(x, state[0])

    return step


# The kernels' floating-point licence, in GCC's words: reassociation, reciprocals, no signed
# zeros and no errno (Numba's fastmath set), and no FP traps, which LLVM never assumes. Without
# -fno-trapping-math GCC will not vectorise the clamps in tanh and the C step runs half as fast.
C_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
           "-fassociative-math", "-freciprocal-math"]  # fmt: skip


class CReference:
    """benchmarks/step.c built once for a model's program: `ns_per_step(steps)` runs it."""

    def __init__(self, model: Model, folder: Path) -> None:
        cc = shutil.which("cc") or shutil.which("gcc")
        plan = model.plan
        if cc is None or plan is None or not C_SOURCE.is_file():
            raise FileNotFoundError("no C compiler, fused plan or benchmarks/step.c")
        if plan.uses(*OWN_KERNEL_ONLY):  # the *_ANY and int8 cells have no C twin
            raise FileNotFoundError("the C reference runs the plain float cells only")
        self.binary, self.program = folder / "step", folder / "program.bin"
        (folder / "program.h").write_text(c_header())  # the row layout, from program.py
        subprocess.run([cc, *C_FLAGS, "-I", str(folder), "-o", str(self.binary), str(C_SOURCE),
                        "-lm"], check=True, capture_output=True)  # fmt: skip
        with open(self.program, "wb") as fh:
            head = [plan.code.shape[0], plan.width, plan.n_features, plan.params.size]
            np.array(head, np.int64).tofile(fh)
            plan.code.astype(np.int64).tofile(fh)
            plan.params.astype(np.float32).tofile(fh)
            np.array([plan.state_size], np.int64).tofile(fh)
            plan.initial_state.astype(np.float32).tofile(fh)

    def ns_per_step(self, steps: int) -> float:
        """Median ns of single steps, after the same warm-up and less the same clock cost as
        the Python latencies (_latencies), so both sides are timed the same way."""
        out = subprocess.run([str(self.binary), str(self.program), str(steps)], check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
        return float(out.split()[0])


def c_step_ns(model: Model, steps: int = 200_000) -> float | None:
    """ns per step of the C reference on this model's program, or None without a compiler."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return CReference(model, Path(tmp)).ns_per_step(steps)
        except FileNotFoundError:
            return None


START_SCRIPT = """
import logging, os, sys, time
t0 = float(sys.argv[2])
class Notice(logging.Handler):
    def emit(self, record):
        if "compiling kernels" in record.getMessage():
            print('notice', time.time() - t0)
logging.getLogger("edgeseq.runtime").addHandler(Notice())
logging.getLogger("edgeseq.runtime").setLevel(logging.INFO)
import numpy as np, edgeseq
m = edgeseq.load(sys.argv[1], backend=sys.argv[3])
m.stream().step(np.ones(m.n_features, np.float32))  # 1: in the domain of a log transform too
first = time.time() - t0
for line in open('/proc/self/status'):
    if line.startswith(('VmRSS', 'VmHWM')):
        print(line.split()[0].rstrip(':'), int(line.split()[1]) / 1024)
print('first', first)
"""


def _start(path: Path, backend: str, env: dict[str, str]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", START_SCRIPT, str(path), repr(time.time()), backend],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeseqError(f"{path}: a fresh process could not load and step it with the "
                           f"{backend} backend ({last})")  # fmt: skip
    values = dict(line.split() for line in done.stdout.strip().splitlines())
    got = {"first": float(values["first"]), "rss": float(values["VmRSS"])}
    if "notice" in values:
        got["notice"] = float(values["notice"])
    return got


def serve_notice_s(path: Path, timeout: float = 60.0) -> float:
    """Seconds from launching `edgeseq serve MODEL` on a cold cache to its compile notice on
    stderr, as a person at the terminal sees it (the process is stopped then: the compile's
    own time is the cold start's figure)."""
    from edgeseq.runtime.kernels.compile_notice import MESSAGE

    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        env.pop("EDGESEQ_KERNEL_DIR", None)
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeseq", "serve", str(path), "--log-format", "text"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env, text=True,
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                if MESSAGE in line:
                    return time.monotonic() - start
                if time.monotonic() - start > timeout:
                    break
        finally:
            proc.kill()
            proc.communicate()
    raise EdgeseqError(f"`edgeseq serve {path}` on a cold cache never said it was compiling")


NEW_SHAPE_HIDDEN = 24  # units of the new-shape LSTM: no model in export/ has a layer of 24


def start_up(path: Path, others: list[str]) -> dict[str, Any]:
    """Process start to first prediction, cold then warm Numba cache, and resident memory;
    then, on that warm cache, a model of a shape it has never seen (an LSTM of the same
    features and NEW_SHAPE_HIDDEN units: its own kernel compiles, the generic ones load); the
    same (warm) for the other backends, under "other_backends". A cold cache is an empty
    NUMBA_CACHE_DIR, which also holds the generated kernels unless EDGESEQ_KERNEL_DIR says
    otherwise (so that is dropped)."""
    from edgeseq.runtime.warmup import lstm_file

    figures: dict[str, Any] = {"other_backends": {}}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        env.pop("EDGESEQ_KERNEL_DIR", None)
        for label in ("cold", "warm"):
            got = _start(path, "numba", env)
            figures[f"first_prediction_{label}_s"] = got["first"]
            figures["rss_mib"] = got["rss"]
            if label == "cold" and "notice" in got:
                figures["compile_notice_load_s"] = got["notice"]
        other = Path(cache) / "new-shape.onnx"
        lstm_file(other, load(path).n_features, NEW_SHAPE_HIDDEN)
        figures["first_prediction_new_shape_s"] = _start(other, "numba", env)["first"]
        for backend in others:
            got = _start(path, backend, env)
            figures["other_backends"][backend] = {"first_prediction_s": got["first"],
                                                  "rss_mib": got["rss"]}  # fmt: skip
    figures["compile_notice_serve_s"] = serve_notice_s(path)
    return figures


def _best_of_alternating(fns: list[Any], samples_per_call: int, rounds: int = 5,
                         seconds: float = 0.2) -> list[float]:  # fmt: skip
    """Throughput of each fn, measured in alternating windows (so that a burst of load from
    other processes hits both sides alike), best window each: noise only ever slows a run."""
    best = [0.0] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            _quiesce()
            best[i] = max(best[i], _throughput(fn, samples_per_call, seconds))
    return best


def _throughput(fn: Any, samples_per_call: int, seconds: float = 0.5) -> float:
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls * samples_per_call / (time.perf_counter() - start)


def _feed_others(path: Path, model: Model, block: np.ndarray) -> dict[str, float]:
    """us per sample of a whole block on the other backends (numpy on a tenth of it)."""
    session = _ort_session(path)
    names = [i.name for i in session.get_inputs()]
    feeds = {names[0]: block[:, None] if model.time_first else block[None]}
    for spec in session.get_inputs()[1:]:
        feeds[spec.name] = np.zeros(
            [d if isinstance(d, int) else 1 for d in spec.shape], np.float32
        )
    ort_us = 1e6 / _throughput(lambda: session.run(None, feeds), len(block))
    numpy_stream, short = load(path, backend="numpy").stream(), block[: len(block) // 10]
    numpy_us = 1e6 / _throughput(lambda: numpy_stream.feed(short), len(short), seconds=0.2)
    return {"onnxruntime (one run() on the whole block)": ort_us, "numpy": numpy_us}


def streaming_backends(path: Path) -> dict[str, Model]:
    """The other backends that can stream this model (onnxruntime needs edgeseq's state
    metadata, and a graph it can run): a user's own file is benchmarked on what it runs on."""
    found = {}
    for backend in OTHER_BACKENDS:
        try:
            model = load(path, backend=backend)
            model.stream()
        except EdgeseqError:
            continue
        found[backend] = model
    return found


def _step_contenders(path: Path, model: Model, calls: int) -> dict[str, tuple[Any, int]]:
    """name -> (one-sample callable, calls per round) for every way to advance one stream."""
    x = _inputs(model, 1)[0]
    fns: dict[str, tuple[Any, int]] = {"numba": (lambda s=model.stream(): s.step(x), calls)}
    per_round = {"onnxruntime": calls // 5, "numpy": calls // 50}
    for backend, other in streaming_backends(path).items():
        fns[backend] = (lambda s=other.stream(): s.step(x), per_round[backend])
    fns["onnxruntime run()"] = (_ort_step(path, model, 1), calls // 5)
    torch_step = _torch_step(model)
    if torch_step is not None:
        fns["pytorch eager"] = (torch_step, calls // 10)
    return fns


@contextlib.contextmanager
def _one_core() -> Iterator[None]:
    """Run this process, and the C reference it starts, on one CPU for a while.

    Single-stream figures are one-core figures (as the C reference's are). Left free,
    the C subprocess could run on the other core than the Python contenders, and on a shared
    machine one core can be busier than the other for seconds: the two sides of a ratio would
    see different machines. Linux only; elsewhere this does nothing."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _interleaved(path: Path, model: Model, calls: int, rounds: int) -> dict[str, Any]:
    """Step latencies, feed throughput and the C step, measured in alternating rounds.

    A shared machine's noise comes in bursts; alternating short rounds lets a burst hit every
    contender alike, and the best round of each is its figure (noise only ever slows a run).
    """
    with _one_core():
        return _alternate_rounds(path, model, calls, rounds)


def _alternate_rounds(path: Path, model: Model, calls: int, rounds: int) -> dict[str, Any]:
    fns = _step_contenders(path, model, calls)
    stream, block = model.stream(), _inputs(model, FEED_STEPS)
    best: dict[str, dict[str, float]] = {}
    feed_us, c_us = float("inf"), None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            c_ref: CReference | None = CReference(model, Path(tmp))
        except FileNotFoundError:
            c_ref = None
        for _ in range(rounds):
            for name, (fn, n) in fns.items():
                _quiesce()
                lat = _latencies(fn, n)
                if name not in best or lat["median_us"] < best[name]["median_us"]:
                    best[name] = lat
            _quiesce()
            rate = _throughput(lambda: stream.feed(block), FEED_STEPS, seconds=0.3)
            feed_us = min(feed_us, 1e6 / rate)
            if c_ref is not None:
                _quiesce()
                us = c_ref.ns_per_step(calls) / 1e3
                c_us = us if c_us is None else min(c_us, us)
    return {"step": best, "feed_us_per_sample": feed_us, "c_step_us": c_us}


def layouts(model: Model) -> dict[str, Any]:
    """label -> the same sample in each layout a caller may hand to `stream.step`.

    A pandas frame's `to_numpy(np.float32)` is Fortran-ordered (pandas keeps columns
    contiguous), so its rows are strided; `frame.iloc[i].to_numpy()` of a float frame is a
    float64 row of the same kind, and read-only. Both are built here with NumPy alone (the
    runtime does not depend on pandas), in the layouts pandas gives."""
    x = _inputs(model, 1)[0]
    frame32 = np.asfortranarray(np.stack([x, x, x]))
    frame64 = np.asfortranarray(frame32.astype(np.float64))
    frame64.flags.writeable = False
    read_only = x.copy()
    read_only.flags.writeable = False
    return {
        "float32, contiguous (the fast path)": x,
        "float32, a row of a frame: `frame.to_numpy(np.float32)[i]` (strided)": frame32[1],
        "float64, a row of a frame: `frame.iloc[i].to_numpy()` (strided, read-only)": frame64[1],
        "float32, a slice with a step: `a[::2]`": np.repeat(x, 2)[::2],
        "float32, read-only": read_only,
        "float64, contiguous": x.astype(np.float64),
        "int64, contiguous": np.round(x).astype(np.int64),
        "list of floats": x.tolist(),
        "tuple of floats": tuple(x.tolist()),
        "list of ints": np.round(x).astype(np.int64).tolist(),
    }


def sample_layouts(model: Model, calls: int = 5_000, rounds: int = 7) -> dict[str, Any]:
    """`stream.step` latency for the same sample in each layout (layouts()), each on its own
    stream, in alternating rounds on one core, best round each; the ratios to the first
    layout, a contiguous float32 vector, are what count."""
    samples = layouts(model)
    steps = {name: (lambda s=model.stream(), x=x: s.step(x)) for name, x in samples.items()}
    best: dict[str, dict[str, float]] = {}
    with _one_core():
        for _ in range(rounds):
            for name, step in steps.items():
                lat = _latencies(step, calls)
                if name not in best or lat["median_us"] < best[name]["median_us"]:
                    best[name] = lat
    return best


def measure(path: str | Path, calls: int = 20_000, rounds: int = 9) -> dict[str, Any]:
    """Every figure for one model (see the module docstring)."""
    path = Path(path)
    model = load(path)
    result: dict[str, Any] = {"model": path.name, "plan": model.plan_note}
    result.update(_interleaved(path, model, calls, rounds))
    result["layouts"] = sample_layouts(model, max(1_000, calls // 4))
    result["feed_other"] = _feed_others(path, model, _inputs(model, FEED_STEPS))
    result["pool"] = {}
    others = streaming_backends(path)
    for size in POOL_SIZES:
        pools = [model.pool(capacity=size), *(m.pool(capacity=size) for m in others.values())]
        ids, xs = [f"s{i}" for i in range(size)], _inputs(model, size)
        steps = [lambda p=p, i=ids, v=xs: p.step(i, v) for p in pools]
        ours, *backends, theirs = _best_of_alternating([*steps, _ort_step(path, model, size)], size)
        result["pool"][size] = {"edgeseq_samples_per_s": ours, "onnxruntime_samples_per_s": theirs,
                                "backends": dict(zip(others, backends, strict=True))}  # fmt: skip
    result.update(start_up(path, list(others)))
    return result
