"""The README runs as written: every ```sh and ```python block, in order, then its figures.

The blocks run in a folder laid out as a clone's (the project's files linked in, `../shared`
beside it), so what they write (`runs/`, bundles) never touches the checkout, and each relative
path means what it means to a reader in the project's folder. Shell commands run one at a time
under `bash -euo pipefail` with the venv's `bin` first on PATH (as `. .venv/bin/activate` puts
it); Python blocks run each in a fresh interpreter. A command marked `runs until stopped` is a
service: it is started as written, must say "ready", is then talked to as its clients would
(TCP lines, MQTT messages through a Mosquitto on the port the command names, its metrics
endpoint), and must stop cleanly on SIGTERM. Its answers must equal `Stream.feed` offline.

After the blocks, every figure the README quotes is checked against what they produced, with
the tolerance the README states: deterministic figures (baselines, byte counts) to the digits
quoted; seed-dependent ones (a trained model's error) by the default seed's run lying inside
the range quoted over seeds. `make bench` retrains every seed of those ranges (the slow test at
the end) and checks the quoted medians and ends.

`make test` itself is the one command not run here: CI (`.ci/run`) runs it, as the README says.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeseq.bench.loadgen.broker import ensure_mosquitto, start_broker, stop_broker
from edgeseq.errors import EdgeseqError
from tests.daemon_harness import DaemonProcess, LineClient, offline_predictions
from tests.readme_blocks import Block, Command, blocks, commands

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # the real data sets the README's examples read
README = ROOT / "README.md"
BLOCKS = blocks(README)
LINKED = (".venv", ".ci", "Makefile", "pyproject.toml", "constraints.txt", "README.md",
          "edgeseq", "export", "devices")  # fmt: skip
COMMAND_TIMEOUT = 900.0
PROBE_SAMPLES = 20
SEED_MARGIN = 0.05  # README: "the default seed's figure lies within 5% of the range's ends"


class BlockFailed(Exception):
    """A README block did not run as written; the message says which command and why."""


def shell_service(command: str, cwd: Path, env: dict[str, str]) -> DaemonProcess:
    """A README service command, run as written by bash (exec: signals reach the daemon)."""
    return DaemonProcess(argv=["bash", "-c", f"exec {command}"], cwd=cwd, env=env)


@dataclass
class ReadmeRun:
    """Runs the README's blocks in `project`; `failures` maps a block's name to what failed."""

    project: Path
    env: dict[str, str]
    has_shared: bool = True
    failures: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # blocks of the real data sets
    outputs: list[str] = field(default_factory=list)

    def run(self) -> None:
        first_failure: str | None = None
        needs_shared = ["../shared/"]  # and the run folders that blocks reading it write
        for block in BLOCKS:
            if not self.has_shared and any(mark in block.text for mark in needs_shared):
                needs_shared += re.findall(r"--out (\S+)", block.text)
                self.skipped[block.name] = f"needs ../shared/data, missing at {SHARED}"
                continue
            if first_failure is not None:
                self.failures[block.name] = f"not run: {first_failure} failed before it"
                continue
            try:
                self._block(block)
            except BlockFailed as exc:
                self.failures[block.name] = str(exc)
                first_failure = block.name

    def _block(self, block: Block) -> None:
        if block.language == "python":
            self._process([sys.executable, "-c", block.text], f"{block.name} (python)")
            return
        for command in commands(block):
            where = f"README.md:{command.line}: `{command.first_line}`"
            if command.text.split("#")[0].strip() == "make test":
                _ci_runs_make_test()
            elif command.is_service:
                self._service(command, where)
            else:
                self._process(["bash", "-euo", "pipefail", "-c", command.text], where)

    def _process(self, argv: list[str], where: str) -> None:
        try:
            proc = subprocess.run(
                argv, cwd=self.project, env=self.env, capture_output=True, text=True,
                timeout=COMMAND_TIMEOUT,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise BlockFailed(f"{where} did not finish in {COMMAND_TIMEOUT:.0f} s") from exc
        self.outputs.append(proc.stdout + proc.stderr)
        if proc.returncode != 0 or "Traceback" in proc.stderr:
            raise BlockFailed(
                f"{where} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            )

    def _service(self, command: Command, where: str) -> None:
        mqtt = re.search(r"mqtt://([\d.]+):(\d+)", command.text)
        with ExitStack() as stack:
            if mqtt:
                stack.enter_context(_broker_on(int(mqtt.group(2)), self.project))
            service = stack.enter_context(shell_service(command.text, self.project, self.env))
            try:
                service.wait_for("ready", timeout=300)
                probed = self._probe(service, mqtt)
                if not probed:
                    raise BlockFailed(f"{where}: a service with no TCP or MQTT input to test")
                code = service.stop(timeout=60)
            except AssertionError as exc:
                raise BlockFailed(f"{where}: {exc}") from exc
            stderr = "\n".join(service.raw_stderr)
            if code != 0 or "Traceback" in stderr:
                raise BlockFailed(f"{where} exited {code} on SIGTERM:\n{stderr[-4000:]}")

    def _probe(self, service: DaemonProcess, mqtt: re.Match[str] | None) -> list[str]:
        """Talk to the service as its clients would; the transports it was talked to."""
        model = self.project / service.wait_for("model loaded")["path"]
        xs = _pump_samples(self.project)[:PROBE_SAMPLES]
        expected = offline_predictions(model, xs)
        names = list(_feature_names(model))
        logs = list(service.logs)
        probed = []
        for entry in logs:
            if entry.get("event") == "listening" and entry.get("transport", "tcp") == "tcp":
                answers = _ask_tcp(int(entry["port"]), names, xs)
                _assert_answers(answers, expected, "TCP")
                probed.append("tcp")
        if mqtt:
            answers = _ask_mqtt(mqtt.group(1), int(mqtt.group(2)), names, xs)
            _assert_answers(answers, expected, "MQTT")
            probed.append("mqtt")
        for entry in logs:  # after the traffic, which the metrics must count
            if entry.get("event") == "metrics":
                _assert_metrics(int(entry["port"]), PROBE_SAMPLES * len(probed))
        return probed


def _ci_runs_make_test() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    if "make test" not in [line.strip() for line in ci]:
        raise BlockFailed("the README's `make test` is not what .ci/run runs")


@contextmanager
def _broker_on(port: int, folder: Path) -> Iterator[None]:
    """Mosquitto on the port the README's command names, for as long as the command runs."""
    try:
        binary = ensure_mosquitto(clients=False)
        proc, _ = start_broker(binary, folder, port=port)
    except EdgeseqError as exc:
        raise BlockFailed(
            f"the README's MQTT example needs a broker on port {port}: {exc}"
        ) from exc
    try:
        yield
    finally:
        stop_broker(proc)


