"""The device side never needs torch: proven in fresh interpreters where torch cannot import."""

from __future__ import annotations

import subprocess
import sys

BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, timeout=120
    )


def test_importing_edgeseq_works_without_torch():
    proc = _python("import edgeseq; print(edgeseq.__version__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_the_cli_help_and_version_work_without_torch():
    for args in (["--help"], ["--version"], ["train", "--help"]):
        proc = _python(
            f"import sys; sys.argv = ['edgeseq', *{args!r}]\nfrom edgeseq.cli.app import run; run()"
        )
        assert proc.returncode == 0, (args, proc.stderr)


def test_the_cli_module_does_not_import_torch_or_pandas():
    code = (
        "import sys, edgeseq.cli.app\nprint([m for m in ('torch', 'pandas') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_the_daemon_serves_from_stdin_without_torch():
    """`edgeseq serve` end to end (import, load, plan, batched step, answer) with torch blocked,
    and neither torch nor pandas nor onnxruntime loaded along the way."""
    code = (
        "import sys; sys.argv = ['edgeseq', 'serve', 'export/pump-lstm.onnx']\n"
        "import atexit\n"
        "atexit.register(lambda: print(sorted(m for m in ('torch', 'pandas', 'onnxruntime') "
        "if sys.modules.get(m)), file=sys.stderr))\n"
        "from edgeseq.cli.app import run; run()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + code],
        capture_output=True, text=True, timeout=120,
        input='{"id": "a", "seq": 0, "x": [0.1, 0.2, 0.3]}\n',
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert '"y":' in proc.stdout, proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr


def test_the_daemon_modules_and_serve_help_import_without_torch():
    code = (
        "import edgeseq.daemon.service, edgeseq.daemon.transports.tcp, "
        "edgeseq.daemon.transports.stdin, edgeseq.daemon.transports.mqtt, "
        "edgeseq.daemon.transports.nats\n"
        "sys.argv = ['edgeseq', 'serve', '--help']\nfrom edgeseq.cli.app import run; run()"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert "--listen" in proc.stdout and "--nats" in proc.stdout
