"""`make test-aarch64`: prove the runtime and the daemon on 64-bit ARM, on this x86 machine.

1. A Debian bookworm arm64 root file system, unpacked by `mmdebstrap --variant=extract` from
   Debian's packages, and the aarch64 wheels of every pinned runtime dependency, downloaded by the
   host's pip. Both are cached under $EDGESEQ_AARCH64_CACHE (default ~/.cache/edgeseq/aarch64),
   keyed by the package list, the pins and this file, so a warm run builds nothing.
2. A bundle (`edgeseq bundle ... --device raspberry-pi-4`) is installed into it by the bundle's
   own install.sh (everything but systemd), from the cached wheels, under QEMU user-mode
   emulation (qemu-user-static via binfmt_misc, QEMU_CPU=cortex-a72 so nothing newer than a Pi 4
   slips in). install.sh runs `edgeseq warmup`; the Numba cache it fills lives in the root file
   system, so it survives to the next run (its entries are stamped with the runtime's sources:
   edgeseq/runtime/kernels/kernel_cache.py).
3. tests/deploy/test_device_suite.py runs in the guest: golden parity of every reference model in
   export/, the runtime invariants, and `edgeseq serve` answering over TCP.

Emulation proves correctness only; its timings say nothing about a board's speed.
Needs root (chroot, mounts), as CI has.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["python3", "python3-venv", "ca-certificates", "libstdc++6", "libgomp1", "dash",
            "bash", "coreutils", "findutils", "sed", "grep", "libc-bin"]  # fmt: skip
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
QEMU_CPU = "cortex-a72"
DEVICE = "raspberry-pi-4"
WHEEL_PLATFORMS = ["manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64",
                   "manylinux2014_aarch64"]  # fmt: skip
TEST_EXTRAS = ["pytest", "pytest-timeout"]
GUEST_PATH = "/opt/edgeseq/venv/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


def say(message: str) -> None:
    print(f"[aarch64 {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, text=True, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise SystemExit(f"[aarch64] failed ({proc.returncode}): {' '.join(cmd)}")
    return proc  # type: ignore[no-any-return]


def ensure_host_tools() -> None:
    """qemu-user-static, mmdebstrap and binfmt_misc with the aarch64 interpreter enabled."""
    missing = [p for p, tool in (("qemu-user-static", "qemu-aarch64-static"),
                                 ("mmdebstrap", "mmdebstrap"), ("binfmt-support", "update-binfmts"))
               if shutil.which(tool) is None]  # fmt: skip
    if missing:
        say(f"installing {', '.join(missing)} from Debian's packages")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
        if subprocess.run(install, env=env).returncode != 0:
            run(["apt-get", "update"], env=env)
            run(install, env=env)
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)])
    if not (binfmt / "qemu-aarch64").exists():
        run(["update-binfmts", "--enable", "qemu-aarch64"])
    if "enabled" not in (binfmt / "qemu-aarch64").read_text():
        raise SystemExit("[aarch64] binfmt_misc has qemu-aarch64 but it is disabled")


def cache_key() -> str:
    """Changes when the packages, the pins or this harness change."""
    digest = hashlib.sha256()
    digest.update(" ".join([SUITE, MIRROR, *PACKAGES, *TEST_EXTRAS]).encode())
    digest.update((ROOT / "constraints.txt").read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def build_rootfs(cache: Path) -> Path:
    rootfs = cache / "rootfs"
    if (cache / "rootfs.complete").exists():
        say(f"root file system cached: {rootfs}")
        return rootfs
    say("building the arm64 root file system (mmdebstrap --variant=extract)")
    shutil.rmtree(rootfs, ignore_errors=True)
    run(["mmdebstrap", "--quiet", "--variant=extract", "--architectures=arm64",
         f"--include={','.join(PACKAGES)}", SUITE, str(rootfs), MIRROR])  # fmt: skip
    certs = Path("/etc/ssl/certs/ca-certificates.crt")
    if certs.exists():  # extract does not configure packages; the host's bundle serves
        (rootfs / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
        shutil.copy2(certs, rootfs / "etc/ssl/certs/ca-certificates.crt")
    (cache / "rootfs.complete").touch()
    return rootfs


def download_wheels(cache: Path, constraints: Path) -> Path:
    wheelhouse = cache / "wheelhouse"
    if (cache / "wheelhouse.complete").exists():
        say(f"aarch64 wheels cached: {wheelhouse}")
        return wheelhouse
    say("downloading the aarch64 wheels of the pinned runtime dependencies")
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
         *platforms, "--python-version", "3.11", "--implementation", "cp",
         "--dest", str(wheelhouse), "-r", str(constraints), *TEST_EXTRAS])  # fmt: skip
    (cache / "wheelhouse.complete").touch()
    return wheelhouse


def make_bundle(work: Path) -> Path:
    say(f"bundling export/pump-lstm.onnx for {DEVICE}")
    out = work / "bundle"
    run([str(ROOT / ".venv/bin/edgeseq"), "bundle", str(ROOT / "export/pump-lstm.onnx"),
         "--device", DEVICE, "-o", str(out)], cwd=ROOT)  # fmt: skip
    return out


class Guest:
    """Commands in the arm64 root file system: chroot, a clean environment, /proc and /dev
    mounted, /sys deliberately not (onnxruntime and some libraries misread the host's)."""

    def __init__(self, rootfs: Path) -> None:
        self.rootfs = rootfs
        self.mounts: list[Path] = []

    def __enter__(self) -> Guest:
        for source, target, options in (("proc", "proc", ["-t", "proc"]),
                                        ("/dev", "dev", ["--bind"])):  # fmt: skip
            path = self.rootfs / target
            path.mkdir(exist_ok=True)
            run(["mount", *options, source, str(path)])
            self.mounts.append(path)
        return self

    def __exit__(self, *exc: object) -> None:
        for path in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(path)])

    def run(self, command: str, cwd: str = "/root") -> int:
        env = ["env", "-i", f"PATH={GUEST_PATH}", "HOME=/root", "LANG=C.UTF-8",
               f"QEMU_CPU={QEMU_CPU}", f"NUMBA_CPU_NAME={QEMU_CPU}",
               "NUMBA_CACHE_DIR=/var/cache/edgeseq/numba", "PYTHONDONTWRITEBYTECODE=1"]  # fmt: skip
        script = f"cd {cwd} && {command}"
        chroot = ["chroot", str(self.rootfs), *env, "/bin/sh", "-c", script]
        return subprocess.run(chroot).returncode


