"""lm_eval_tasks/wikitext_local: WikiText-2 raw read from disk, one document per article."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TASK_DIR = Path(__file__).resolve().parents[1] / "lm_eval_tasks" / "wikitext_local"
TEXT = (" \n = First = \n \n Body one . \n \n = = Section = = \n \n More one . \n"
        " = Second = \n \n Body two @-@ part . \n")


def task_module():
    spec = importlib.util.spec_from_file_location("wikitext_local", TASK_DIR / "wikitext_local.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_articles_start_at_top_level_titles_and_keep_their_sections() -> None:
    articles = task_module().split_articles(TEXT)
    assert [a.splitlines()[0] for a in articles] == [" = First = ", " = Second = "]
    assert " = = Section = = " in articles[0]
    # Nothing but the blank line ahead of the first title is dropped.
    assert "".join(articles) == TEXT.removeprefix(" \n")


def test_load_reads_the_directory_and_uses_lm_evals_detokenizer(tmp_path, monkeypatch) -> None:
    module = task_module()
    (tmp_path / "wiki.test.raw").write_text(TEXT, encoding="utf-8")
    monkeypatch.setenv("HH_DATA_DIR", str(tmp_path))
    pages = module.load()["test"]["page"]
    assert pages[-1].startswith(" = Second = ")
    assert "two-part." in module.wikitext_detokenizer({"page": pages[-1]})
    with pytest.raises(FileNotFoundError, match="wiki.test.raw"):
        module.load(data_dir=str(tmp_path / "missing"))
