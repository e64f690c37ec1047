"""This runtime installs beside the OpenAI Agents SDK, whose import name is ``agents`` too.

The repository's ``agents/`` and ``schemas/`` folders are installed as ``orchestrator.agents`` and
``orchestrator.schemas`` (through the symlinks in ``orchestrator/``): the distribution's only
top-level import name is ``orchestrator``. The probe runs in a fresh interpreter in isolated mode
(``-I``: no PYTHONPATH, no script or working directory on ``sys.path``) started in an empty
directory, so it sees what a user who installed the distribution sees, not the repository folders.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

DISTRIBUTION = "durable-agents-runtime"
REPOSITORY = Path(__file__).resolve().parent.parent
NOT_OURS = ("agents", "schemas", "examples")

PROBE = """
import importlib.metadata, importlib.util, json, sys

import orchestrator
import orchestrator.agents.support
import orchestrator.schemas

before = getattr(sys.modules.get("agents"), "__file__", None)
import agents

ours = importlib.metadata.distribution(sys.argv[1])
owners = importlib.metadata.packages_distributions()
specs = {name: importlib.util.find_spec(name) for name in sys.argv[2:]}
print(json.dumps({
    "agents": {
        "file": agents.__file__,
        "Agent": hasattr(agents, "Agent"),
        "Runner": hasattr(agents, "Runner"),
        "owners": owners.get("agents", []),
        "before": before,
    },
    "orchestrator": orchestrator.__file__,
    "support": orchestrator.agents.support.__file__,
    "schemas": orchestrator.schemas.__name__,
    "top level": (ours.read_text("top_level.txt") or "").split(),
    "files": [str(path) for path in ours.files or []],
    "console scripts": {
        entry.name: entry.value for entry in ours.entry_points if entry.group == "console_scripts"
    },
    "owners": {name: owners.get(name, []) for name in sys.argv[2:]},
    "origins": {name: spec and spec.origin for name, spec in specs.items()},
}))
"""


def probe(tmp_path: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-I", "-c", PROBE, DISTRIBUTION, *NOT_OURS],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def from_repository(path: str | None) -> bool:
    """Whether ``path`` is one of the repository's package folders (symlinks resolved).

    Not merely inside the repository: the virtual environment may be there too.
    """
    folders = [REPOSITORY / name for name in ("orchestrator", *NOT_OURS)]
    return path is not None and any(Path(path).resolve().is_relative_to(f) for f in folders)


def test_agents_sdk_and_runtime_coexist(tmp_path: Path) -> None:
    seen = probe(tmp_path)

    sdk = seen["agents"]
    assert sdk["Agent"] and sdk["Runner"], sdk
    assert sdk["owners"] == ["openai-agents"], sdk
    assert not from_repository(sdk["file"]), sdk
    # Importing the runtime and its example agents put no other `agents` in sys.modules.
    assert sdk["before"] in (None, sdk["file"]), sdk

    assert Path(seen["support"]).parent.name == "agents"
    assert Path(seen["support"]).parent.parent == Path(seen["orchestrator"]).parent
    assert seen["schemas"] == "orchestrator.schemas"
    assert seen["console scripts"] == {"orchestrator": "orchestrator.cli.main:main"}

    # Our distribution's only top-level import name is orchestrator.
    assert seen["top level"] == ["orchestrator"]
    installed = {Path(file).parts[0] for file in seen["files"]}
    assert not installed & set(NOT_OURS), seen["files"]
    for name in NOT_OURS:
        assert DISTRIBUTION not in seen["owners"][name], (name, seen["owners"])
        assert not from_repository(seen["origins"][name]), (name, seen["origins"])
