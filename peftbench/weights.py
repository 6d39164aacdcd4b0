"""Where pretrained weights come from, offline: a local Hugging Face folder (or a hub id where the
user has internet), a file shipped inside an installed Python package (``pkg://<package>/<file>``),
or a GGUF file, dequantized once into a cache folder of safetensors.

``model.name_or_path`` takes any of them; ``resolve`` turns it into something
``from_pretrained`` reads (a folder or a hub id), and ``provenance`` says what the weights are
(the file's SHA-256 and quantization type for a GGUF file). The GGUF cache is keyed by the
file's SHA-256, so a second load reads plain safetensors in seconds instead of dequantizing
again (about 20-35 s for SmolLM2-135M on 2 cores). Its weights are the dequantized values of
the quantized file: identical for every method, but not the original 16-bit checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from peftbench.errors import ConfigError

PACKAGE_SCHEME = "pkg://"
CACHE_ENV = "PEFTBENCH_CACHE"


def cache_root() -> Path:
    """``$PEFTBENCH_CACHE``, else ``$XDG_CACHE_HOME/peftbench``, else ``~/.cache/peftbench``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peftbench"


def check_cache_writable(what: str) -> None:
    """One-line ``ConfigError`` unless the cache folder (``cache_root``) is a folder this process
    can write, or can be made: checked before any job runs, as ``results_dir`` is. ``what``:
    what the run would write there."""
    root = cache_root()
    nearest = next(p for p in (root, *root.parents) if os.path.lexists(p))
    why = None
    if not nearest.is_dir():
        why = "exists and is not a folder" if nearest == root else f"cannot be made: {nearest} is not a folder"
    elif not os.access(nearest, os.W_OK | os.X_OK):
        why = "cannot be written" if nearest == root else f"cannot be made: no permission to write in {nearest}"
    if why is not None:
        name = f"{CACHE_ENV}={os.environ[CACHE_ENV]}" if os.environ.get(CACHE_ENV) else f"the cache folder {root}"
        raise ConfigError(f"{name}: {why}; allowed: a folder peftbench can write, for {what} (set {CACHE_ENV})")


def package_file(spec: str, install: Optional[str] = None) -> Path:
    """The file ``pkg://<package>/<relative path>`` names, found without importing the package
    (some model packages import heavy optional dependencies). ConfigError naming the install
    command if the package or the file is missing."""
    package, _, rel = spec[len(PACKAGE_SCHEME) :].partition("/")
    how = f"; install it with: {install}" if install else ""
    try:
        found = importlib.util.find_spec(package) if package else None
    except ImportError:  # a dotted name whose parent package is missing
        found = None
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"model.name_or_path={spec}: the package {package!r} is not installed{how}")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise ConfigError(f"model.name_or_path={spec}: no file {rel} in the installed package {package}{how}")
    return path


def local_path(name_or_path: str, install: Optional[str] = None) -> str:
    """``name_or_path`` with a ``pkg://`` reference replaced by the file's path."""
    if name_or_path.startswith(PACKAGE_SCHEME):
        return str(package_file(name_or_path, install))
    return name_or_path


