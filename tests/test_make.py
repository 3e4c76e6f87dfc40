"""`make help` lists every target with one line each, and `make` alone prints it: a target's help
is the `## ` comment on its rule line, so a new target without one fails here. And `make test`'s timeouts (item 5)."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def make(*args: str) -> str:
    done = subprocess.run(["make", "--no-print-directory", "-s", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_alone_prints_the_help_of_every_target():
    phony = re.search(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    listed = make("help")
    described = dict(re.findall(r"^  (\S+) +(\S.*)$", listed, re.M))
    assert sorted(described) == sorted(phony) and all(len(text) > 10 for text in described.values())
    assert make() == listed


@pytest.mark.slow
def test_make_test_gives_slow_tests_room(request, pytestconfig):
    """Tests marked slow (the default model end to end) run under conftest's longer timeout; the others under
    pyproject's, which a busy 2-core machine once took 393 s past on two default-model tests."""
    from tests.conftest import SLOW_TIMEOUT_S

    assert request.node.get_closest_marker("timeout").args == (SLOW_TIMEOUT_S,)
    assert float(pytestconfig.getini("timeout")) * 3 <= SLOW_TIMEOUT_S
