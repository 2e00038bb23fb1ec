"""CI runs the README's set-up commands: keep .ci/run and the README identical."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme_cmds = re.findall(r"```bash\n(pip install torch[^\n]+)\n```", (ROOT / "README.md").read_text())
    ci = (ROOT / ".ci" / "run").read_text()
    ci_cmds = [line for line in ci.splitlines() if line.startswith("pip install torch")]
    assert len(readme_cmds) == 2, readme_cmds
    assert ci_cmds == readme_cmds