def is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str) -> str:
    """SHA-256 of a file (hex), computed once per process for an unchanged file."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def gguf_quantization(path: str) -> dict[str, Any]:
    """The GGUF file's declared type (``general.file_type``, e.g. MOSTLY_Q4_1) and how many
    tensors each storage type holds (e.g. Q4_1: 210, F32: 61, Q8_0: 1)."""
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    file_type = None
    if field is not None:
        value = int(field.parts[field.data[0]][0])
        try:
            file_type = gguf.LlamaFileType(value).name
        except ValueError:
            file_type = str(value)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return {"file_type": file_type, "tensor_types": dict(sorted(counts.items()))}


def require_gguf_reader(name_or_path: str, install: Optional[str]) -> None:
    if importlib.util.find_spec("gguf") is None:
        how = install or "pip install gguf"
        raise ConfigError(
            f"model.name_or_path={name_or_path}: reading a GGUF file needs the gguf package; install it with: {how}"
        )


STAMP = "peftbench-weights.json"  # what a cache folder holds, written last
CACHED = "model.safetensors"  # the dequantized weights, whose size and SHA-256 the stamp records


def file_stamp(path: Path) -> dict[str, Any]:
    """What the cache stamp records of a file it holds: size (bytes), modification time (ns)
    and SHA-256."""
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(str(path))}


def cache_damage(folder: Path) -> Optional[str]:
    """Why the GGUF cache folder ``folder`` cannot be trusted, or None: its stamp unreadable, or
    the weights file missing, of another size, or, when its modification time is not the one
    written (something wrote to it since), of another SHA-256 (a stamp without them predates
    the check: rebuilt once). An untouched file is not hashed again: a second of every run."""
    try:
        about = json.loads((folder / STAMP).read_text())
        want = about["files"][CACHED]
        size, sha = int(want["bytes"]), str(want["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{STAMP} is unreadable or records no size and SHA-256 of {CACHED}"
    weights = folder / CACHED
    if not weights.is_file():
        return f"{CACHED} is missing"
    st = weights.stat()
    if st.st_size != size:
        return f"{CACHED} holds {st.st_size:,} bytes, {size:,} were written"
    if want.get("mtime_ns") == st.st_mtime_ns:  # untouched since it was written: hashing can wait
        return None
    if file_sha256(str(weights)) != sha:  # written to since (its time changed): its bytes decide
        return f"the SHA-256 of {CACHED} is not the one written"
    return None


def missing_weights(missing: list[str], model: Any) -> list[str]:
    """The keys of ``missing`` (``from_pretrained``'s ``missing_keys``) that are not tied to a
    weight the file holds: an output embedding tied to the input one is not missing."""
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        out = model.get_output_embeddings()
        tied = {n for n, p in model.named_parameters(remove_duplicate=False) if out is not None and p is out.weight}
    return sorted(k for k in missing if k not in tied)


def refuse_missing(name_or_path: str, missing: list[str], total: int) -> None:
    """One-line ``ConfigError`` when the file lacks weights of the model (``missing``, of
    ``total`` parameters): transformers would fill them with random values."""
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ConfigError(
            f"model.name_or_path={name_or_path}: the file lacks {len(missing)} of the model's {total} weights "
            f"({shown}), which would be random; allowed: a file with every weight of the model"
        )


def gguf_folder(path: str, name_or_path: str, install: Optional[str]) -> Path:
    """The cache folder holding ``path`` dequantized to float32 safetensors, its config and its
    tokenizer; made on first use (atomically: a complete folder appears under its final name),
    and checked on every use (``cache_damage``): a damaged folder is said in one line and made
    again. A file that lacks weights of its model is refused (``refuse_missing``)."""
    require_gguf_reader(name_or_path, install)
    sha = file_sha256(path)
    folder = cache_root() / "gguf" / f"{Path(path).stem}-{sha[:16]}"
    if (folder / STAMP).is_file():
        why = cache_damage(folder)
        if why is None:
            return folder
        print(f"peftbench: the cached weights {folder} are damaged ({why}); dequantizing again", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
    check_cache_writable("the GGUF file is dequantized there once")
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parent, name = Path(path).parent, Path(path).name
    print(f"peftbench: dequantizing {name} once into {folder} (later loads read the cache)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name)
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            parent, gguf_file=name, dtype=torch.float32, output_loading_info=True
        )
        model, info = loaded
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"model.name_or_path={name_or_path}: transformers cannot load this GGUF file "
            f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None
    refuse_missing(name_or_path, missing_weights(list(info.get("missing_keys", [])), model), len(model.state_dict()))
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the cache holds plain float32 weights
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    try:
        type(model.config).from_dict(config).save_pretrained(tmp)
        save_model(model, str(tmp / CACHED))
        tokenizer.save_pretrained(tmp)
        about = {
            "source": str(path),
            "sha256": sha,
            "format": "gguf",
            **gguf_quantization(path),
            "cached_dtype": "float32",
            "files": {CACHED: file_stamp(tmp / CACHED)},
        }
        (tmp / STAMP).write_text(json.dumps(about, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process made it first
            if not (folder / STAMP).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve(name_or_path: str, install: Optional[str] = None) -> str:
    """What ``from_pretrained`` should read for ``name_or_path``: a folder or a hub id."""
    path = local_path(name_or_path, install)
    if is_gguf(path):
        if not Path(path).is_file():
            raise ConfigError(f"model.name_or_path={name_or_path}: no such GGUF file")
        return str(gguf_folder(path, name_or_path, install))
    return path


def provenance(name_or_path: str, install: Optional[str] = None) -> dict[str, Any]:
    """What the base weights are, for the run record: for a GGUF file its path, SHA-256 and
    quantization types (the weights are its dequantized values); for a folder or hub id, where."""
    path = local_path(name_or_path, install)
    if is_gguf(path):
        about = json.loads((Path(resolve(name_or_path, install)) / STAMP).read_text())
        about.pop("files", None)  # the cache's own check, not what the weights are
        return {**about, "dequantized": True}
    kind = "folder" if Path(path).expanduser().is_dir() else "hub"
    return {"source": path, "format": kind, "dequantized": False}
