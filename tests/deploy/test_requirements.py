"""`make run` installs requirements.txt only: the gateway must start on exactly that.

Building a fresh venv takes minutes, so the check works from the installed metadata: the
distributions requirements.txt pulls in (with their dependencies and the extras they ask
for) may be imported, any other (pytest's, the SDKs', `packaging` that google-auth only
needs through an extra) is hidden from a gateway process that checks a keys file and
imports every module of proxy/. An import that a fresh `make run` would miss fails here.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]

# Loaded into a gateway process before anything else: refuse imports of other distributions.
BLOCKER = """
import importlib.abc, sys
ALLOWED = set(sys.argv.pop(1).split(","))
OWNERS = {owner_map}

class Hidden(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        owners = OWNERS.get(top)
        if owners and not owners & ALLOWED:
            raise ModuleNotFoundError(f"No module named {{top!r}} (not in requirements.txt)")
        return None

sys.meta_path.insert(0, Hidden())
import pkgutil, importlib
import proxy
for module in pkgutil.walk_packages(proxy.__path__, "proxy."):
    importlib.import_module(module.name)
sys.argv[0] = "gateway.py"
import runpy
runpy.run_path("gateway.py", run_name="__main__")
"""


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution these requirements install, extras followed."""
    seen: set[str] = set()
    pending = [(requirement, frozenset(requirement.extras)) for requirement in requirements]
    while pending:
        requirement, extras = pending.pop()
        name = normal(requirement.name)
        if name in seen and not extras:
            continue
        seen.add(name)
        for text in importlib.metadata.requires(requirement.name) or []:
            child = Requirement(text)
            marker = child.marker
            wanted = marker is None or any(
                marker.evaluate({"extra": extra}) for extra in (extras or {""})
            )
            if wanted:
                pending.append((child, frozenset(child.extras)))
    return seen


def test_the_gateway_starts_on_requirements_txt_alone(tmp_path: Path) -> None:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    requirements = [
        Requirement(line) for line in lines if line.strip() and not line.startswith("#")
    ]
    allowed = closure(requirements)
    owners: dict[str, set[str]] = {}
    for top, distributions in importlib.metadata.packages_distributions().items():
        owners[top] = {normal(d) for d in distributions}
    assert "pytest" in owners and "pytest" not in allowed  # the blocker has something to hide
    keys = tmp_path / "keys.json"
    keys.write_text(
        '{"virtual_keys": {"vk_requirements_check_0123456789": '
        '{"provider": "openai", "api_key": "sk-x"}}}'
    )
    script = BLOCKER.format(owner_map=repr(owners))
    result = subprocess.run(
        [sys.executable, "-c", script, ",".join(sorted(allowed)), "--check", str(keys)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "would start" in result.stdout
