"""--help with the defaults, for every (sub)command of the command line."""

from __future__ import annotations

import argparse


def shows_default(action: argparse.Action) -> bool:
    """An option whose default says something (None, False and argparse's SUPPRESS say nothing; 0 does)."""
    default = action.default
    return bool(action.option_strings) and default is not None and default is not False and default != argparse.SUPPRESS


class DefaultsFormatter(argparse.HelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, less "(default: None)" / "(default: False)" and help texts
    that already say their default; lists shown as they are typed (comma-separated)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if not shows_default(action) or "default" in help_text:
            return help_text
        default = action.default
        shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
        return f"{help_text} (default: {shown.replace('%', '%%')})".lstrip()


class DefaultsParser(argparse.ArgumentParser):
    """Every (sub)command's --help shows the defaults, options without a help text included."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.help is None and shows_default(action):
            action.help = self.formatter_class(self.prog)._get_help_string(action)
        return action


__all__ = ["DefaultsFormatter", "DefaultsParser", "shows_default"]
