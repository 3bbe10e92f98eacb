"""Smoke runs of the examples: tiny data, one epoch, every line of the scripts exercised."""

import gzip
import json
import pathlib
import struct
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(script, *args):
    result = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_digits_demo(tmp_path):
    out = run("examples/demo_digits.py", "--epochs", "1", "--json", str(tmp_path / "r.json"))
    assert "exact (inductor)" in out and "backward GEMM FLOPs" in out
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [(r["grad"], r["sketch"]) for r in results] == [
        (None, "-"), ("weight", "norm"), ("both", "norm"), ("both", "uniform")]


def test_fashion_mlp_on_synthetic_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 600), ("t10k", 100)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    out = run("examples/fashion_mlp.py", "--data-dir", str(tmp_path), "--epochs", "1",
              "--mode", "exact", "--mode", "weight:norm:rows", "--json", str(tmp_path / "r.json"))
    assert "weight:norm:rows" in out
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["status"] for r in results] == ["ok", "ok"] and results[1]["flop_ratio"] < 1