def _pump_samples(project: Path) -> np.ndarray:
    """The demo's recording in export/pump-lstm.onnx's feature order (pressure, flow, temp)."""
    frame = np.genfromtxt(project / "runs/demo/pump.csv", delimiter=",", names=True)
    return np.stack([frame["pressure"], frame["flow"], frame["temperature"]], 1).astype(np.float32)


def _feature_names(model: Path) -> tuple[str, ...]:
    import edgeseq

    return edgeseq.load(model).feature_names


def _messages(names: list[str], xs: np.ndarray, sid: str) -> Iterator[dict[str, Any]]:
    for seq, x in enumerate(xs):
        yield {"id": sid, "seq": seq, "x": dict(zip(names, map(float, x), strict=True))}


def _ask_tcp(port: int, names: list[str], xs: np.ndarray) -> list[dict[str, Any]]:
    client = LineClient(port)
    try:
        for message in _messages(names, xs, f"readme-tcp-{port}"):
            client.send(message)
        client.flush()
        return [client.receive() for _ in xs]
    finally:
        client.close()


def _ask_mqtt(host: str, port: int, names: list[str], xs: np.ndarray) -> list[dict[str, Any]]:
    import paho.mqtt.client as mqtt

    sid = "readme-mqtt"
    received: list[dict[str, Any]] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="readme-probe")
    subscribed = threading.Event()
    client.on_message = lambda _c, _u, message: received.append(json.loads(message.payload))
    client.on_subscribe = lambda *_args: subscribed.set()
    client.connect(host, port)
    client.loop_start()
    try:
        result, _mid = client.subscribe(f"edgeseq/{sid}/out", qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        assert subscribed.wait(10), "no SUBACK for the answers' topic"
        for message in _messages(names, xs, sid):
            client.publish(f"edgeseq/{sid}/in", json.dumps(message), qos=1).wait_for_publish(10)
        deadline = time.monotonic() + 30
        while len(received) < len(xs) and time.monotonic() < deadline:
            time.sleep(0.05)
        return received
    finally:
        client.loop_stop()
        client.disconnect()


def _assert_answers(answers: list[dict[str, Any]], expected: np.ndarray, how: str) -> None:
    assert len(answers) == len(expected), f"{how}: {len(answers)} answers to {len(expected)}"
    for answer, want in zip(answers, expected, strict=True):
        assert "y" in answer, f"{how}: {answer}"
        gap = float(np.max(np.abs(np.asarray(answer["y"], np.float32) - want)))
        assert gap <= 1e-6, f"{how}: seq {answer.get('seq')} differs from Stream.feed by {gap}"


def _assert_metrics(port: int, samples: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
        assert response.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    answered = re.findall(r"^edgeseq_samples_total\{[^}]*\} (\S+)", text, re.M)
    assert sum(map(float, answered)) >= samples, text[:3000]


def _workspace(top: Path) -> Path:
    """A folder laid out as a clone's: the project's files linked in, `../shared` beside it."""
    if (SHARED / "data").is_dir():  # else the blocks that read it are skipped, as conftest does
        (top / "shared").symlink_to(SHARED)
    project = top / ROOT.name
    project.mkdir()
    for name in LINKED:
        (project / name).symlink_to(ROOT / name)
    return project


@pytest.fixture(scope="module")
def readme(tmp_path_factory: pytest.TempPathFactory) -> ReadmeRun:
    project = _workspace(tmp_path_factory.mktemp("readme"))
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    run = ReadmeRun(project, env, has_shared=(SHARED / "data").is_dir())
    run.run()
    return run


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_the_readme_block_runs_as_written(readme: ReadmeRun, block: Block) -> None:
    if block.name in readme.skipped:
        pytest.skip(readme.skipped[block.name])
    failure = readme.failures.get(block.name)
    assert failure is None, failure


def test_the_readme_has_blocks_of_both_kinds() -> None:
    languages = {b.language for b in BLOCKS}
    assert languages == {"sh", "python"}
    assert sum(c.is_service for b in BLOCKS if b.language == "sh" for c in commands(b)) >= 2


# --- The README's figures --------------------------------------------------------------------

SEEDS = range(8)  # README: "the median and the range over seeds 0-7"
# Acceptance figures of earlier issues, on the default seed (formerly tests/test_real_data.py).
MAX_RMSE_VS_PERSISTENCE = 0.75  # issue 2: the sunspot forecaster against persistence
MIN_BASICMOTIONS_ACCURACY = 0.90


def _prose() -> str:
    """The README as one line of words: a figure may wrap, inside a comment block too."""
    return re.sub(r"\s*\n\s*(#\s*)?", " ", README.read_text(encoding="utf-8"))


def _quoted(pattern: str) -> dict[str, str]:
    found = re.search(pattern, _prose())
    assert found, f"the README no longer quotes figures in the form {pattern!r}"
    return found.groupdict()


def _equal_as_quoted(measured: float, quoted: str, what: str) -> None:
    """Deterministic figures: equal to the digits the README quotes."""
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    value = float(quoted.replace(",", ""))
    assert round(measured, decimals) == value, f"{what}: measured {measured}, README {quoted}"


def _in_quoted_range(measured: float, low: str, high: str, what: str) -> None:
    """A seed-dependent figure: inside the range over seeds, within SEED_MARGIN of its ends."""
    lo, hi = float(low), float(high)
    assert lo * (1 - SEED_MARGIN) <= measured <= hi * (1 + SEED_MARGIN), (
        f"{what}: the default seed gave {measured}, outside the README's range {low}-{high}"
    )


def _needs_shared(readme: ReadmeRun) -> None:
    if not readme.has_shared:
        pytest.skip(f"the real data sets are not at {SHARED / 'data'}")


def _metrics(readme: ReadmeRun, run: str) -> dict[str, Any]:
    _needs_shared(readme)
    return json.loads((readme.project / "runs" / run / "metrics.json").read_text())


def _quantization(readme: ReadmeRun, model: str) -> dict[str, Any]:
    import onnx

    _needs_shared(readme)
    proto = onnx.load(readme.project / "runs" / model)
    props = {prop.key: prop.value for prop in proto.metadata_props}
    return dict(json.loads(props["edgeseq"])["quantization"])


SUNSPOTS = (
    r"Sunspots, held-out years 1980-2008: LSTM RMSE (?P<median>[\d.]+) \((?P<low>[\d.]+)-"
    r"(?P<high>[\d.]+) over seeds\) vs persistence (?P<persistence>[\d.]+), Holt-Winters "
    r"(?P<holt_winters>[\d.]+) \(auto chose the (?P<transform>[\w-]+) transform\)"
)
CO2 = (
    r"Mauna Loa CO2, .*?: test RMSE (?P<median>[\d.]+) ppm \((?P<low>[\d.]+)-(?P<high>[\d.]+) "
    r"over seeds\) vs persistence (?P<persistence>[\d.]+), seasonal persistence "
    r"(?P<seasonal_persistence>[\d.]+), Holt-Winters (?P<holt_winters>[\d.]+) \(auto chose "
    r"(?P<transform>[\w-]+)\)"
)
BASICMOTIONS = (
    r"BasicMotions .*?: accuracy (?P<median>[\d.]+) \((?P<low>[\d.]+)-(?P<high>[\d.]+) over "
    r"seeds\) on the (?P<n>\d+) test recordings against (?P<majority>[\d.]+) for the majority"
)
INT8 = (
    r"the sunspot LSTM's weights shrink from (?P<float_bytes>[\d,]+) to (?P<int8_bytes>[\d,]+) "
    r"bytes and its held-out RMSE grows by less than (?P<growth>[\d.]+) \(normalized\); "
    r"BasicMotions loses at most one of its 40 test recordings \(accuracy -(?P<loss>[\d.]+) "
    r"at most\)"
)
RESIDENT = (
    r"pump-lstm-int8 keeps (?P<int8>[\d,]+) bytes of parameters against pump-lstm's "
    r"(?P<float>[\d,]+),"
)


def test_the_sunspot_figures_are_what_the_readme_quotes(readme: ReadmeRun) -> None:
    quoted = _quoted(SUNSPOTS)
    metrics = _metrics(readme, "sunspots")
    assert metrics["splits"]["test"]["scored_steps"] == 29  # 1980..2008
    _in_quoted_range(metrics["test"]["rmse"], quoted["low"], quoted["high"], "sunspots RMSE")
    baselines = metrics["baselines"]
    _equal_as_quoted(baselines["persistence"]["rmse"], quoted["persistence"], "persistence")
    _equal_as_quoted(baselines["holt_winters"]["rmse"], quoted["holt_winters"], "Holt-Winters")
    assert metrics["target_transform"] == quoted["transform"]
    assert metrics["test"]["rmse"] <= MAX_RMSE_VS_PERSISTENCE * baselines["persistence"]["rmse"]


def test_the_co2_figures_are_what_the_readme_quotes(readme: ReadmeRun) -> None:
    quoted = _quoted(CO2)
    metrics = _metrics(readme, "co2")
    _in_quoted_range(metrics["test"]["rmse"], quoted["low"], quoted["high"], "CO2 RMSE")
    baselines = metrics["baselines"]
    for name in ("persistence", "seasonal_persistence", "holt_winters"):
        _equal_as_quoted(baselines[name]["rmse"], quoted[name], name)
        assert baselines[name]["n"] == metrics["test"]["n"]
        assert metrics["test"]["rmse"] < baselines[name]["rmse"], name
    assert metrics["target_transform"] == quoted["transform"] != "none"


def test_the_basicmotions_figures_are_what_the_readme_quotes(readme: ReadmeRun) -> None:
    quoted = _quoted(BASICMOTIONS)
    metrics = _metrics(readme, "basicmotions")
    assert metrics["splits"]["test"]["sequences"] == int(quoted["n"])
    _in_quoted_range(metrics["test"]["accuracy"], quoted["low"], quoted["high"], "accuracy")
    _equal_as_quoted(
        metrics["baselines"]["majority_class"]["accuracy"], quoted["majority"], "majority"
    )
    assert metrics["test"]["accuracy"] >= MIN_BASICMOTIONS_ACCURACY


def test_the_int8_figures_are_what_the_readme_quotes(readme: ReadmeRun) -> None:
    quoted = _quoted(INT8)
    sunspots = _quantization(readme, "sunspots-int8.onnx")
    _equal_as_quoted(sunspots["float_weight_bytes"], quoted["float_bytes"], "float weight bytes")
    _equal_as_quoted(sunspots["int8_weight_bytes"], quoted["int8_bytes"], "int8 weight bytes")
    assert sunspots["error_growth"] < float(quoted["growth"]), sunspots
    assert "streamed one sample at a time through edgeseq's runtime" in sunspots["measured_on"]
    motions = _quantization(readme, "basicmotions-int8.onnx")
    assert motions["metric"].startswith("1 - accuracy"), motions
    assert motions["int8_error"] - motions["float_error"] <= float(quoted["loss"]) + 1e-9, motions


def test_the_resident_weight_figures_are_what_the_readme_quotes() -> None:
    import edgeseq
    from edgeseq.bench.models_table import resident_weight_bytes

    quoted = _quoted(RESIDENT)
    for name, key in (("pump-lstm-int8", "int8"), ("pump-lstm", "float")):
        measured = resident_weight_bytes(edgeseq.load(ROOT / "export" / f"{name}.onnx"))
        _equal_as_quoted(measured, quoted[key], name)


def test_the_readme_answers_on_stdin_and_csv_are_the_recording_streamed(readme: ReadmeRun) -> None:
    """The daemon examples' output files: one answer per sample, equal to Stream.feed."""
    xs = _pump_samples(readme.project)
    expected = offline_predictions(ROOT / "export" / "pump-lstm.onnx", xs)
    for name in ("answers.jsonl", "answers-csv.jsonl"):
        lines = (readme.project / "runs" / name).read_text().splitlines()
        answers = [json.loads(line) for line in lines]
        assert [a["seq"] for a in answers] == list(range(len(xs))), name
        _assert_answers(answers, expected, name)


# --- `make bench`: the seed ranges themselves -------------------------------------------------


def _seed_command(block_text: str, data: str, out: str, seed: int) -> str:
    command = next(c.text for c in commands(Block("sh", block_text, 0)) if data in c.text)
    return re.sub(r"--out \S+", f"--out {out} --seed {seed}", command)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("data", "pattern", "measure"),
    [
        ("sunspots_yearly.csv", SUNSPOTS, lambda m: m["test"]["rmse"]),
        ("co2_weekly_raw.csv", CO2, lambda m: m["test"]["rmse"]),
        ("basicmotions_train.csv", BASICMOTIONS, lambda m: m["test"]["accuracy"]),
    ],
    ids=["sunspots", "co2", "basicmotions"],
)
def test_the_readme_seed_ranges_hold_over_seeds_0_to_7(
    tmp_path: Path, data: str, pattern: str, measure: Callable[[dict[str, Any]], float]
) -> None:
    """Each seed's run of the README's own command; the median and both ends as quoted (5%)."""
    if not (SHARED / "data").is_dir():
        pytest.skip(f"the real data sets are not at {SHARED / 'data'}")
    quoted = _quoted(pattern)
    block = next(b for b in BLOCKS if data in b.text)
    project = _workspace(tmp_path)
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    figures = []
    for seed in SEEDS:
        out = f"runs/seed{seed}"
        command = _seed_command(block.text, data, out, seed)
        subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=project, env=env,
                       check=True, capture_output=True, timeout=COMMAND_TIMEOUT)  # fmt: skip
        figures.append(measure(json.loads((project / out / "metrics.json").read_text())))
    print(f"{data}: seeds {list(SEEDS)} -> {[round(f, 4) for f in figures]}")
    for name, measured in (("median", statistics.median(figures)), ("low", min(figures)),
                           ("high", max(figures))):  # fmt: skip
        want = float(quoted[name])
        assert abs(measured - want) <= SEED_MARGIN * want, (name, measured, quoted, figures)
