"""What the README and every page of docs/ name still exists and still parses.

Each `make` target named is a target of the Makefile, each file named is in the checkout,
each link to a page resolves, each Python snippet compiles, each JSON snippet parses, the
README's keys.json recipes load as keys.json, and the errors table names every code the
gateway can answer. (tests/deploy/test_readme.py runs the README's first steps for real.)
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from proxy.app import load_keys
from proxy.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NAMED_FILES = r"`((?:examples|e2e|bench|deploy|docs|tests|proxy)/[\w./-]*\w)`"


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def blocks(language: str, text: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_make_target_named_exists(page: Path) -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.MULTILINE))
    named = set(
        re.findall(r"(?:`|^)make (?:-\w+ )*([a-z][\w-]*\w)(?![\w*-])", page.read_text(), re.M)
    )
    assert named <= targets, f"{page_id(page)} names {sorted(named - targets)}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_file_and_page_named_exists(page: Path) -> None:
    text = page.read_text()
    missing = [path for path in re.findall(NAMED_FILES, text) if not (ROOT / path).exists()]
    for link in re.findall(r"\]\(([^)#:]+)(?:#[\w-]*)?\)", text):
        if not (page.parent / link).exists():
            missing.append(link)
    assert not missing, f"{page_id(page)} names {missing}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_python_snippet_compiles_and_every_json_snippet_parses(page: Path) -> None:
    text = page.read_text()
    for snippet in blocks("python", text):
        compile(snippet, page_id(page), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    for snippet in blocks("json", text):
        # A recipe is one entry of "virtual_keys": made an object, it must parse as one.
        fragment = snippet.strip()
        json.loads(fragment if fragment.startswith("{") else "{" + fragment + "}")


def test_the_readme_recipes_load_as_keys_json(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    recipes = [block for block in blocks("json", readme) if block.lstrip().startswith('"vk_')]
    assert len(recipes) == 4, "the README shows four keys.json recipes"
    entries: dict[str, object] = {}
    for recipe in recipes:
        entries.update(json.loads("{" + recipe + "}"))
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"virtual_keys": entries}))
    named = set(re.findall(r'"api_key_env": "(\w+)"', "".join(recipes)))
    environ = {name: f"real-{name.lower()}" for name in named}
    ring = load_keys(Settings(keys_file_path=str(path)), environ)
    assert len(ring) == len(entries)


def codes_in_the_code() -> set[str]:
    codes: set[str] = set()
    for source in (ROOT / "proxy").rglob("*.py"):
        text = source.read_text()
        codes |= set(re.findall(r'GatewayError\(\s*(?:\d{3}|\w+),\s*"(\w+)"', text))
        for pair in re.findall(r'\bcode = "(\w+)" if .*? else "(\w+)"', text):
            codes |= set(pair)
    return codes


def test_the_errors_table_names_every_code_the_gateway_answers() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Errors") :]
    table = table[: table.index("\n## ")]
    cells = re.findall(r"^\| [\dx/]+ \| ((?:`\w+`(?:, )?)+) \|", table, re.MULTILINE)
    listed = {code for cell in cells for code in re.findall(r"`(\w+)`", cell)}
    codes = codes_in_the_code()
    assert {"model_not_routed", "cors_not_allowed", "invalid_api_key"} <= codes  # the scan works
    assert codes - listed == set(), f"the README's errors table lacks {sorted(codes - listed)}"
    assert listed - codes == set(), (
        f"the README lists codes the gateway never sends: {listed - codes}"
    )
