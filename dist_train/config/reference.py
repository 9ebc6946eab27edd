"""``docs/config.md``: every config key with its default and meaning, made from the schema.

    python -m dist_train.config.reference > docs/config.md

The schema (``config/schema.py``) is the one source; ``tests/test_config.py`` fails when the
file in ``docs/`` differs from what this prints, so the reference never drifts from the code.
"""
from __future__ import annotations

import json
from typing import Any, List

from dist_train.config.load import ALIASES, describe_fields

HEAD = """# Config reference

Every key of a job, its default and what it does; generated from `dist_train/config/schema.py` by
`python -m dist_train.config.reference > docs/config.md` (a test keeps the two equal). Set a key in a
YAML preset (`--config FILE`, nested sections) or on the command line (`section.key=value`); the
merge order is defaults, then the preset, then the overrides. `python -m dist_train --help` prints the
same list; `--print-config` prints a resolved job; `--check` validates one without training.
"""


def _value(default: Any) -> str:
    text = json.dumps(default) if isinstance(default, (dict, list, bool, type(None))) else repr(default)
    return f"`{text}`"


def markdown() -> str:
    """The reference as Markdown: one table per top-level section."""
    lines: List[str] = [HEAD.rstrip("\n")]
    section = None
    for key, default, help_ in describe_fields():
        top = key.split(".", 1)[0]
        if top != section:
            section = top
            lines += ["", f"## {section}", "", "| key | default | meaning |", "|---|---|---|"]
        text = help_.replace("|", "&#124;").replace("<", "&lt;").replace(">", "&gt;")
        lines.append(f"| `{key}` | {_value(default)} | {text} |")
    if ALIASES:
        lines += ["", "Aliases: " + ", ".join(f"`{a}` = `{k}`" for a, k in sorted(ALIASES.items())) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