def stage(rootfs: Path, bundle: Path, wheelhouse: Path) -> None:
    """The bundle, the wheels and the device suite, copied fresh into the guest's /root."""
    root = rootfs / "root"
    for name in ("bundle", "wheelhouse", "suite"):
        shutil.rmtree(root / name, ignore_errors=True)
    shutil.copytree(bundle, root / "bundle")
    shutil.copytree(wheelhouse, root / "wheelhouse")
    suite = root / "suite"
    (suite / "tests" / "deploy").mkdir(parents=True)
    for name in ("__init__.py", "conftest.py", "daemon_harness.py", "deploy/__init__.py",
                 "deploy/test_device_suite.py"):  # fmt: skip
        shutil.copy2(ROOT / "tests" / name, suite / "tests" / name)
    shutil.copytree(ROOT / "export", suite / "export", ignore=shutil.ignore_patterns("recipes"))
    shutil.copy2(ROOT / "pyproject.toml", suite / "pyproject.toml")  # pytest's settings


def main() -> int:
    start = time.monotonic()
    if os.geteuid() != 0:
        raise SystemExit("[aarch64] needs root (chroot and mounts); CI runs as root")
    ensure_host_tools()
    cache = Path(os.environ.get("EDGESEQ_AARCH64_CACHE", Path.home() / ".cache/edgeseq/aarch64"))
    cache = cache / cache_key()
    cache.mkdir(parents=True, exist_ok=True)
    work = cache / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    rootfs = build_rootfs(cache)
    bundle = make_bundle(work)
    wheelhouse = download_wheels(cache, bundle / "constraints.txt")
    stage(rootfs, bundle, wheelhouse)
    with Guest(rootfs) as guest:
        say("install.sh --no-systemd in the guest (warmup compiles the kernels on a cold cache)")
        if guest.run("./install.sh --no-systemd --wheelhouse /root/wheelhouse", "/root/bundle"):
            raise SystemExit("[aarch64] the bundle's install.sh failed in the guest")
        if guest.run("python -m pip install --quiet --disable-pip-version-check --no-index "
                     "--find-links /root/wheelhouse " + " ".join(TEST_EXTRAS)):  # fmt: skip
            raise SystemExit("[aarch64] installing pytest in the guest failed")
        say("the device suite on aarch64")
        code = guest.run("python -c 'import platform; print(\"guest:\", platform.machine())' && "
                         "EDGESEQ_SPECIALIZE=0 python -m pytest -q -p no:cacheprovider "
                         "tests/deploy/test_device_suite.py",
                         "/root/suite")  # fmt: skip
    minutes = (time.monotonic() - start) / 60
    say(f"{'passed' if code == 0 else 'FAILED'} in {minutes:.1f} min (emulated: not board speed)")
    return code


if __name__ == "__main__":
    sys.exit(main())
