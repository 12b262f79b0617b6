"""The documentation stays true: every config key and the generated config table are in docs/config.md,
every console command and the CI entry are in the README, and every relative link resolves.

`python tests/test_readme.py` rewrites the generated table in docs/config.md."""

import re
import sys
import tomllib
from pathlib import Path

import pytest

from vmla_train import config as C
from vmla_train.cli import config_reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONFIG_DOC = ROOT / "docs" / "config.md"
BEGIN, END = "<!-- config-reference: begin -->\n", "\n<!-- config-reference: end -->"


def _generated_table(text: str) -> str:
    assert BEGIN in text and END in text, f"{CONFIG_DOC} lost its config-reference markers"
    return text.split(BEGIN, 1)[1].split(END, 1)[0]


@pytest.mark.timeout(30)
def test_every_config_key_is_in_the_config_reference():
    doc = CONFIG_DOC.read_text()
    missing = [key for key, _, _ in C.schema_reference() if f"`{key}`" not in doc]
    assert not missing, f"docs/config.md lacks config keys {missing[:10]}: run `python tests/test_readme.py`"


@pytest.mark.timeout(30)
def test_config_reference_table_is_current():
    assert _generated_table(CONFIG_DOC.read_text()) == config_reference_markdown(), \
        "docs/config.md config table is stale: run `python tests/test_readme.py` (or paste `vmla-train config-reference`)"


@pytest.mark.timeout(30)
def test_every_console_command_is_documented_and_ci_runs_make_test():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in scripts:
        assert re.search(rf"`{re.escape(name)}[ `]", README), f"console command {name} is not in the README"
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make demo" in README and "make test" in README


@pytest.mark.timeout(30)
def test_relative_links_resolve():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
            ROOT / "checkpoints" / "README.md", ROOT / "data_prep" / "README.md"]
    broken = []
    for doc in docs:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, f"broken relative links: {broken}"


if __name__ == "__main__":  # regenerate the table between the markers
    before, rest = CONFIG_DOC.read_text().split(BEGIN, 1)
    C.atomic_write_text(CONFIG_DOC, before + BEGIN + config_reference_markdown() + END + rest.split(END, 1)[1])
    print(f"wrote {CONFIG_DOC}")
    sys.exit(0)
