"""The documentation's code runs: every ```python block of a page, in order, as one script.

Each page runs in a fresh interpreter (a tutorial registers its own environments; they must not leak into
other tests). A block that starts with ``# skip-test`` is shown to readers but not run (for example one
that needs a GPU or the network).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "```python" in p.read_text())]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def page_script(page: Path) -> str:
    """The runnable python blocks of a page, joined into one script."""
    blocks = [b for b in BLOCK.findall(page.read_text()) if not b.startswith("# skip-test")]
    return "\n".join(blocks)


def test_docs_have_pages_with_code() -> None:
    assert PAGES, f"no page with python code under {DOCS}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_code_runs(page: Path, tmp_path: Path) -> None:
    script = tmp_path / "page.py"
    script.write_text(page_script(page))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{page.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


CARDS_MARK = "<!-- Task cards below: generated from the task modules' docstrings by tests/test_docs.py -->\n"


def task_cards() -> str:
    """Every built-in task's card (its module docstring, headings one level down), modules in alphabetical order."""
    import llm_gym.tasks

    sections = []
    for name in llm_gym.tasks.__all__:
        module = importlib.import_module(f"llm_gym.tasks.{name}")
        # A task package (tictactoe/) keeps its card in its env module.
        card = importlib.import_module(f"{module.__name__}.env") if hasattr(module, "__path__") else module
        env_id = module.TASK.env_id if hasattr(module, "TASK") else module.ENV_ID
        title, _, body = card.__doc__.strip().partition("\n")
        body = re.sub(r"^## ", "### ", body.strip(), flags=re.M)
        sections.append(f"## `{env_id}`\n\n{title}\n\n{body}\n")
    return "\n".join(sections)


def test_tasks_page_shows_every_task_card() -> None:
    page = DOCS / "tasks.md"
    top = page.read_text().split(CARDS_MARK)[0]
    expected = top + CARDS_MARK + "\n" + task_cards()
    if os.environ.get("LLM_GYM_UPDATE_DOCS"):
        page.write_text(expected)
    assert page.read_text() == expected, (
        "docs/tasks.md does not show the current task cards: run LLM_GYM_UPDATE_DOCS=1 pytest tests/test_docs.py -k tasks_page"
    )
