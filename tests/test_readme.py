"""The README's two set-up commands are the ones CI runs and the ones a fresh machine needs."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    cmds = [line.strip() for b in blocks for line in b.splitlines() if line.strip() and not line.startswith("#")]
    return cmds


def test_readme_has_exactly_two_setup_commands_main_job_and_tests():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    main, tests = cmds
    assert main.endswith("mixsd-edit"), main
    assert tests.endswith("python -m pytest -q"), tests
    for c in cmds:  # the CPU wheel pin keeps the multi-GB CUDA build out of CI
        assert "pip install torch==" in c, c


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    _, tests = _readme_commands()
    assert tests in [line.strip() for line in ci if not line.lstrip().startswith("#")]


def test_every_extra_the_tests_import_is_declared():
    setup = (REPO / "setup.py").read_text()
    test_extra = re.search(r'"test":\s*\[(.*?)\]', setup).group(1)
    for pkg in ("pytest", "scikit-learn", "matplotlib"):
        assert f'"{pkg}"' in test_extra, pkg
