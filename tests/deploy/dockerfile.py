"""Read the runtime stage of the Dockerfile: its environment, start command and health check, so that a
test can run exactly what the container runs, outside Docker."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stage:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    user: str | None = None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def parse_stages(path: Path) -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in _logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            name = parts[parts.index("AS") + 1] if "AS" in parts else str(len(stages))
            stage = stages[name] = Stage(name)
            continue
        if stage is None:
            continue
        stage.instructions.append((keyword, args))
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                stage.env[key] = value
        elif keyword == "CMD":
            stage.cmd = _exec_form(args)
        elif keyword == "USER":
            stage.user = args.strip()
        elif keyword == "HEALTHCHECK":
            _, _, command = args.partition(" CMD ")
            stage.healthcheck = _exec_form(command.strip())
    return stages
