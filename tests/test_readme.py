"""The README's Python examples run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.cost_rule  # as a user runs them: the examples' sizes pay on a CPU
def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snapshot example writes its file
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    namespace: dict = {}
    for block in blocks[1:]:  # the first is the one-line usage, without a model
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["report"].sampled and 0 < namespace["report"].flop_ratio < 1
    assert (tmp_path / "tests" / "snapshots" / "model_backward.txt").read_text().startswith("# backward graph 0")
