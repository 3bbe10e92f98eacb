"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    namespace: dict = {}
    for block in blocks[1:]:  # the first is the one-line usage, without a model
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["report"].sampled and 0 < namespace["report"].flop_ratio < 1
