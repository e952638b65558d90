"""Board profiles and deployment bundles: `edgeseq devices`, `edgeseq bundle`, the fit check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from edgeseq.deploy.devices import check_fit, get_profile, list_profiles, read_profile
from edgeseq.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "export" / "pump-lstm.onnx"
PROFILES = ["raspberry-pi-zero-2w", "raspberry-pi-3b", "raspberry-pi-4", "raspberry-pi-5", "x86-64"]


def _edgeseq(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "edgeseq", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)


def _tool(name: str, package: str) -> str:
    """A Debian tool the checks need, installed by the test set-up when missing (CI is root)."""
    if shutil.which(name) is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", package]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True)
    path = shutil.which(name)
    assert path is not None, f"{name} (Debian package {package}) could not be installed"
    return path


def test_every_required_board_has_a_complete_profile():
    names = [p.name for p in list_profiles()]
    assert set(PROFILES) <= set(names)
    for profile in list_profiles():
        assert profile.arch in ("aarch64", "x86_64") and profile.cores >= 1
        assert profile.memory_mb >= 512 and profile.python == "3.11"
        assert {"threads", "max_batch", "checkpoint_interval", "memory_limit_mb"} <= set(
            profile.daemon
        )


def test_edgeseq_devices_lists_the_boards_and_shows_one():
    listing = _edgeseq("devices")
    assert listing.returncode == 0, listing.stderr
    for name in PROFILES:
        assert name in listing.stdout
    shown = _edgeseq("devices", "show", "raspberry-pi-zero-2w")
    assert shown.returncode == 0
    assert tomllib.loads(shown.stdout)["numba_cpu"] == "cortex-a53"
    missing = _edgeseq("devices", "show", "commodore-64")
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: no device profile 'commodore-64'")


def test_a_broken_profile_is_refused_with_the_key_and_file(tmp_path):
    bad = tmp_path / "board.toml"
    text = (ROOT / "devices" / "raspberry-pi-4.toml").read_text()
    bad.write_text(text.replace("cores = 4", 'cores = "four"'))
    with pytest.raises(UsageError, match=r"'cores' is 'four'; expected a int"):
        read_profile(bad)
    bad.write_text(text.replace("[daemon]", "[daemon]\nturbo = true"))
    with pytest.raises(UsageError, match="unknown \\[daemon\\] keys \\['turbo'\\]"):
        read_profile(bad)


@pytest.mark.parametrize("device", PROFILES)
def test_a_bundle_for_each_board_is_complete_and_its_unit_and_script_check(device, tmp_path):
    out = tmp_path / f"edgeseq-{device}"
    proc = _edgeseq("bundle", str(MODEL), "--device", device, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in out.iterdir()}
    expected = {
        "model.onnx",
        "serve.toml",
        "edgeseq.service",
        "install.sh",
        "README.md",
        "sensor_loop.py",
        "constraints.txt",
        "bundle.env",
        "SHA256SUMS",
        "wheels",
    }
    assert expected <= names
    assert list((out / "wheels").glob("edgeseq-*-py3-none-any.whl"))
    assert (out / "model.onnx").read_bytes() == MODEL.read_bytes()
    pins = (out / "constraints.txt").read_text()
    assert "numba==" in pins and "torch" not in pins and "onnxruntime" not in pins
    profile = get_profile(device)
    unit = (out / "edgeseq.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "DynamicUser=yes" in unit
    assert f"MemoryMax={profile.daemon['memory_limit_mb']}M" in unit
    assert f"NUMBA_NUM_THREADS={profile.daemon['threads']}" in unit
    serve = tomllib.loads((out / "serve.toml").read_text())
    assert serve["max_batch"] == profile.daemon["max_batch"]
    readme = (out / "README.md").read_text()
    assert "import edgeseq" in readme and "stream.step" in readme and device in readme
    with tarfile.open(out.with_name(out.name + ".tar.gz")) as tar:
        assert f"{out.name}/install.sh" in tar.getnames()
    shellcheck = _tool("shellcheck", "shellcheck")
    check = subprocess.run(
        [shellcheck, "-x", "install.sh"], cwd=out, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(["systemd-analyze", "verify", str(out / "edgeseq.service")],
                                capture_output=True, text=True)  # fmt: skip
        problems = [ln for ln in verify.stderr.splitlines() if "is not executable" not in ln]
        assert problems == [], verify.stderr  # the venv is created on the board


def test_the_bundled_example_runs_against_the_bundled_model(tmp_path):
    out = tmp_path / "bundle"
    assert _edgeseq("bundle", str(MODEL), "--device", "x86-64", "-o", str(out)).returncode == 0
    run = subprocess.run([sys.executable, str(out / "sensor_loop.py"), str(out / "model.onnx")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "prediction=" in run.stdout and "state restored" in run.stdout


def _big_lstm(path: Path, hidden: int) -> Path:
    """A plain ONNX LSTM (x -> Y) of `hidden` units, as another tool would write it."""
    inputs = 8
    w = helper.make_tensor("W", TensorProto.FLOAT, [1, 4 * hidden, inputs],
                           [0.001] * (4 * hidden * inputs))  # fmt: skip
    r = helper.make_tensor("R", TensorProto.FLOAT, [1, 4 * hidden, hidden],
                           [0.0] * (4 * hidden * hidden))  # fmt: skip
    node = helper.make_node("LSTM", ["x", "W", "R"], ["Y"], hidden_size=hidden)
    graph = helper.make_graph(
        [node], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 1, inputs])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["T", 1, 1, hidden])], [w, r],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def test_a_model_too_large_for_a_board_gets_warnings_naming_the_figures(tmp_path):
    big = _big_lstm(tmp_path / "big.onnx", hidden=1024)
    fit = check_fit(big, get_profile("raspberry-pi-zero-2w"), sample_rate=1000.0)
    assert fit.macs_per_sample == 4 * 1024 * (1024 + 8)
    text = " ".join(fit.warnings)
    assert "slower than the model's sample rate of 1000 Hz" in text, fit.warnings
    assert f"{fit.macs_per_sample:,} multiply-adds" in text
    assert not check_fit(MODEL, get_profile("raspberry-pi-4")).warnings  # the small one fits
    huge = check_fit(big, get_profile("raspberry-pi-zero-2w"), max_streams=200_000)
    assert not check_fit(big, get_profile("raspberry-pi-zero-2w")).warnings[1:]  # no rate known
    assert any("exceeds the 256 MB limit of raspberry-pi-zero-2w" in w for w in huge.warnings)


def test_bundle_prints_the_warnings_and_refuses_what_cannot_stream(tmp_path):
    big = _big_lstm(tmp_path / "big.onnx", hidden=512)
    out = str(tmp_path / "b")
    proc = _edgeseq("bundle", str(big), "--device", "raspberry-pi-zero-2w", "-o", out,
                    "--sample-rate", "5000")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "5000 Hz" in proc.stderr
    refused = _edgeseq("bundle", str(tmp_path / "missing.onnx"), "--device", "x86-64", "-o",
                       str(tmp_path / "c"))  # fmt: skip
    assert refused.returncode == 2 and "no such model file" in refused.stderr
    assert not (tmp_path / "c").exists()
