"""--help of the console scripts: every option explains itself, and no default is shown twice."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

import pytest

from semipd_server.bench.serving import build_parser as bench_parser
from semipd_server.cli import build_parser as server_parser


@pytest.mark.parametrize("make", [server_parser, bench_parser], ids=["semipd-server", "semipd-bench-serving"])
def test_every_option_has_help_and_one_default(make: Callable[[], argparse.ArgumentParser]) -> None:
    parser = make()
    missing = [a.option_strings[0] for a in parser._actions if a.option_strings and not (a.help or "").strip()]
    assert not missing, f"options without help: {missing}"
    text = " ".join(parser.format_help().split())  # unwrapped
    assert "(default: None)" not in text
    # an appended "(default: X)" never follows a help text that already gave its default
    for action in parser._actions:
        if not action.help or action.help == argparse.SUPPRESS:
            continue
        shown = parser._get_formatter()._get_help_string(action)  # type: ignore[attr-defined]
        assert len(re.findall(r"\(default", shown)) <= max(1, action.help.count("(default")), shown
