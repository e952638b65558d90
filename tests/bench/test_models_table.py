"""`edgeseq bench --models-in`: every model's row, twins paired (no timing asserted: noisy)."""

from __future__ import annotations

from pathlib import Path

from edgeseq.bench import models_table

EXPORT = Path(__file__).resolve().parents[2] / "export"


def test_every_model_gets_a_row_and_int8_and_seq2seq_models_their_yardsticks(tmp_path):
    for name in ("pump-gru", "pump-gru-int8", "sine-seq2seq-lstm"):
        (tmp_path / f"{name}.onnx").symlink_to(EXPORT / f"{name}.onnx")
    rows = {row["model"]: row for row in models_table.measure_folder(tmp_path)}
    assert sorted(rows) == ["pump-gru", "pump-gru-int8", "sine-seq2seq-lstm"]
    assert all(row["plan"].startswith("fused: ") for row in rows.values())
    assert all(row["step"] > 0 and row["feed"] > 0 for row in rows.values())
    int8 = rows["pump-gru-int8"]
    assert "GruQ" in int8["plan"] and int8["twin"].startswith("pump-gru: step ")
    assert int8["bytes"] < 0.5 * rows["pump-gru"]["bytes"] and int8["target"] == 1.3
    assert rows["sine-seq2seq-lstm"]["twin"].startswith("(1 + 4) steps of an LSTM 16 -> 16")
    table = models_table.markdown(list(rows.values()), tmp_path)
    assert sum(line.startswith("|") for line in table.splitlines()) == 2 + len(rows)
