"""The README's promises: its Python examples run, the quickstart has exactly two commands,
and CI runs the second one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_example_runs(index):
    code = _python_blocks()[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme_example"})


def test_quickstart_is_two_commands_and_ci_runs_the_test_one_first():
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines() if line.split("#")[0].strip()]
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text()
    ci_commands = [l.strip() for l in ci.splitlines() if l.strip() and not l.startswith("#") and not l.startswith("set ") and not l.startswith("cd ")]
    assert ci_commands[0] == commands[1], ci_commands
    # anything after it runs more of the test suite (the Triton-backend pass), nothing else
    assert all(" -m pytest " in c for c in ci_commands[1:]), ci_commands
