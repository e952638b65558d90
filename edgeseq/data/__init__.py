"""Data: tables in (CSV files, pandas frames, arrays), validated recordings out, then the
arrays each task shape trains on (the training side; needs pandas).

- tables: CSV / frame / arrays -> Dataset (column roles, missing values, time order);
- builtin: synthetic data sets, so the demo, recipes and tests need no files;
- target_transform: a forecast's targets as changes (diff, log, seasonal) and back;
- prepare: recordings -> scaled model arrays per task shape, split without leakage;
- windows: encoded sequences -> fixed-length training windows with a loss mask.

The public names (`from edgeseq.data import Columns, load_csv, ...`) are those of tables.
"""

from edgeseq.data.tables import Columns, Dataset, from_arrays, from_frame, load_csv

__all__ = ["Columns", "Dataset", "from_arrays", "from_frame", "load_csv"]
