"""Print the settings as .env.example (default) or as the README's Markdown table (--markdown).

Both files are generated from `backend.config.Settings`; tests check they list every setting.
"""

from __future__ import annotations

import sys

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


if __name__ == "__main__":
    print(markdown() if "--markdown" in sys.argv else env_example())
