"""The shape of a run record, checked whenever a record is read back.

Types every field that the readers (report, compare, resume) use, as the writer writes it;
other keys pass through unchecked. ``problem(obj)`` says in one line why parsed JSON is not
a valid record (the field's path, its value, what is allowed), or returns None.
"""

from __future__ import annotations

import reprlib
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictBool, StrictInt, StrictStr, ValidationError
from pydantic_core import PydanticCustomError

LIMIT = 2**63  # an int64 column for integers; floats beyond it are no figure and break the plots
# pydantic's words where they would name a Python type
REASONS = {"dict_type": "must be a JSON object", "model_type": "must be a JSON object", "missing": "required"}


def number(x: Any) -> Any:
    """A figure as the writer writes it: an integer or a finite float, within +-2**63."""
    if isinstance(x, (int, float)) and not isinstance(x, bool) and -LIMIT <= x < LIMIT:  # NaN fails too
        return x
    raise PydanticCustomError("number", "must be a number within +-2**63")


Number = Annotated[Any, PlainValidator(number)]
Figure = Optional[Number]  # a figure, or null where it was not measured


class Open(BaseModel):
    """A JSON object with some typed keys; other keys are allowed and not checked."""

    model_config = ConfigDict(extra="allow", strict=True)


class MethodSettings(Open):
    name: Optional[StrictStr] = None
    rank: Optional[StrictInt] = None


class Config(Open):
    method: MethodSettings
    train: Optional[dict[str, Any]] = None


class Launcher(Open):
    parallel: Optional[StrictBool] = None


class Provenance(Open):
    git_sha: Optional[StrictStr] = None
    git_dirty: Optional[StrictBool] = None
    code_dirty: Optional[StrictBool] = None
    code_diff_sha256: Optional[StrictStr] = None
    code_tree: Optional[StrictStr] = None  # SHA-256 of the measured code's git objects at the commit
    packages: Optional[dict[str, Optional[StrictStr]]] = None
    device_type: Optional[StrictStr] = None
    device_name: Optional[StrictStr] = None
    timestamp: Optional[StrictStr] = None
    launcher: Optional[Launcher] = None


class LatencyRow(Open):
    """One point of ``latency_grid`` (milliseconds; the unmerged pair only for a method that merges)."""

    batch: Annotated[StrictInt, Field(ge=1)]
    length: Annotated[StrictInt, Field(ge=1)]
    inference_latency_ms: Figure
    inference_latency_iqr_ms: Figure = None
    inference_latency_unmerged_ms: Figure = None
    inference_latency_unmerged_iqr_ms: Figure = None
    tokens_per_s: Figure = None


class Record(Open):
    model_config = ConfigDict(protected_namespaces=())  # the record's own ``model_config`` key

    schema_version: StrictInt
    run_id: StrictStr
    kind: StrictStr
    status: Literal["ok", "failed", "running"]
    error: Optional[StrictStr] = None
    method: StrictStr
    model: StrictStr
    task: Optional[StrictStr]
    config_hash: Optional[StrictStr] = None
    config: Optional[Config] = None
    provenance: Optional[Provenance] = None
    method_config: Optional[dict[str, Any]] = None
    model_config_: Optional[dict[str, Any]] = Field(None, alias="model_config")
    base_weights_sha256: Optional[StrictStr] = None
    metrics: dict[str, Figure]
    train_step_ms: Optional[list[Number]] = None
    train_losses: Optional[list[Number]] = None
    wall_s: Figure = None
    # wall seconds per phase (load, zero_shot, train, curve, eval, forgetting, latency, decode,
    # checkpoint, writing, other); they sum to ``wall_s``
    phase_s: Optional[dict[str, Annotated[float, Field(ge=0)]]] = None
    latency_grid: Optional[list[LatencyRow]] = None


def where(loc: tuple[Any, ...]) -> str:
    """pydantic's location as a path: ``latency_grid[0].batch``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


# How ``problem`` begins for some other program's JSON (the reader then checks for a companion file).
NOT_A_RECORD = "not a peftbench record"


def problem(obj: Any) -> Optional[str]:
    """Why ``obj`` (parsed JSON) is not a valid run record, in one line, or None if it is one."""
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not an object"
    try:
        Record.model_validate(obj)
    except ValidationError as e:
        errors = e.errors()
        missing = [where(x["loc"]) for x in errors if x["type"] == "missing" and len(x["loc"]) == 1]
        if len(missing) > 2:  # some other program's JSON
            return f"{NOT_A_RECORD} (missing {', '.join(missing)})"
        first = errors[0]
        value = "" if first["type"] == "missing" else f"={reprlib.repr(first['input'])}"
        why = REASONS.get(first["type"], first["msg"].replace("Input should be", "must be"))
        return f"{where(first['loc'])}{value}: {why}"
    return None
