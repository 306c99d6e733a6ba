"""EXERCISES.md stays true to the code: every command it prints parses with the script's own argument parser, and
every `# EXERCISE:` tag it names stands in the code, at one place.

Run: python -m pytest -q tests/test_exercises.py
"""
import re
import shlex
from pathlib import Path

import evaluate
import train_ocl
import train_vae

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "EXERCISES.md").read_text()
PARSERS = {"train_vae.py": train_vae.parse_args, "train_ocl.py": train_ocl.parse_args, "evaluate.py": evaluate.parse_args}


def commands():
    """Every `python <script> ...` line of EXERCISES.md's code blocks."""
    blocks = re.findall(r"```\n(.*?)```", TEXT, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("python ")]


def test_there_are_eight_to_twelve_exercises_each_with_its_parts():
    sections = re.split(r"\n## \d+\. ", TEXT)[1:]
    assert 8 <= len(sections) <= 12
    for section in sections:
        for part in ("**Question.**", "**Where.**", "**Run**", "**Look at.**", "**What we measured.**"):
            assert part in section, (section.splitlines()[0], part)
        assert "MEASURED_" not in section, section.splitlines()[0]  # every measurement filled in


def test_every_command_parses():
    found = commands()
    assert len(found) >= 10
    for line in found:
        script, *argv = shlex.split(line)[1:]
        PARSERS[script](argv)  # raises SystemExit on a flag that does not exist or a bad value


def test_every_tag_named_exists_once_in_the_code():
    tags = set(re.findall(r"`# EXERCISE: ([\w-]+)`", TEXT))
    assert len(tags) >= 8
    code = {p.name: p.read_text() for p in ROOT.glob("*.py")}
    for tag in tags:
        places = [name for name, text in code.items() for line in text.splitlines()
                  if re.search(rf"# EXERCISE: {re.escape(tag)}\b", line)]
        assert len(places) == 1, (tag, places)
