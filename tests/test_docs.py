"""The Python examples of docs/python-api.md run as written (one script, in order, in a fresh directory)."""
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.usefixtures("single_thread")
def test_python_api_examples_run(tmp_path, monkeypatch):
    blocks = _python_blocks(DOC.read_text())
    assert len(blocks) >= 5  # a block whose fence is mistyped would silently drop out of this test
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"{DOC.name}, block {number}", "exec"), namespace)
    assert (tmp_path / "runs" / "api-example" / "curves.png").is_file()
