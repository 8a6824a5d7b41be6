"""Which versions of each model serve: Triton's version policies, parsed once from the settings."""

from __future__ import annotations

import re
from typing import Callable

VersionPolicy = Callable[[str, list[int]], list[int]]


def parse_version_policy(policy: str) -> VersionPolicy:
    """Triton-style policies: 'latest', 'latest:N', 'all', 'specific:1,3' (every model) or
    'specific:NAME=1,2;OTHER=3' (per model; a part without NAME= is the default for the others, and
    a model named nowhere gets its latest version). Raises ValueError naming what is wrong."""
    policy = policy.strip()
    if policy == "all":
        return lambda _n, versions: versions
    match = re.fullmatch(r"latest(?::([1-9][0-9]*))?", policy)
    if match:
        n = int(match.group(1) or 1)
        return lambda _n, versions: versions[-n:]
    if policy.startswith("specific:"):
        wanted: dict[str, set[int]] = {}
        default: set[int] | None = None
        for part in filter(None, (p.strip() for p in policy[len("specific:"):].split(";"))):
            name, equals, nums = part.rpartition("=")
            if not re.fullmatch(r"[0-9]+(\s*,\s*[0-9]+)*", nums.strip()) or (equals and not name.strip()):
                raise ValueError(f"version policy {policy!r}: {part!r} is not a list of version numbers "
                                 f"(specific:1,3 or specific:NAME=1,2;OTHER=3)")
            versions = {int(v) for v in nums.split(",")}
            if equals:
                wanted[name.strip()] = versions
            else:
                default = versions
        if not wanted and default is None:
            raise ValueError(f"version policy {policy!r} names no versions; e.g. specific:1,3")

        def choose(name: str, versions: list[int]) -> list[int]:
            keep = wanted.get(name, default)
            return versions[-1:] if keep is None else [v for v in versions if v in keep]

        return choose
    raise ValueError(f"unknown version policy {policy!r}; use latest, latest:N, all, specific:1,3 "
                     f"or specific:NAME=1,2;OTHER=3")
