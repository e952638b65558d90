"""Train one epoch on one long sine recording; print the peak resident memory of training (MiB).

Usage: python -m tests.memory_probe STEPS (K | full)
K trains with truncated BPTT in chunks of K steps; `full` backpropagates through the whole
recording at once, for contrast. Runs in its own process so that the high-water mark
(ru_maxrss), read when the epoch ends, belongs to this training run alone.
"""

from __future__ import annotations

import resource
import sys
import tempfile

from edgeseq.train.pipeline import TrainConfig, train
from tests.toys import sine_series


def peak_mib() -> float:
    """Peak resident memory of this process image. VmHWM starts afresh at exec; ru_maxrss would
    inherit the high-water mark of a large parent (such as pytest) that forked us."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    steps, mode = int(sys.argv[1]), sys.argv[2]
    common = dict(hidden=32, epochs=1, val_size=0, test_size=0.1)
    if mode == "full":
        cfg = TrainConfig(window=int(steps * 0.9), **common)  # type: ignore[arg-type]
    else:
        cfg = TrainConfig(tbptt=int(mode), **common)  # type: ignore[arg-type]
    peaks = []
    with tempfile.TemporaryDirectory() as run_dir:
        train(
            sine_series(steps=steps),
            cfg,
            run_dir,
            on_epoch=lambda log, st: peaks.append(peak_mib()),
        )
    print(f"{peaks[-1]:.1f}")


if __name__ == "__main__":
    main()
