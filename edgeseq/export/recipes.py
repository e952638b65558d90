"""Reference models from recipes: a TOML file names the data and the training options; replaying
it trains, exports, and writes golden input/output arrays beside the model.

Recipe format (`export/recipes/NAME.toml`):

    data = "builtin:pump"        # builtin:NAME (edgeseq.data.builtin) or a CSV path with [columns]
    [train]                       # any TrainConfig field
    task = "forecast"
    cell = "lstm"
    [export]                      # optional: quantize = "int8", max_error = 0.02

Replaying writes `export/NAME.onnx` and `export/NAME.golden.npz` (inputs x, h0[, c0] and the
outputs y, hn[, cn] that ONNX Runtime computes from the file), which runtime, daemon and device
tests use without PyTorch.
"""

from __future__ import annotations

import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from edgeseq.data import builtin as datasets
from edgeseq.data.tables import Columns, Dataset, load_csv
from edgeseq.errors import UsageError

BUILTIN: dict[str, Callable[[], Dataset]] = {
    "pump": datasets.pump,
    "sine": datasets.sine_series,
    "classes": datasets.frequency_classes,
    "levels": datasets.level_regression,
    "waves": datasets.sine_from_vector,
    "sensors8": datasets.sensors8,
}
GOLDEN_STEPS = 50
GOLDEN_BATCH = 2


def read_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        recipe = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: not a readable recipe ({exc})") from None
    if "data" not in recipe or not isinstance(recipe.get("train", {}), dict):
        raise UsageError(f"{path}: a recipe needs `data = ...` and a [train] table")
    unknown_export = sorted(set(recipe.get("export", {})) - {"quantize", "max_error"})
    if unknown_export:
        raise UsageError(f"{path}: unknown [export] keys {unknown_export}")
    from edgeseq.train.pipeline import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(recipe.get("train", {})) - known)
    if unknown:
        raise UsageError(f"{path}: unknown [train] keys {unknown}; known: {sorted(known)}")
    return recipe


def _dataset(recipe: dict[str, Any], base: Path) -> Dataset:
    source = str(recipe["data"])
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN:
            raise UsageError(f"unknown built-in data {name!r}; choose from {sorted(BUILTIN)}")
        return BUILTIN[name]()
    cols = recipe.get("columns", {})
    columns = Columns(
        targets=tuple(cols.get("target", ())),
        features=tuple(cols["features"]) if "features" in cols else None,
        time_col=cols.get("time"),
        id_col=cols.get("id"),
        label_col=cols.get("label"),
    )
    return load_csv((base / source).resolve(), columns, fill=cols.get("fill", "error"))


def golden_io(model_path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs spread like the training data, and ONNX Runtime's outputs for them."""
    import onnxruntime as ort

    from edgeseq.artifact import load_info, sample_feeds

    _, info = load_info(model_path)
    feeds = sample_feeds(
        info.model_spec, info.data_spec, GOLDEN_BATCH, GOLDEN_STEPS, seed=seed, state_std=0.1
    )
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return feeds | dict(zip(names, session.run(None, feeds), strict=True))


def replay(recipe_path: str | Path, out_dir: str | Path) -> Path:
    """Train and export the recipe's model into `out_dir`; returns the .onnx path."""
    from edgeseq.export.onnx_export import export_checkpoint
    from edgeseq.train.pipeline import TrainConfig, train

    recipe_path, out_dir = Path(recipe_path), Path(out_dir)
    recipe = read_recipe(recipe_path)
    data = _dataset(recipe, recipe_path.parent)
    name = recipe_path.stem
    model_path = out_dir / f"{name}.onnx"
    with tempfile.TemporaryDirectory() as run_dir:
        train(data, TrainConfig(**recipe.get("train", {})), run_dir,
              command=["edgeseq", "replay", str(recipe_path)])  # fmt: skip
        export_checkpoint(run_dir, model_path, **recipe.get("export", {}))
    arrays = golden_io(model_path)
    np.savez(out_dir / f"{name}.golden.npz", allow_pickle=False, **arrays)
    return model_path
