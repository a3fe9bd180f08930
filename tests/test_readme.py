"""The README's API example runs as written (keeps the README true)."""

import pathlib
import re


def test_readme_api_example_runs():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## The kernels in ten lines\n\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["ev"].advantages.shape == (2, 16)
    assert scope["out"].loss.requires_grad
