"""Datasets in the Hugging Face layout, turned into our JSONL records (``pararl convert-data``).

Two layouts are read, both Arrow, with pyarrow (the library ``datasets`` itself stores them with):
a folder written by ``Dataset.save_to_disk`` (``data-*.arrow`` stream files beside ``state.json``)
and the Parquet files a dataset repository on the Hub holds (``data/*.parquet``). Fields are named
on the command line; an image column in ``datasets``' encoding (``{bytes, path}``) or a plain path
becomes a PNG in the output folder, resized to the image tokenizer's size when one is given.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator, Optional

from pararl.errors import DataError
from pararl.files import atomic_write
from pararl.tasks import TASKS


def arrow_rows(source: Path) -> Iterator[dict[str, Any]]:
    """Rows of every Arrow stream or Parquet file under ``source`` (a file or a folder), in name order."""
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.suffix in (".arrow", ".parquet"))
    if not files:
        raise DataError(f"{source}: no .arrow or .parquet files (a `save_to_disk` folder or a Hub dataset's data/)")
    for f in files:
        if f.suffix == ".parquet":
            table = pq.read_table(f)
        else:
            with open(f, "rb") as stream:
                try:
                    table = ipc.open_stream(stream).read_all()
                except Exception:  # noqa: BLE001 -- not a stream: the Arrow file format then
                    table = ipc.open_file(f).read_all()
        yield from table.to_pylist()


def _image(value: Any, root: Path, out: Path, size: Optional[tuple[int, int]]) -> str:
    from PIL import Image

    if isinstance(value, dict):  # datasets' Image feature: {bytes, path}
        data, path = value.get("bytes"), value.get("path")
        img = Image.open(io.BytesIO(data)) if data else Image.open(root / path if path else "")
    elif isinstance(value, (bytes, bytearray)):
        img = Image.open(io.BytesIO(value))
    else:
        img = Image.open(root / str(value))
    img = img.convert("RGB")
    if size and (img.height, img.width) != tuple(size):
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return f"{out.parent.name}/{out.name}"  # relative to records.jsonl, which sits beside the folder


def convert(source: str | Path, out: str | Path, prompt: str = "prompt", image: Optional[str] = None,
            answer: Optional[str] = None, task: Optional[str] = None, task_field: Optional[str] = None,
            size: Optional[tuple[int, int]] = None) -> Path:
    """``out/records.jsonl`` (input images in ``out/images/``); the task is ``task``, or the row's
    ``task_field``, or edit where the row has an input image and generate where it has none."""
    source, out = Path(source), Path(out)
    if not source.exists():
        raise FileNotFoundError(f"dataset {source} does not exist")
    if task is not None:
        TASKS.check(task, "--task")
    lines = []
    for n, row in enumerate(arrow_rows(source)):
        text = row.get(prompt)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{source}: row {n} has no {prompt!r} text (fields: {', '.join(row)})")
        record: dict[str, Any] = {"prompt": text}
        picture = row.get(image) if image else None
        if picture is not None:
            record["input_image"] = _image(picture, source if source.is_dir() else source.parent,
                                           out / "images" / f"{n:06d}.png", size)
        record["task"] = task or (row.get(task_field) if task_field else None) or ("edit" if picture is not None else "generate")
        if answer and row.get(answer) is not None:
            record["answer"] = str(row[answer])
        lines.append(json.dumps(record))
    path = atomic_write(out / "records.jsonl", "\n".join(lines) + "\n")
    from pararl.data import read_records

    read_records(path)  # what was written reads back as records (tasks and images checked)
    return path
