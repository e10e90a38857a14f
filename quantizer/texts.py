"""Text sources for calibration and evaluation: the built-in Austen corpus or a user's file."""

from __future__ import annotations

from pathlib import Path

from owq.builtin import corpus as austen


def _read_file(spec: str) -> str:
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"text file {spec} does not exist")
    return path.read_text(encoding="utf-8")


def eval_text(spec: str = "persuasion") -> str:
    """`persuasion` (the held-out novel) or a path to a UTF-8 text file."""
    return austen.heldout_text() if spec == "persuasion" else _read_file(spec)


def calibration_text(spec: str = "austen") -> str:
    """`austen` (the five training novels) or a path to a UTF-8 text file."""
    return austen.calibration_text() if spec == "austen" else _read_file(spec)
