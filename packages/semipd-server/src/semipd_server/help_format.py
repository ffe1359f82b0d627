"""The --help formatter of the console scripts: "(default: X)" appended once, and only where it tells something."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" unless the help already says its default or there is none (None, False, a
    suppressed one), so no option shows its default twice (argparse.ArgumentDefaultsHelpFormatter would)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # identity, not ==: a default of 0 or 0.0 is worth showing, False (a store_true flag) is not
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)) or (
                action.const is False):
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        return f"{text} (default: {default})"
