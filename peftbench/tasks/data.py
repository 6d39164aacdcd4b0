"""Real data for the tasks that read it: a local folder of train/<eval_split> .csv/.json/.jsonl
files, or a hub dataset id, loaded with ``datasets``; plus seeded subsets and label encoding.

``check_local`` reads every line of the local files with the stdlib ``csv`` and ``json``
modules (milliseconds per MB), so that bytes that are not UTF-8, a malformed JSON line or a
CSV row with more fields than its header end in one line naming the file and the line, before
any model is built.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Optional

from peftbench.config import TaskConfig
from peftbench.errors import ConfigError

DATA_EXTENSIONS = {"csv": "csv", "json": "json", "jsonl": "json"}  # file suffix -> datasets builder
ALLOWED_FILES = "UTF-8 encoded .csv/.json/.jsonl files"
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def is_local(path: str) -> bool:
    """A path that names a file or folder (not a hub dataset id such as ``user/name``)."""
    return Path(path).expanduser().exists() or Path(path).suffix != "" or path.startswith((".", "/", "~"))


def require_path(cfg: TaskConfig) -> None:
    if not cfg.path:
        raise ConfigError(
            f"task.path=null: {cfg.name} needs a folder of train/validation .csv/.json/.jsonl files or a hub dataset id"
        )


def split_files(cfg: TaskConfig, extensions: tuple[str, ...] = tuple(DATA_EXTENSIONS)) -> dict[str, Path]:
    """The train and evaluation files of a local ``task.path`` folder, by split name; the first
    of ``extensions`` (file suffixes without the dot) present wins."""
    folder = Path(str(cfg.path)).expanduser()  # set: require_path ran first
    suffixes = "/.".join(extensions)
    if not folder.is_dir():
        raise ConfigError(
            f"task.path={cfg.path}: no such folder (allowed: a folder of train/{cfg.eval_split} "
            f".{suffixes} files, or a hub dataset id)"
        )
    files = {}
    for split in dict.fromkeys(("train", cfg.eval_split)):
        found = [folder / f"{split}.{ext}" for ext in extensions if (folder / f"{split}.{ext}").is_file()]
        if not found:
            present = sorted(p.name for p in folder.iterdir() if p.suffix[1:] in extensions)
            key = "task.path" if split == "train" else "task.eval_split"
            value = cfg.path if split == "train" else split
            raise ConfigError(
                f"{key}={value}: no {split}.{suffixes} in {cfg.path}; files there: {', '.join(present) or 'none'}"
            )
        files[split] = found[0]
    return files


# ------------------------------------------------------------------ reading local files up front


def _error(cfg: TaskConfig, f: Path, where: str, what: str) -> ConfigError:
    return ConfigError(f"task.path={cfg.path}: {f.name} {where}: {what}")


def decode(cfg: TaskConfig, f: Path, allowed: str = ALLOWED_FILES) -> str:
    """The text of a local file (a leading BOM dropped); a one-line ConfigError naming the file
    and the line (1-based) where the bytes are not UTF-8, then ``allowed``."""
    raw = f.read_bytes()
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        what = f"not UTF-8 text (byte 0x{raw[e.start]:02x}); allowed: {allowed}"
        raise _error(cfg, f, f"line {line}", what) from None


def scan(cfg: TaskConfig, f: Path) -> tuple[list[str], int]:
    """The column names and the number of examples of a local split file, read in full.

    Raises a one-line ConfigError naming the file and the line (1-based) where the bytes are not
    UTF-8, a JSON line is not an object, or a CSV row has more fields than its header.
    """
    columns, rows = read_rows(cfg, f)
    return columns, len(rows)


def read_rows(cfg: TaskConfig, f: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The column names and the examples (one dict each) of a local split file, checked as
    ``scan`` says; a CSV row shorter than its header has None in the missing columns."""
    text = decode(cfg, f)
    if f.suffix == ".csv":
        return _scan_csv(cfg, f, text)
    if text.startswith("["):  # what datasets reads as one JSON array; anything else as JSON Lines
        return _scan_json_array(cfg, f, text)
    return _scan_json_lines(cfg, f, text)


