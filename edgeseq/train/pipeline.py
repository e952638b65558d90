"""`edgeseq train`: data -> windows -> fit -> evaluate -> a run directory that describes itself.

The run directory holds `checkpoint.pt` (the best weights, ModelSpec, DataSpec and what is needed
to resume), `metrics.json`, `plot.png` and `command.txt`.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeseq.data import target_transform
from edgeseq.data.prepare import AUTOREGRESSIVE_TASKS, Encoded, Prepared, prepare
from edgeseq.data.tables import Dataset
from edgeseq.data.windows import make_windows
from edgeseq.errors import UsageError
from edgeseq.spec import TRANSFORMS, ModelSpec, TargetTransform
from edgeseq.train import heldout
from edgeseq.train import run_checkpoint as checkpoint
from edgeseq.train.evaluate import Evaluation, evaluate, raw_outputs
from edgeseq.train.fit import EpochLog, FitOptions, FitState, fit, history_as_dicts, masked_loss
from edgeseq.train.heldout import LAST_STEP_TASKS, scored_mask
from edgeseq.train.networks import build_model
from edgeseq.train.plots import save_run_plot

DEFAULT_WINDOW = 64  # forecast/seq2seq windows when neither --window nor --tbptt is given


@dataclass
class TrainConfig:
    """Every knob of a training run; the CLI options map onto these one to one."""

    task: str = "forecast"
    cell: str = "lstm"
    hidden: int = 32
    layers: int = 1
    epochs: int = 200
    seed: int = 0
    horizon: int = 1
    window: int | None = None
    stride: int | None = None
    tbptt: int | None = None
    clip: float = 1.0
    clip_value: float | None = None
    lr: float = 3e-3
    batch_size: int = 16
    patience: int = 30
    dropout: float = 0.0
    nonlinearity: str = "tanh"
    val_size: float = 0.15
    test_size: float = 0.15
    season: int | None = None
    target_transform: str = "auto"  # forecast, seq2seq: spec.TRANSFORMS, or auto (validation)
    threads: int = 1  # small recurrent nets gain nothing from intra-op threads; 2 jobs thrash


@dataclass
class RunResult:
    run_dir: Path
    prepared: Prepared
    model: torch.nn.Module
    evaluation: Evaluation
    fit_state: FitState
    metrics: dict[str, Any] = field(default_factory=dict)


def _check(cfg: TrainConfig) -> None:
    for name in ("hidden", "layers", "epochs", "horizon", "batch_size", "threads"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, found {getattr(cfg, name)}")
    if cfg.tbptt is not None and cfg.tbptt < 1:
        raise UsageError(f"--tbptt must be >= 1, found {cfg.tbptt}")
    if cfg.lr <= 0 or cfg.clip < 0:
        raise UsageError("--lr must be > 0 and --clip >= 0")
    if cfg.target_transform not in ("auto", *TRANSFORMS):
        raise UsageError(f"--target-transform {cfg.target_transform!r}: expected auto or one of "
                         f"{', '.join(TRANSFORMS)}")  # fmt: skip
    if cfg.target_transform.endswith("seasonal") and cfg.season is None:
        raise UsageError(f"--target-transform {cfg.target_transform} needs --season (its length "
                         "in steps)")  # fmt: skip
    if cfg.season is not None and cfg.season < cfg.horizon:
        raise UsageError(f"--season {cfg.season} must be at least --horizon {cfg.horizon}")


def transform_candidates(cfg: TrainConfig, data: Dataset) -> list[TargetTransform]:
    """The transforms `auto` tries on the validation split (one, when the choice is made):
    levels, changes, and with --season seasonal changes; each also of the log where every
    target is positive (multiplicative growth)."""
    season = cfg.season or 1
    if cfg.task not in AUTOREGRESSIVE_TASKS:
        return [TargetTransform()]
    if cfg.target_transform != "auto":
        return [TargetTransform(cfg.target_transform, season)]
    names = ["none", "diff"]
    if all(bool((r.targets > 0).all()) for r in data.recordings):
        names.append("log-diff")
    if cfg.season is not None:
        names += ["seasonal", "log-seasonal"] if "log-diff" in names else ["seasonal"]
    return [TargetTransform(name, season) for name in names]


def _window(cfg: TrainConfig) -> int | None:
    if cfg.window is not None or cfg.tbptt is not None or cfg.task in ("classify", "regress"):
        return cfg.window
    if cfg.task == "generate":
        return None
    return DEFAULT_WINDOW


def _validator(prepared: Prepared, classify: bool) -> Callable[[torch.nn.Module], float] | None:
    """Validation loss on whole held-out segments, streamed from their start (as deployed)."""
    if not prepared.val:
        return None

    def loss(model: torch.nn.Module) -> float:
        total, count = 0.0, 0
        for e in prepared.val:
            mask = scored_mask(e.mask, prepared.task)
            out = torch.from_numpy(raw_outputs(model, e))
            n = int(mask.sum())
            value = masked_loss(out, torch.from_numpy(e.y), torch.from_numpy(mask), classify)
            total, count = total + float(value) * n, count + n
        return total / count

    return loss


def model_spec_for(cfg: TrainConfig, prepared: Prepared) -> ModelSpec:
    return ModelSpec(
        task=cfg.task,
        cell=cfg.cell,
        input_size=prepared.input_size,
        hidden_size=cfg.hidden,
        num_layers=cfg.layers,
        output_size=prepared.output_size,
        horizon=cfg.horizon,
        n_targets=len(prepared.data_spec.targets),
        nonlinearity=cfg.nonlinearity,
        dropout=cfg.dropout,
    )


def _segments_summary(segs: list[Encoded]) -> dict[str, int]:
    return {"sequences": len(segs), "scored_steps": int(sum(e.mask.sum() for e in segs))}


def _restore(run_dir: Path, spec: ModelSpec, model: torch.nn.Module) -> tuple[FitState, dict]:
    """Pick up a run where its last checkpoint left off (same data and options required)."""
    ckpt = checkpoint.load(run_dir)
    if ckpt.model_spec != spec or ckpt.resume is None:
        raise UsageError(
            f"{run_dir}: cannot resume: its model spec {ckpt.model_spec.to_dict()} differs from "
            f"this run's {spec.to_dict()} (or the run did not save resume state)"
        )
    loop = json.loads(ckpt.resume["loop"])
    model.load_state_dict(ckpt.resume["last_weights"])
    state = FitState(
        epoch=loop["epoch"],
        best_loss=loop["best_loss"],
        best_epoch=loop["best_epoch"],
        bad_epochs=loop["bad_epochs"],
        history=[EpochLog(**h) for h in loop["history"]],
        best_weights=ckpt.weights,
        stopped_early=loop["stopped_early"],
    )
    return state, ckpt.resume


def _resume_blob(model: torch.nn.Module, state: FitState, resumable: dict) -> dict[str, Any]:
    loop = {
        "epoch": state.epoch,
        "best_loss": state.best_loss,
        "best_epoch": state.best_epoch,
        "bad_epochs": state.bad_epochs,
        "history": history_as_dicts(state),
        "stopped_early": state.stopped_early,
    }
    return {"loop": json.dumps(loop), "last_weights": model.state_dict(), **resumable}


def _metrics(cfg: TrainConfig, prepared: Prepared, ev: Evaluation, state: FitState) -> dict:
    norms = [h.grad_norm_max for h in state.history]
    return {
        "task": cfg.task,
        "test": ev.scores,
        "baseline": next(iter(ev.baselines.values())),
        "baselines": ev.baselines,
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "best_loss": state.best_loss,
        "stopped_early": state.stopped_early,
        "max_grad_norm_before_clipping": max(norms, default=0.0),
        "splits": {
            name: _segments_summary(getattr(prepared, name)) for name in ("train", "val", "test")
        },
    }


@dataclass
class _Candidate:
    """One fit: the data as one target transform encodes it, and the model trained on it."""

    prepared: Prepared
    spec: ModelSpec
    model: torch.nn.Module
    state: FitState
    resume_blob: dict[str, Any] | None
    summary: dict[str, Any]
    val_rmse: float = float("inf")


def _fit_candidate(
    data: Dataset, cfg: TrainConfig, run_dir: Path, transform: TargetTransform, *,
    test: Dataset | None, command: list[str] | None, resume: bool,
    on_epoch: Callable[[EpochLog, FitState], None] | None,
) -> _Candidate:  # fmt: skip
    """Prepare the data under `transform`, then fit from the same seed as every other
    candidate, writing the checkpoint after every epoch (what --resume continues from)."""
    torch.manual_seed(cfg.seed)
    prepared = prepare(
        data,
        cfg.task,
        horizon=cfg.horizon,
        test=test,
        val_size=cfg.val_size,
        test_size=cfg.test_size,
        seed=cfg.seed,
        transform=transform,
    )
    spec = model_spec_for(cfg, prepared)
    model = build_model(spec)
    windows = make_windows(
        prepared.train, _window(cfg), cfg.stride, last_only=cfg.task in LAST_STEP_TASKS
    )
    state, resume_blob = _restore(run_dir, spec, model) if resume else (None, None)
    summary: dict[str, Any] = {
        "config": asdict(cfg),
        "command": command or [],
        "train_windows": len(windows),
        "window_length": int(windows.x.shape[1]),
    }
    run = _Candidate(prepared, spec, model, FitState(), resume_blob, summary)

    def after_epoch(log: EpochLog, fit_state: FitState, resumable: dict[str, Any]) -> None:
        run.resume_blob = resumable
        _save(run_dir, run, fit_state, resumable)
        if on_epoch is not None:
            on_epoch(log, fit_state)

    options = FitOptions(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        tbptt=cfg.tbptt,
        clip=cfg.clip,
        clip_value=cfg.clip_value,
        patience=cfg.patience,
        classify=cfg.task == "classify",
    )
    validate = _validator(prepared, options.classify)
    run.state = fit(
        model,
        windows,
        validate,
        options,
        seed=cfg.seed,
        state=state,
        resume=resume_blob,
        on_epoch=after_epoch,
    )
    if prepared.val and cfg.task in AUTOREGRESSIVE_TASKS:
        scores = evaluate(model, prepared, prepared.val, classical_baseline=False).scores
        run.val_rmse = float(scores["rmse"])
    return run


def _save(
    run_dir: Path, run: _Candidate, fit_state: FitState, resumable: dict[str, Any] | None,
    weights: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    best = weights if weights is not None else (fit_state.best_weights or run.model.state_dict())
    blob = _resume_blob(run.model, fit_state, resumable) if resumable is not None else None
    checkpoint.save(
        run_dir / "checkpoint.pt",
        checkpoint.Checkpoint(run.spec, run.prepared.data_spec, best, run.summary, blob),
    )


def _transform_name(prepared: Prepared) -> str:
    return (prepared.data_spec.target_transform or TargetTransform()).name


def _heldout_targets(e: Encoded, prepared: Prepared) -> np.ndarray:
    """What int8 export scores against: a forecast's future targets in physical units, scaled
    by the target scaling (the network's own y when its targets are not transformed)."""
    if prepared.task not in AUTOREGRESSIVE_TASKS:
        return e.y
    scaling = prepared.data_spec.target_scaling
    assert scaling is not None
    future = target_transform.ahead(e.targets, target_transform.NONE, prepared.horizon)
    scaled = (future - np.asarray(scaling.mean)) / np.asarray(scaling.std)
    return scaled.reshape(len(e.targets), -1).astype(np.float32)


def train(
    data: Dataset,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    test: Dataset | None = None,
    command: list[str] | None = None,
    resume: bool = False,
    on_epoch: Callable[[EpochLog, FitState], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    progress: bool = True,
) -> RunResult:
    """Train (once per target transform when it is `auto`, keeping the one best on the
    validation split), evaluate on the held-out split and write the run directory.

    Without an `on_epoch` callback, a progress bar on stderr shows the epochs (a minute of
    training is not silent) unless `progress` is False."""
    if on_epoch is None and progress:
        from rich.console import Console

        from edgeseq.train.console import epoch_progress

        with epoch_progress(Console(stderr=True), cfg.epochs) as bar:
            return train(data, cfg, run_dir, test=test, command=command, resume=resume,
                         on_epoch=bar, on_phase=bar.phase)  # fmt: skip
    _check(cfg)
    run_dir = Path(run_dir)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(cfg.threads)
    candidates = transform_candidates(cfg, data)
    if resume:  # the transform the interrupted run was fitting
        saved = checkpoint.load(run_dir).data_spec.target_transform
        candidates = [saved or TargetTransform()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create run directory {run_dir}: {exc.strerror}") from None
    runs: list[_Candidate] = []
    for transform in candidates:
        if runs and not runs[0].prepared.val:
            break  # no validation split to choose by: the levels, as without a transform
        if on_phase is not None and len(candidates) > 1:
            on_phase(transform.name)  # the progress line's label: which transform is fitted
        runs.append(_fit_candidate(data, cfg, run_dir, transform, test=test, command=command,
                                   resume=resume, on_epoch=on_epoch))  # fmt: skip
    run = min(runs, key=lambda r: r.val_rmse)  # the first on a tie (or without validation)
    prepared, model, state = run.prepared, run.model, run.state
    evaluation = evaluate(model, prepared, prepared.test or prepared.val, season=cfg.season)
    metrics = _metrics(cfg, prepared, evaluation, state)
    if cfg.task in AUTOREGRESSIVE_TASKS:
        metrics["target_transform"] = _transform_name(prepared)
        metrics["target_transform_validation_rmse"] = {
            _transform_name(r.prepared): r.val_rmse if np.isfinite(r.val_rmse) else None
            for r in runs
        }
    run.summary["metrics"] = metrics
    run.summary["history"] = history_as_dicts(state)
    _save(run_dir, run, state, run.resume_blob, weights=model.state_dict())
    heldout.save(
        run_dir / heldout.FILENAME,
        [
            heldout.HeldoutSequence(
                e.raw_x, _heldout_targets(e, prepared), scored_mask(e.mask, cfg.task)
            )
            for e in prepared.test or prepared.val
        ],
    )  # fmt: skip
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (run_dir / "command.txt").write_text(shlex.join(command or sys.argv) + "\n")
    target = (prepared.data_spec.targets or ("label",))[0]
    save_run_plot(
        run_dir / "plot.png",
        run.summary["history"],
        cfg.task,
        evaluation.scores,
        evaluation.example,
        target,
        transform=metrics.get("target_transform"),
        time_label=prepared.data_spec.time_col,
    )
    return RunResult(run_dir, prepared, model, evaluation, state, metrics)
