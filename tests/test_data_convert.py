"""``pararl convert-data``: Hugging Face datasets' on-disk layouts (a save_to_disk folder of Arrow
streams, a Hub repository's Parquet files) become our records, input images PNGs of the right size."""
import io
import json

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from PIL import Image

from pararl.cli import main
from pararl.data import load_image, read_records


def png(colour, size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def test_a_save_to_disk_folder_with_datasets_image_column(tmp_path, capsys):
    src = tmp_path / "hf"
    src.mkdir()
    table = pa.table({"instruction": ["make the square red", "add a blue circle"],
                      "source": pa.array([{"bytes": png("green"), "path": None}, {"bytes": None, "path": "b.png"}], IMAGE),
                      "ref": ["red", None]})
    (src / "b.png").write_bytes(png("blue", (8, 8)))
    with ipc.new_stream(str(src / "data-00000-of-00001.arrow"), table.schema) as writer:  # what save_to_disk writes
        writer.write_table(table)
    (src / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    assert main(["convert-data", str(src), "--out", str(tmp_path / "out"), "--prompt-field", "instruction",
                 "--image-field", "source", "--answer-field", "ref", "--size", "16", "16"]) == 0
    records = read_records(tmp_path / "out" / "records.jsonl")
    assert [(r.prompt, r.task, r.answer) for r in records] == [("make the square red", "edit", "red"),
                                                                ("add a blue circle", "edit", None)]
    first = load_image(records[0].input_image, (16, 16))  # resized to the tokenizer's size
    assert first.shape == (3, 16, 16) and abs(float(first[1].mean()) - 128 / 255) < 0.01  # PIL's "green" is (0, 128, 0)
    assert load_image(records[1].input_image, (16, 16))[2].mean() > 0.99


def test_parquet_files_text_only_and_bad_rows(tmp_path, capsys):
    src = tmp_path / "repo" / "data"
    src.mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["how many red shapes", "what colour is the circle"], "kind": ["reason", "reason"],
                             "answer": ["two", "blue"]}), src / "test-00000.parquet")
    assert main(["convert-data", str(tmp_path / "repo"), "--out", str(tmp_path / "out"), "--task-field", "kind",
                 "--answer-field", "answer"]) == 0
    records = read_records(tmp_path / "out" / "records.jsonl")
    assert [(r.task, r.answer, r.input_image) for r in records] == [("reason", "two", None), ("reason", "blue", None)]
    pq.write_table(pa.table({"prompt": ["ok", ""]}), src / "test-00000.parquet")
    capsys.readouterr()
    assert main(["convert-data", str(tmp_path / "repo"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "row 1 has no 'prompt' text" in err
