"""``pararl sample`` turns a model folder and a prompt into files a user can look at."""
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from pararl.cli import main
from tests.tiny import tiny_bundle


def test_bundle_round_trip(tmp_path):
    folder, bundle = tiny_bundle(tmp_path)
    ids = bundle.encode_text("add a red square top left")
    assert len(ids) == 6 and all(i >= 8 for i in ids)
    assert bundle.decode_text(torch.tensor([bundle.fmt.mask_id, *ids, bundle.fmt.mask_id])) == "add a red square top left"
    images = torch.rand(2, 3, 32, 32)
    codes = bundle.image_tokenizer.encode(images)
    assert torch.equal(bundle.image_tokenizer.encode(bundle.image_tokenizer.decode(codes)), codes)


def test_sample_command_writes_image_text_and_snapshots(tmp_path):
    folder, bundle = tiny_bundle(tmp_path)
    png = tmp_path / "input.png"
    rgb = (bundle.image_tokenizer.decode(torch.arange(16)[None] % 8)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(rgb).save(png)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pararl.cli", "sample", "--model", str(folder), "--prompt", "make the circle blue",
           "--image", str(png), "--out", str(out), "steps=8", "text_len=8", "cfg_image=2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Image.open(out / "image.png").size[0] >= 32
    text = (out / "text.txt").read_text().strip()
    assert text and "<mask>" not in text
    grid = Image.open(out / "snapshots.png")
    assert grid.size[0] > 6 * 128  # six snapshot columns


def test_sample_command_refuses_bad_input(tmp_path, capsys):
    folder, _ = tiny_bundle(tmp_path)
    out = str(tmp_path / "out")
    small = ["steps=8", "text_len=8"]
    assert main(["sample", "--model", str(folder), "--prompt", " ", "--out", out, *small]) == 2
    assert "empty prompt" in capsys.readouterr().err
    png = tmp_path / "small.png"
    Image.new("RGB", (20, 20)).save(png)
    assert main(["sample", "--model", str(folder), "--prompt", "add a red square", "--image", str(png), "--out", out, *small]) == 2
    assert "small.png is 20x20; the image tokenizer needs 32x32" in capsys.readouterr().err
    assert main(["sample", "--model", str(folder), "--prompt", "add", "--out", out, "stpes=4"]) == 2
    assert "unknown config key 'sampler.stpes' (did you mean 'steps'?)" in capsys.readouterr().err
    assert main(["sample", "--model", str(folder), "--prompt", "add", "--out", out, "steps=32"]) == 2
    assert "more steps than tokens allow" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path / "missing"), "--prompt", "add", "--out", out, *small]) == 2
    assert "does not exist" in capsys.readouterr().err
