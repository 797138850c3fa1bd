"""Text for evaluation and calibration, from the `gensim` wheel (fetched with `pip download`).

The sets are disjoint, so a data-aware pass never sees the text it is judged on:
- evaluation: `lee_background.cor`, 300 news articles; and, to check a result away from the
  calibration text's kind of English, `newsgroups` (`EVAL_CORPORA`): the bodies of the 20
  Newsgroups posts in the wheel's `mini_newsgroup` (e-mail English of 1993, headers and
  quoted lines removed);
- calibration: `lee.cor`, 50 other articles from the same source, then the opening
  paragraphs of the Wikipedia articles in the wheel's `enwiki-...-shortened.bz2` (about
  100 articles, wiki markup stripped), so that GPTQ's statistics see general English and not
  only one kind of news text, then the rest of those articles (2.5M characters: text for
  passes that train, such as distill, which ask for many more windows) (`CALIBRATION_WINDOWS` windows of 256 tokens: the whole of
  lee.cor, then Wikipedia). On SmolLM2 int4 (GPTQ, asymmetric blocks of 32, torch, Lee
  10 x 512): +11.7% PPL with 16 windows of lee.cor, +12.8% with 112 more windows of text
  sampled from the model itself, +9.4% with 48 more windows of Wikipedia.
"""

from __future__ import annotations

import bz2
import html
import io
import pickletools
import re
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kiln.errors import KilnError, missing_extra

GENSIM_WHEEL = "gensim==4.4.0"
EVAL_TEXT = "gensim/test/test_data/lee_background.cor"
CALIBRATION_TEXT = "gensim/test/test_data/lee.cor"
WIKIPEDIA = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWSGROUPS = "gensim/test/test_data/mini_newsgroup"
CALIBRATION_WINDOWS = 64
LEAD_CHARS = 1500  # of each Wikipedia article: whole paragraphs up to about this many characters


def fetch_wheel(name: str) -> Path:
    """The gensim wheel (kiln.models.fetch): `kiln eval --text FILE` needs none of this, so the
    runtime imports kiln.models (the compiler) only here, where a corpus is downloaded."""
    try:
        from kiln.models.fetch import fetch_wheel as fetch
    except ModuleNotFoundError as exc:
        error = missing_extra(exc, "kiln's evaluation texts (the gensim wheel)")
        if error is exc:
            raise
        raise KilnError(f"{error}; or give your own text: --text FILE") from exc
    return fetch(name)


def cache_dir(*parts: str) -> Path:
    from kiln.models.cache import cache_dir as directory

    return directory(*parts)


def default_corpus() -> Path:
    return fetch_wheel(GENSIM_WHEEL) / EVAL_TEXT


def newsgroups_corpus() -> Path:
    """The 20 Newsgroups post bodies of the gensim wheel, written once into kiln's cache."""
    return _cached_text("eval-newsgroups-v1.txt",
                        lambda wheel: "\n\n".join(newsgroups_posts((wheel / NEWSGROUPS).read_bytes())))


EVAL_CORPORA = {"lee": default_corpus, "newsgroups": newsgroups_corpus}


# quoted lines (">", "MB>", "|", ":"), their attribution, and header lines of forwarded posts
_QUOTED_OR_HEADER = re.compile(r"\s*(\w{0,4}>|\||:)|In article|(To: )?(From|To|Newsgroups|Message-ID|Organization|"
                               r"Date|Subject|Path|Xref|Lines|References|Sender|Reply-To|Distribution|Keywords|"
                               r"Summary|NNTP-Posting-Host|Article-I\.D\.): ")


def newsgroups_posts(data: bytes, min_chars: int = 300) -> list[str]:
    """The bodies of the posts in gensim's `mini_newsgroup` (a zlib-compressed pickle of
    scikit-learn's dataset). Its strings are read from the pickle's opcodes, so nothing is
    unpickled and scikit-learn is not needed. Headers go (up to the first blank line, and those
    of forwarded posts), and so do quoted lines (`>`, `XY>`, `|`, `:`) and their attribution
    ("In article ...", "... writes:")."""
    strings = [arg for op, arg, _ in pickletools.genops(io.BytesIO(zlib.decompress(data)))
               if op.name in ("UNICODE", "BINUNICODE", "SHORT_BINUNICODE") and isinstance(arg, str)]
    posts = []
    for post in strings:
        if "\n\n" not in post or not re.match(r"[\w-]+: ", post):
            continue  # not a post (the dataset's other strings: names, file names)
        body = post.split("\n\n", 1)[1]
        lines = [line for line in body.split("\n") if not _QUOTED_OR_HEADER.match(line)
                 and not line.rstrip().endswith(("writes:", "wrote:"))]
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        if len(text) >= min_chars:
            posts.append(text)
    return posts


