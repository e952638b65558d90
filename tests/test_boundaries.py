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
            f"import sys; sys.argv = ['edgeseq', *{args!r}]\nfrom edgeseq.cli import run; run()"
        )
        assert proc.returncode == 0, (args, proc.stderr)


def test_the_cli_module_does_not_import_torch_or_pandas():
    code = "import sys, edgeseq.cli; print([m for m in ('torch', 'pandas') if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr
