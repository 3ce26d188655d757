"""Print the settings as .env.example (default) or as the README's Markdown table (--markdown);
with --write, update both files in place.

Both files are generated from `backend.config.Settings`; tests check they list every setting.
"""

from __future__ import annotations

import sys
from pathlib import Path

from backend.config import Settings

SECTIONS = {"MODEL_NAME": "Model", "FETCH_CONCURRENCY": "Images",
            "LABEL_STUDIO_URL": "Label Studio", "REDIS_URL": "Store", "HOST": "Server"}


def env_example() -> str:
    lines = ["# Every setting of the backend, with its default. Copy to .env and edit, or export "
             "them.", "# Commented-out lines show the default; uncomment to change it.", ""]
    for name, field in Settings.model_fields.items():
        if name in SECTIONS:
            lines += [f"# --- {SECTIONS[name]} " + "-" * (60 - len(SECTIONS[name])), ""]
        default = "" if field.default is None else field.default
        lines += [f"# {field.description}", f"# {name}={default}", ""]
    return "\n".join(lines)


def markdown() -> str:
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "—" if field.default is None else f"`{field.default}`"
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {default} | {description} |")
    return "\n".join(rows)


def write_files(root: Path) -> None:
    """Rewrite .env.example and the settings table in README.md."""
    (root / ".env.example").write_text(env_example() + "\n")
    readme = (root / "README.md").read_text()
    start = readme.index("| Variable | Default | Meaning |")
    end = readme.index("\n\n", start)
    (root / "README.md").write_text(readme[:start] + markdown() + readme[end:])


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_files(Path(__file__).resolve().parents[1])
    else:
        print(markdown() if "--markdown" in sys.argv else env_example())