def calibration_corpus() -> Path:
    """lee.cor, the Wikipedia leads, then the rest of those articles (about 0.6M tokens in all,
    for passes that train: distill), written once into kiln's cache. The first windows are the
    same as before the article bodies were added, so a recipe's calibration does not move."""
    def build(wheel: Path) -> str:
        articles = wikipedia_articles(wheel / WIKIPEDIA)
        return "\n\n".join([read_text(wheel / CALIBRATION_TEXT)] + [lead for lead, _ in articles]
                           + [rest for _, rest in articles if rest])

    return _cached_text("calibration-lee-wikipedia-v2.txt", build)


def _cached_text(name: str, build: Callable[[Path], str]) -> Path:
    """kiln's cache file `name`, written once (through a temporary file) from `build(gensim wheel)`."""
    target = cache_dir("corpus") / name
    if not target.is_file():
        tmp = target.with_suffix(".tmp")
        tmp.write_text(build(fetch_wheel(GENSIM_WHEEL)), encoding="utf-8")
        tmp.replace(target)
    return target


def wikipedia_leads(dump: Path, chars: int = LEAD_CHARS) -> list[str]:
    """The opening prose of each article in a MediaWiki XML dump (.bz2)."""
    return [lead for lead, _ in wikipedia_articles(dump, chars)]


def wikipedia_articles(dump: Path, chars: int = LEAD_CHARS) -> list[tuple[str, str]]:
    """(lead, rest) of each article's prose in a MediaWiki XML dump (.bz2): the lead is whole
    paragraphs up to about `chars` characters, the rest the paragraphs after it; references,
    templates, tables, files and markup removed, links kept as their text; redirects skipped."""
    raw = bz2.open(dump, "rt", encoding="utf-8").read()
    leads = []
    for page in re.findall(r"<text[^>]*>(.*?)</text>", raw, flags=re.S):
        t = html.unescape(page)
        if t.lstrip().lower().startswith("#redirect"):
            continue
        t = re.sub(r"<!--.*?-->|<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", t, flags=re.S)
        for _ in range(5):  # nested templates, innermost first
            t = re.sub(r"\{\{[^{}]*\}\}", "", t)
        t = re.sub(r"\{\|.*?\|\}", "", t, flags=re.S)  # tables
        t = re.sub(r"\[\[(?:File|Image|Category|[a-z]{2,3}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", t)
        t = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", t)
        t = re.sub(r"\[https?://[^ \]]*(?: ([^\]]*))?\]", r"\1", t)
        t = html.unescape(re.sub(r"<[^>]+>|'{2,}", "", t))  # entities were escaped twice (&amp;nbsp;)
        paragraphs = [p.strip() for p in t.split("\n")]
        paragraphs = [p for p in paragraphs if len(p) > 40 and not p.startswith(tuple("=*|!#:;{}"))
                      and not any(m in p for m in ("[[", "]]", "{{", "}}"))]  # markup the rules above left
        lead, taken = "", 0
        for p in paragraphs:
            if lead and len(lead) + len(p) > chars:
                break
            lead, taken = (f"{lead}\n{p}" if lead else p), taken + 1
        if lead:
            leads.append((lead, "\n".join(paragraphs[taken:])))
    return leads


def read_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise KilnError(f"{path}: no such text file")
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if not text:
        raise KilnError(f"{path}: the text is empty")
    return text


def text_feeds(tokenizer: Path, signature: list[dict], text: Path | None = None, samples: int = 16,
                      length: int = 256) -> list[dict[str, np.ndarray]]:
    """`samples` feed dicts of one window of `length` tokens each, consecutive in the text.

    Each window carries the special tokens the tokenizer adds to a text (BERT's [CLS] ... [SEP],
    a BOS), as the model sees them at run time. Masks are ones (no padding), other integer
    inputs zeros; a text shorter than samples × length gives fewer windows (at least one).
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    # tokenizer.json files may truncate (MiniLM: 128 tokens) or pad: the whole text is wanted here
    tok.no_truncation()
    tok.no_padding()
    prefix, suffix = _special_tokens(tok)
    ids = tok.encode(read_text(text or calibration_corpus()), add_special_tokens=False).ids
    if len(ids) < 8:
        raise KilnError(f"{text}: the text is too short (fewer than 8 tokens)")
    body = min(length - len(prefix) - len(suffix), len(ids))
    feeds = []
    for start in range(0, len(ids) - body + 1, body)[:samples]:
        window = np.array(prefix + ids[start:start + body] + suffix, dtype=np.int64)[None]
        feed = {}
        for spec in signature:
            name, dtype = spec["name"], spec["dtype"]
            if name == "input_ids":
                feed[name] = window.astype(dtype)
            elif dtype in ("int64", "int32"):
                feed[name] = (np.ones_like(window) if "mask" in name else np.zeros_like(window)).astype(dtype)
            else:
                raise KilnError(f"cannot make a calibration feed for input '{name}' ({dtype})")
        feeds.append(feed)
    return feeds


def _special_tokens(tok) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's post-processor puts before and after a single text."""
    core = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a").ids
    for i in range(len(full) - len(core) + 1):
        if full[i:i + len(core)] == core:
            return full[:i], full[i + len(core):]
    return [], []
