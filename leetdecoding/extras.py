"""The distribution's name on the package registry and its optional extras, for messages that say what to install.

The import name is `leetdecoding`; the distribution is `leetdecoding-attention`, because the registry's
`leetdecoding` is another project. A plain `pip install` brings torch and numpy only: the command line's tables
print in plain text without rich, and what needs more names the extra that brings it.
"""

from __future__ import annotations

import importlib.util

DISTRIBUTION = "leetdecoding-attention"
# the extra that brings each optional module (pyproject.toml's [project.optional-dependencies])
EXTRA_OF = {"rich": "cli", "matplotlib": "bench", "transformers": "hf", "triton": "triton"}


def install_hint(extra: str) -> str:
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def missing(modules: tuple[str, ...]) -> list[str]:
    """The modules of `modules` that cannot be imported here."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def needs(what: str, module: str, extra: str | None = None, detail: str = "") -> ImportError:
    """The one-line ImportError for `what` when `module` is missing (raise it `from None`)."""
    extra = extra or EXTRA_OF[module]
    detail = f" ({detail})" if detail else ""
    return ImportError(f"{what} needs {module}{detail}: {install_hint(extra)}", name=module)


__all__ = ["DISTRIBUTION", "EXTRA_OF", "install_hint", "missing", "needs"]
