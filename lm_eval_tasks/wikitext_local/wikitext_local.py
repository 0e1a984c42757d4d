"""Documents of WikiText-2 raw read from disk, for lm-eval's rolling log-likelihood.

The directory is ``data_dir`` (``--metadata '{"data_dir": "..."}'``), else ``$HH_DATA_DIR``; it holds
``wiki.test.raw`` (and ``wiki.valid.raw``). The raw file is one long text; lm-eval's document-level
WikiText splits it into its articles, each starting at a top-level heading line `` = Title = ``
(section headings, `` = = Section = = ``, stay inside their article).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import datasets
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

__all__ = ["load", "split_articles", "process_results", "wikitext_detokenizer"]

ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")


def split_articles(text: str) -> list[str]:
    """The articles of a WikiText raw file, each from its title line up to the next title."""
    articles: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if ARTICLE_TITLE.match(line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["".join(lines) for lines in articles if "".join(lines).strip()]


def load(data_dir: str | None = None, **_metadata) -> datasets.DatasetDict:
    directory = Path(data_dir or os.environ.get("HH_DATA_DIR", ""))
    if not (directory / "wiki.test.raw").is_file():
        raise FileNotFoundError(f"wiki.test.raw not found in {str(directory)!r}: set HH_DATA_DIR or "
                                "--metadata '{\"data_dir\": ...}' to the WikiText-2 raw directory")
    splits = {"test": "wiki.test.raw", "validation": "wiki.valid.raw"}
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"page": split_articles((directory / name).read_text(encoding="utf-8"))})
        for split, name in splits.items() if (directory / name).is_file()})