def _scan_csv(cfg: TaskConfig, f: Path, text: str) -> tuple[list[str], list[dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, [])
    rows: list[dict[str, Any]] = []
    line = reader.line_num  # the last line read (a quoted field may span lines)
    try:
        for row in reader:
            if len(row) > len(header):
                raise _error(
                    cfg,
                    f,
                    f"line {line + 1}",
                    f"{len(row)} fields but the header has {len(header)}; "
                    f"allowed: at most {len(header)} (quote a text that contains a comma)",
                )
            if row:  # a blank line is no example
                rows.append(dict(zip(header, row + [None] * (len(header) - len(row)))))
            line = reader.line_num
    except csv.Error as e:
        raise _error(cfg, f, f"line {reader.line_num}", f"not CSV ({e})") from None
    return header, rows


def _scan_json_lines(cfg: TaskConfig, f: Path, text: str) -> tuple[list[str], list[dict[str, Any]]]:
    """JSON Lines, or JSON objects one after another spread over lines (datasets reads both)."""
    decoder = json.JSONDecoder()
    columns: dict[str, None] = {}
    rows: list[dict[str, Any]] = []
    space = _JSON_SPACE.match(text)
    assert space is not None  # the pattern matches the empty string
    pos = space.end()
    while pos < len(text):
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:  # e.lineno, e.colno: in the file, 1-based
            raise _error(cfg, f, f"line {e.lineno}", f"not a JSON object ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            line = text.count("\n", 0, pos) + 1
            raise _error(cfg, f, f"line {line}", f"not a JSON object: {text[pos:end][:40]}")
        columns.update(dict.fromkeys(row))
        rows.append(row)
        space = _JSON_SPACE.match(text, end)
        assert space is not None
        pos = space.end()
    return list(columns), rows


def _scan_json_array(cfg: TaskConfig, f: Path, text: str) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise _error(cfg, f, f"line {e.lineno}", f"not a JSON array of objects ({e.msg} at column {e.colno})") from None
    columns: dict[str, None] = {}
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise _error(cfg, f, f"item {i}", f"not a JSON object: {json.dumps(row)[:40]}")
        columns.update(dict.fromkeys(row))
    return list(columns), rows


def check_local(cfg: TaskConfig, column_keys: tuple[str, ...]) -> None:
    """``task.path`` is set; if it is a local folder, its split files parse line by line, hold
    examples and have the columns the keys in ``column_keys`` (e.g. ``text_column``) name. A hub
    dataset is only checked when it is loaded."""
    require_path(cfg)
    if not is_local(str(cfg.path)):
        return
    for f in split_files(cfg).values():
        check_file(cfg, f, column_keys)


def check_file(cfg: TaskConfig, f: Path, column_keys: tuple[str, ...]) -> None:
    """One local .csv/.json/.jsonl split file parses line by line, holds examples and has the
    columns the keys in ``column_keys`` name."""
    columns, rows = scan(cfg, f)
    for key in column_keys:
        col = getattr(cfg, key)
        if col not in columns:
            raise ConfigError(f"task.{key}={col}: no such column in {f.name}; allowed: {', '.join(columns)}")
    if not rows:
        raise ConfigError(
            f"task.path={cfg.path}: {f.name} holds no examples; allowed: {ALLOWED_FILES} with at least one row"
        )


def num_local_train(cfg: TaskConfig) -> Optional[int]:
    """Training examples of ``task.path`` kept by ``num_train``, counted from the local train
    file; None for a hub dataset (unknown until loaded)."""
    require_path(cfg)
    if not is_local(str(cfg.path)):
        return None
    _, rows = scan(cfg, split_files(cfg)["train"])
    return rows if cfg.num_train is None else min(rows, cfg.num_train)


# --------------------------------------------------------------------------- loading


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def load_file(cfg: TaskConfig, split: str, f: Path) -> Any:
    """One local .csv/.json/.jsonl split file as a Dataset."""
    import datasets

    try:
        return datasets.load_dataset(DATA_EXTENSIONS[f.suffix[1:]], data_files={split: str(f)}, split=split)
    except Exception as e:  # DatasetGenerationError says nothing; its cause names the line
        raise ConfigError(
            f"task.path={cfg.path}: {f.name}: datasets cannot read it ({_one_line(e.__cause__ or e)})"
        ) from None


def load_splits(cfg: TaskConfig) -> dict[str, Any]:
    """``{"train": Dataset, eval_split: Dataset}`` from a local folder or the hub."""
    import datasets

    require_path(cfg)
    if is_local(str(cfg.path)):
        return {split: load_file(cfg, split, f) for split, f in split_files(cfg).items()}
    try:
        ds = datasets.load_dataset(str(cfg.path))
    except Exception as e:  # offline, unknown id, gated: all end the run the same way
        raise ConfigError(
            f"task.path={cfg.path}: not a local folder, and loading it as a hub dataset failed ({_one_line(e)})"
        ) from None
    for split in ("train", cfg.eval_split):
        if split not in ds:
            key = "task.path" if split == "train" else "task.eval_split"
            raise ConfigError(
                f"{key}={cfg.path if split == 'train' else split}: the dataset has no "
                f"{split!r} split; allowed: {', '.join(ds.keys())}"
            )
    return {"train": ds["train"], cfg.eval_split: ds[cfg.eval_split]}


def check_columns(cfg: TaskConfig, splits: dict[str, Any], column_keys: tuple[str, ...]) -> None:
    """Every split has the columns the keys in ``column_keys`` name (a hub dataset's first check)."""
    for split, ds in splits.items():
        for key in column_keys:
            col = getattr(cfg, key)
            if col not in ds.column_names:
                raise ConfigError(
                    f"task.{key}={col}: no such column in the {split} split; allowed: {', '.join(ds.column_names)}"
                )


def subset(ds: Any, n: Optional[int], seed: int) -> Any:
    """At most ``n`` examples, a seeded random subset (files are often sorted by label)."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def encode_labels(
    cfg: TaskConfig, train: Any, raw_train: list[Any], raw_eval: list[Any]
) -> tuple[list[str], list[int], list[int]]:
    """Class names, and the train and eval labels as class ids 0..K-1.

    The dataset's ``ClassLabel`` names when it has them; else integer labels (``1``, ``1.0``,
    ``true``) in increasing order; else string labels in sorted order.
    """
    feature = train.features.get(cfg.label_column)
    if hasattr(feature, "names"):  # ClassLabel: the values are ids already
        return list(feature.names), [int(v) for v in raw_train], [int(v) for v in raw_eval]
    values = raw_train + raw_eval
    missing = sum(v is None for v in values)
    if missing:
        raise ConfigError(f"task.label_column={cfg.label_column}: {missing} examples have no label")
    if all(isinstance(v, (bool, int)) or (isinstance(v, float) and v.is_integer()) for v in values):
        ids = sorted({int(v) for v in values})
        index = {v: i for i, v in enumerate(ids)}
        return [str(v) for v in ids], [index[int(v)] for v in raw_train], [index[int(v)] for v in raw_eval]
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        index = {v: i for i, v in enumerate(names)}
        return names, [index[v] for v in raw_train], [index[v] for v in raw_eval]
    kinds = sorted({type(v).__name__ for v in values})
    raise ConfigError(
        f"task.label_column={cfg.label_column}: labels must be class ids (integers) or class "
        f"names (strings); found {', '.join(kinds)} values"
    )
