"""mkdocs hook: links from a docs page to repository files outside docs/ work in the built site too.

On GitHub a page's relative link such as ``../../benchmarks/results/merge_quality.png`` opens the file
itself; mkdocs serves only files under ``docs/``. For each such link to an existing repository file, this
hook copies the file into the site under ``repo/<path>`` and points the link there. It reads local files
only (the build stays offline); a link to a missing file is left alone, so ``--strict`` reports it.
"""

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

LINK = re.compile(r"(\]\()([^)\s#]+)")  # the target of a markdown link or image: ](target
SITE_FOLDER = "repo"


def on_page_markdown(markdown: str, page: Page, config: Any, files: Files) -> str:
    """Point each link to a repository file outside docs/ at its copy under ``repo/``."""
    docs = Path(config["docs_dir"]).resolve()
    root = docs.parent

    def rewrite(match: re.Match) -> str:
        target = match.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            return match.group(0)
        path = (docs / page.file.src_uri).parent.joinpath(target).resolve()
        if path.is_relative_to(docs) or not path.is_relative_to(root) or not path.is_file():
            return match.group(0)
        uri = f"{SITE_FOLDER}/{path.relative_to(root).as_posix()}"
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(path)))
        return match.group(1) + posixpath.relpath(uri, posixpath.dirname(page.file.src_uri))

    return LINK.sub(rewrite, markdown)
