"""`edgeseq bundle MODEL --device NAME -o DIR`: one folder (and .tar.gz) to copy to a board.

The folder holds the model, a daemon config tuned for the board, the edgeseq wheel built from
this checkout, pinned runtime requirements (no PyTorch), a systemd unit, `install.sh`, a README
for the person at the board and a runnable embedded-use example. The model is validated (it must
load and stream) and checked against the board before anything is written; the folder appears
whole or not at all (written beside it, then renamed).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import string
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from edgeseq.deploy.devices import Fit, Profile, check_fit
from edgeseq.errors import EdgeseqError, UsageError

ROOT = Path(__file__).resolve().parents[2]  # the checkout
TEMPLATES = ROOT / "devices"  # unit, install.sh, board README, example: one copy, here
RUNTIME_ROOTS = (
    "numpy",
    "numba",
    "onnx",
    "typer",
    "rich",
    "paho-mqtt",
    "nats-py",
    "prometheus_client",
    "orjson",
)
SERVICE_PORT_EXAMPLE = "7878"


@dataclass
class Bundle:
    folder: Path
    archive: Path
    fit: Fit
    files: list[str]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_pins(constraints: Path) -> list[str]:
    """The pinned lines of `constraints` for the runtime and daemon dependencies and everything
    they require, as installed here (so the board gets the versions tested here)."""
    pins = {}
    for line in constraints.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            pins[_canonical(line.split("==")[0])] = line.strip()
    wanted, todo = set(), [_canonical(n) for n in RUNTIME_ROOTS]
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" in req:
                continue
            todo.append(_canonical(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]))
    return sorted(pins[n] for n in wanted if n in pins)


def build_wheel(into: Path) -> Path:
    """The edgeseq wheel from this checkout (built in a scratch copy: the tree stays clean)."""
    with tempfile.TemporaryDirectory() as scratch:
        src = Path(scratch) / "src"
        shutil.copytree(ROOT / "edgeseq", src / "edgeseq",
                        ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))  # fmt: skip
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, src / name)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
             "--wheel-dir", str(into), str(src)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    wheels = sorted(into.glob("edgeseq-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise EdgeseqError(f"building the edgeseq wheel failed: {proc.stderr.strip()[-800:]}")
    return wheels[-1]


def _serve_toml(profile: Profile) -> str:
    d = profile.daemon
    lines = [
        f"# edgeseq serve settings for {profile.name}, written by `edgeseq bundle`.",
        'model = "/etc/edgeseq/model.onnx"',
        f'listen = "tcp://127.0.0.1:{SERVICE_PORT_EXAMPLE}"',
        '# mqtt = "mqtt://127.0.0.1:1883"',
        f"max_streams = {int(d.get('max_streams', 1000))}",
        f"max_batch = {int(d.get('max_batch', 256))}",
        f'max_wait = "{d.get("max_wait", "1ms")}"',
        f'idle_timeout = "{d.get("idle_timeout", "10m")}"',
        'state_dir = "/var/lib/edgeseq"',
        f'checkpoint_interval = "{d.get("checkpoint_interval", "60s")}"  # SD-card wear',
        "# A new model.onnx from an upgrade starts streams afresh (the old states are moved aside)",
        "# instead of refusing to start.",
        "reset_on_model_change = true",
        'metrics = "127.0.0.1:9108"',
        'log_level = "info"',
    ]
    return "\n".join(lines) + "\n"


def _unit(profile: Profile) -> str:
    text = (TEMPLATES / "edgeseq.service").read_text()
    threads = int(profile.daemon.get("threads", 1))
    limit = int(profile.daemon.get("memory_limit_mb", profile.memory_mb // 2))
    threads_line = f"Environment=NUMBA_NUM_THREADS={threads}"
    text = re.sub(r"^Environment=NUMBA_NUM_THREADS=\d+$", threads_line, text, flags=re.M)
    return re.sub(r"^MemoryMax=\S+$", f"MemoryMax={limit}M", text, flags=re.M)


def _readme(profile: Profile, model: Path, fit: Fit, wheel: str, name: str, n_features: int,
            fingerprint: str) -> str:  # fmt: skip
    template = string.Template((TEMPLATES / "README.board.md").read_text())
    d = profile.daemon
    return template.substitute(
        device=profile.name, description=profile.description, wheel=wheel,
        model_name=model.name, fingerprint=fingerprint[:16], macs=f"{fit.macs_per_sample:,}",
        state_floats=fit.state_floats, us_per_sample=f"{fit.us_per_sample:,.0f}",
        samples_per_second=f"{fit.samples_per_second:,.0f}", memory_mb=f"{fit.memory_mb:.0f}",
        max_streams=f"{int(d.get('max_streams', 1000)):,}", bundle_name=name,
        example_x=", ".join(["0.0"] * n_features), checkpoint_interval=d.get("checkpoint_interval"),
        memory_limit_mb=d.get("memory_limit_mb"), n_features=n_features,
    )  # fmt: skip


def build_bundle(
    model: Path, profile: Profile, out: Path, sample_rate: float | None = None
) -> Bundle:
    """Validate, check the fit, then write `out/` and `out.tar.gz`."""
    from edgeseq.runtime import load

    if not model.is_file():
        raise UsageError(f"{model}: no such model file")
    loaded = load(model)
    loaded.stream()  # a model that cannot stream cannot be served: refuse it now
    fit = check_fit(model, profile, sample_rate=sample_rate)
    out = out.resolve()
    if out.exists() and not (out / "bundle.env").is_file() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not an edgeseq bundle; choose an empty folder")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent}: no such folder for the bundle")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a bundle is for copying around
    try:
        wheel = build_wheel(staging / "wheels")
        files = _write_files(staging, model, profile, fit, wheel.name, loaded.n_features,
                             loaded.fingerprint, out.name)  # fmt: skip
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    archive = out.with_name(out.name + ".tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    return Bundle(out, archive, fit, files)


def _write_files(into: Path, model: Path, profile: Profile, fit: Fit, wheel: str,
                 n_features: int, fingerprint: str, name: str) -> list[str]:  # fmt: skip
    devices = TEMPLATES
    shutil.copy2(model, into / "model.onnx")
    (into / "serve.toml").write_text(_serve_toml(profile))
    (into / "edgeseq.service").write_text(_unit(profile))
    shutil.copy2(devices / "install.sh", into / "install.sh")
    (into / "install.sh").chmod(0o755)
    shutil.copy2(devices / "sensor_loop.py", into / "sensor_loop.py")
    assert profile.path is not None
    shutil.copy2(profile.path, into / "profile.toml")
    (into / "constraints.txt").write_text("\n".join(runtime_pins(ROOT / "constraints.txt")) + "\n")
    (into / "README.md").write_text(
        _readme(profile, model, fit, wheel, name, n_features, fingerprint)
    )
    (into / "bundle.env").write_text(
        f"EDGESEQ_VERSION={wheel.split('-')[1]}\nEDGESEQ_WHEEL={wheel}\n"
        f"EDGESEQ_DEVICE={profile.name}\nEDGESEQ_THREADS={int(profile.daemon.get('threads', 1))}\n"
    )
    files = sorted(str(p.relative_to(into)) for p in into.rglob("*") if p.is_file())
    digests = [f"{hashlib.sha256((into / f).read_bytes()).hexdigest()}  {f}" for f in files]
    (into / "SHA256SUMS").write_text("\n".join(digests) + "\n")
    return [*files, "SHA256SUMS"]
