"""Held-out and calibration text for the quality benchmark: the Wikipedia excerpt in gensim's wheel.

gensim 4.4.0 ships ``test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
(206 pages; 100 real articles of ~3.1 M characters once redirects and markup are dropped). Articles
are split by position: the first half calibrates, the second half is held out for perplexity, so no
article is in both. Text is cleaned with gensim's ``filter_wiki`` plus light de-markup (bold/italic
quotes, heading markers, blank-line runs).

    calib = calibration_windows(tokenizer, n=32, length=256, seed=0)   # random windows, [n, length]
    evals = eval_windows(tokenizer, n=24, length=512)                  # evenly spread, [n, length]
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import random
import re
from pathlib import Path

import torch

WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_ARTICLE_CHARS = 2000  # drops redirects and stubs


def wiki_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("gensim is not installed (the 'bench' extra); it ships the Wikipedia excerpt")
    return Path(next(iter(spec.submodule_search_locations))) / WIKI_FILE


def _clean(text: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(text)
    text = re.sub(r"'{2,}", "", text)  # ''italic'' and '''bold'''
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)  # == Heading ==
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


@functools.lru_cache(maxsize=1)
def articles() -> tuple[tuple[str, str], ...]:
    """(title, clean text) of every real article, in file order."""
    from gensim.corpora.wikicorpus import extract_pages

    out = []
    with bz2.open(wiki_path()) as f:
        for title, text, _pageid in extract_pages(f, filter_namespaces=("0",)):
            clean = _clean(text)
            if not clean.upper().startswith("#REDIRECT") and len(clean) >= MIN_ARTICLE_CHARS:
                out.append((title, clean))
    return tuple(out)


def split_articles() -> tuple[list[str], list[str]]:
    """(calibration texts, held-out texts): the first and the second half of the articles."""
    arts = [text for _title, text in articles()]
    half = len(arts) // 2
    return arts[:half], arts[half:]


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text + "\n\n", add_special_tokens=False).input_ids
    return torch.tensor(ids, dtype=torch.long)


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=torch.long), windows[:, :-1]], dim=1)


def eval_windows(tokenizer, n: int, length: int, bos: int | None = None) -> torch.Tensor:
    """``n`` non-overlapping windows of ``length`` tokens, evenly spread over the held-out articles.

    With ``bos`` each window starts with it (the window's last token is dropped to keep the length).
    """
    stream = _token_stream(tokenizer, split_articles()[1])
    total = stream.numel() // length
    if n > total:
        raise ValueError(f"asked for {n} held-out windows of {length} tokens; the text has {total}")
    picks = [round(i * (total - 1) / max(n - 1, 1)) for i in range(n)]
    return _with_bos(torch.stack([stream[p * length:(p + 1) * length] for p in picks]), bos)


def calibration_windows(tokenizer, n: int, length: int, seed: int = 0, bos: int | None = None) -> torch.Tensor:
    """``n`` windows of ``length`` tokens at seeded random offsets in the calibration articles."""
    stream = _token_stream(tokenizer, split_articles()[0])
    rng = random.Random(f"vlmptq-quality-calib:{seed}")
    starts = [rng.randrange(0, stream.numel() - length) for _ in range(n)]
    return _with_bos(torch.stack([stream[s:s + length] for s in starts]), bos)
