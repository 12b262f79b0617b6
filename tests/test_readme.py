"""The README stays true: every config key, every console command and the CI entry are documented."""

import re
import tomllib
from pathlib import Path

import pytest

from vmla_train import config as C
from vmla_train.cli import config_reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.timeout(30)
def test_every_config_key_is_in_the_readme_reference():
    missing = [key for key, _, _ in C.schema_reference() if f"`{key}`" not in README]
    assert not missing, f"README lacks config keys {missing[:10]}: paste `vmla-train config-reference` output"


@pytest.mark.timeout(30)
def test_readme_reference_table_is_current():
    assert config_reference_markdown() in README, "README config table is stale: regenerate with `vmla-train config-reference`"


@pytest.mark.timeout(30)
def test_every_console_command_is_documented_and_ci_runs_make_test():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in scripts:
        assert re.search(rf"`{re.escape(name)}[ `]", README), f"console command {name} is not in the README"
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make demo" in README and "make test" in README
