"""The README's test command is exactly what CI runs; its main-job command is an owq command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands():
    text = (ROOT / "README.md").read_text()
    assert text.index("```bash") < 20
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].startswith("./scripts/setup.sh && .venv/bin/owq ")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == readme_commands()[1]
    assert "ruff check" in ci[-1] and "ruff format --check" in ci[-1] and "pytest" in ci[-1]
