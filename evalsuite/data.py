"""Documents for a task: from the Hugging Face Hub by default, or local files.

`--data PATH` is a JSON, JSONL, Parquet or CSV file in the public dataset's schema
(the evaluated split), or a directory holding one file per split, named after the
split (`test.jsonl`, `train.jsonl`, `dev.parquet`, `test-00000-of-00001.parquet`,
...). `--fewshot-data PATH` names the few-shot pool explicitly. Everything goes
through `datasets`, which reads local files offline; only a hub dataset asked for
by name touches the network, and when the hub cannot be reached one line says so
and shows the `--data` alternative.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from evalsuite.tasks.base import Task
from server.errors import InvalidRequest, Unavailable
from server.extras import require

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataUnavailable(Unavailable):
    code = "dataset_unavailable"


@dataclass
class DataSet:
    docs: list[dict]
    fewshot: list[dict] | None
    origin: str  # where the documents came from, for people
    fingerprint: str  # identifies the content, for resuming
    fewshot_origin: str | None = None  # where the few-shot pool came from


@dataclass
class DataOptions:
    data: Path | None = None
    fewshot_data: Path | None = None
    dataset: str | None = None  # hub id overriding the task's source
    subset: str | None = None  # hub config overriding the task's source
    split: str | None = None  # evaluated split overriding the task's source


def load(task: Task, opts: DataOptions) -> DataSet:
    src = task.source
    split = opts.split or src.split
    want_fewshot = task.needs_fewshot_pool()
    if opts.data is not None:
        docs, origin, fp = _local(opts.data, split, task, role="data")
        fewshot, fewshot_origin = None, None
        if want_fewshot:
            fewshot, fewshot_origin = _local_fewshot(opts, task)
        elif opts.fewshot_data is not None:
            fewshot = _read(opts.fewshot_data, task, "fewshot-data", check=False)
            fewshot_origin = str(opts.fewshot_data)
        fp_fewshot = _digest(json.dumps(fewshot, sort_keys=True, default=str)) if fewshot else ""
        return DataSet(docs, fewshot, origin, _digest(fp + fp_fewshot), fewshot_origin)
    path, name = opts.dataset or src.path, opts.subset if opts.subset is not None else src.name
    docs, fp = _hub(path, name, split, task)
    fewshot, fewshot_origin = None, None
    label = f"{path}" + (f" ({name})" if name else "")
    if want_fewshot:
        if opts.fewshot_data is not None:
            fewshot = _read(opts.fewshot_data, task, "fewshot-data", check=False)
            fewshot_origin = str(opts.fewshot_data)
        else:
            fewshot, fp2 = _hub(path, name, src.fewshot_split, task)
            fp += fp2
            fewshot_origin = f"{label} [{src.fewshot_split}]"
    return DataSet(docs, fewshot, f"{label} [{split}]", _digest(fp), fewshot_origin)


# --- local files -----------------------------------------------------------------

def _split_file(directory: Path, split: str, subset: str | None = None) -> Path | None:
    found = sorted(p for p in directory.rglob("*") if p.suffix.lower() in BUILDERS
                   and (p.stem == split or p.stem.startswith((f"{split}-", f"{split}_"))))
    if subset:
        found = [p for p in found if subset in p.relative_to(directory).parts[:-1]] or found
    return found[0] if found else None


def _local(path: Path, split: str, task: Task, role: str) -> tuple[list[dict], str, str]:
    path = Path(path)
    if not path.exists():
        raise InvalidRequest(f"--{role} {path}: no such file or directory", param=role)
    if path.is_dir():
        file = _split_file(path, split)
        if file is None:
            files = [p for p in path.rglob("*") if p.suffix.lower() in BUILDERS]
            if len(files) != 1:
                raise InvalidRequest(f"--{role} {path}: no {split}.jsonl/.json/.parquet/.csv "
                                     f"file for the {split!r} split", param=role)
            file = files[0]
    else:
        file = path
    docs = _read(file, task, role)
    return docs, str(file), _file_digest(file)


def _local_fewshot(opts: DataOptions, task: Task) -> tuple[list[dict], str]:
    """The few-shot pool and the file it came from."""
    fs_split = task.source.fewshot_split
    if opts.fewshot_data is not None:
        target = Path(opts.fewshot_data)
        if target.is_dir():
            file = _split_file(target, fs_split)
            if file is None:
                raise InvalidRequest(f"--fewshot-data {target}: no {fs_split}.* file",
                                     param="fewshot_data")
            target = file
        return _read(target, task, "fewshot-data", check=False), str(target)
    if Path(opts.data).is_dir():
        file = _split_file(Path(opts.data), fs_split)
        if file is not None:
            return _read(file, task, "data", check=False), str(file)
    raise InvalidRequest(
        f"{task.name} {task.num_fewshot}-shot takes its examples from the {fs_split!r} split: "
        f"pass --fewshot-data FILE, a --data directory with a {fs_split}.* file, "
        "or --num-fewshot 0", param="fewshot_data")


def _datasets():
    """`datasets`, without its progress bars and info logs (the CLI has its own)."""
    datasets = require("datasets", "eval", "loading evaluation data")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _read(file: Path, task: Task, role: str, check: bool = True) -> list[dict]:
    builder = BUILDERS.get(Path(file).suffix.lower())
    if builder is None:
        raise InvalidRequest(f"--{role} {file}: unsupported file type (use .json, .jsonl, "
                             ".parquet or .csv)", param=role)
    datasets = _datasets()

    try:
        ds = datasets.load_dataset(builder, data_files=str(file), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InvalidRequest(f"--{role} {file}: cannot read it as {builder}: {first}",
                             param=role) from None
    docs = ds.to_list()
    if builder == "csv":
        docs = _normalise(docs, task)
    _check_columns(docs, list(ds.column_names), task, str(file), check)
    return docs


def _file_digest(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- the hub -----------------------------------------------------------------------

def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_offline(source: str) -> bool:
    """True when `source` names a hub repo (not a local directory) and the hub cannot be
    reached: loaders should then use the local cache only, instead of retrying."""
    if Path(source).expanduser().exists():
        return False
    return _offline_env() or not _hub_reachable()


def _offline_env() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _unavailable(path: str, name: str | None, task: Task, why: str) -> DataUnavailable:
    cols = ", ".join(task.source.columns)
    label = path + (f" ({name})" if name else "")
    return DataUnavailable(
        f"cannot load {label} from the Hugging Face Hub ({why}); evaluate local files "
        f"instead: --data PATH (a .jsonl/.json/.parquet/.csv file or a directory of split "
        f"files with columns {cols})")


def _hub(path: str, name: str | None, split: str, task: Task) -> tuple[list[dict], str]:
    # Probe first: offline, `datasets` retries for ~25 s before failing.
    if not _offline_env() and not _hub_reachable():
        raise _unavailable(path, name, task, "the hub is not reachable")
    datasets = _datasets()

    try:
        ds = datasets.load_dataset(path, name, split=split)
    except (ConnectionError, OSError) as exc:
        raise _unavailable(path, name, task, str(exc).splitlines()[0][:120]) from None
    except ValueError as exc:  # unknown split or config
        raise InvalidRequest(f"{path}: {str(exc).splitlines()[0][:200]}") from None
    docs = ds.to_list()
    _check_columns(docs, list(ds.column_names), task, path, True)
    return docs, f"hub:{path}:{name}:{split}:{getattr(ds, '_fingerprint', '')}"


# --- shared --------------------------------------------------------------------------

def _normalise(docs: list[dict], task: Task) -> list[dict]:
    """CSV cells hold lists and dicts as text; turn them back into values."""
    for doc in docs:
        for key, value in doc.items():
            if isinstance(value, str) and value[:1] in "[{" and value[-1:] in "]}":
                try:
                    doc[key] = json.loads(value)
                except ValueError:
                    try:
                        doc[key] = ast.literal_eval(value)
                    except (ValueError, SyntaxError):
                        pass
    return docs


def _check_columns(docs: list[dict], columns: list[str], task: Task, where: str,
                   check: bool) -> None:
    missing = [c for c in task.source.columns if c not in columns]
    if missing and check:
        raise InvalidRequest(
            f"{where}: missing column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(c) for c in missing)}; {task.name} needs "
            f"{', '.join(task.source.columns)} (the {task.source.path} schema)", param="data")
    if not docs and check:
        raise InvalidRequest(f"{where}: no documents", param="data")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
