"""MkDocs hook: the landing page is README.md, with its links made relative to docs/.

The README links to pages as ``docs/guides/recipes.md`` (right on a code host); on the site the
same page is ``guides/recipes.md``. ``docs/index.md`` is a placeholder that this hook replaces.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

#: A Markdown link or image target that starts with ``docs/``.
_DOCS_LINK = re.compile(r"\]\(docs/")


def readme_for_site(readme: str) -> str:
    """README text with ``](docs/...)`` links rewritten to ``](...)``."""
    return _DOCS_LINK.sub("](", readme)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replaces the placeholder ``index.md`` with the README."""
    if page.file.src_uri != "index.md":
        return markdown
    readme = Path(config["config_file_path"]).parent / "README.md"
    return readme_for_site(readme.read_text(encoding="utf-8"))
