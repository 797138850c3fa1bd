"""Calibration windows: the whole text, wrapped in the tokenizer's special tokens."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from kiln.corpus import text_feeds


def _bert_like(tmp_path, words):
    """A word-level tokenizer that adds [CLS] ... [SEP] and truncates to 8 tokens, like MiniLM's (128)."""
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, **{w: i + 3 for i, w in enumerate(sorted(set(words)))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tok.enable_truncation(8)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_windows_cover_the_text_with_special_tokens(tmp_path):
    words = [f"w{i}" for i in range(100)]
    text = tmp_path / "t.txt"
    text.write_text(" ".join(words))
    signature = [{"name": "input_ids", "dtype": "int64"}, {"name": "attention_mask", "dtype": "int64"},
                 {"name": "token_type_ids", "dtype": "int64"}]
    feeds = text_feeds(_bert_like(tmp_path, words), signature, text, samples=50, length=12)
    assert len(feeds) == 10  # 100 words in windows of 10 (+ [CLS], [SEP]), not one truncated window
    ids = np.stack([f["input_ids"][0] for f in feeds])
    assert ids.shape == (10, 12) and (ids[:, 0] == 1).all() and (ids[:, -1] == 2).all()
    assert len(set(ids[:, 1:-1].ravel().tolist())) == 100  # every word once
    assert (feeds[0]["attention_mask"] == 1).all() and (feeds[0]["token_type_ids"] == 0).all()


_DUMP = """<mediawiki><page><title>Kiln</title><revision><text xml:space="preserve">{{Infobox|name={{nested|x}}}}
'''Kilns''' are [[thermal insulation|thermally insulated]] chambers&lt;ref&gt;a citation&lt;/ref&gt; used in [[pottery]] and [http://example.com brick making].
[[File:Kiln.jpg|thumb|A [[kiln]] at work]]
&lt;!-- a hidden comment --&gt;
==History==
{| class="wikitable"
| a table cell that is long enough to count as prose if it were kept
|}
* a list item long enough to count as a paragraph of prose text
Early kilns were pits in the ground, and the temperature rose slowly&amp;nbsp;over many hours of firing.
</text></revision></page>
<page><title>Oven</title><revision><text xml:space="preserve">#REDIRECT [[Kiln]]</text></revision></page></mediawiki>"""


def test_wikipedia_leads_keep_the_prose_and_drop_the_markup(tmp_path):
    import bz2

    from kiln.corpus import wikipedia_leads

    dump = tmp_path / "dump.xml.bz2"
    dump.write_bytes(bz2.compress(_DUMP.encode()))
    leads = wikipedia_leads(dump)
    assert leads == ["Kilns are thermally insulated chambers used in pottery and brick making.\n"
                     "Early kilns were pits in the ground, and the temperature rose slowly\u00a0over many hours of firing."]
    assert wikipedia_leads(dump, chars=50) == [leads[0].split("\n")[0]]  # whole paragraphs up to the limit
    from kiln.corpus import wikipedia_articles

    assert wikipedia_articles(dump, chars=50) == [tuple(leads[0].split("\n"))]  # the rest follows


@pytest.mark.slow  # the gensim wheel
def test_the_default_calibration_text_is_lee_then_wikipedia_and_disjoint_from_evaluation():
    from kiln.corpus import (CALIBRATION_TEXT, GENSIM_WHEEL, calibration_corpus, default_corpus, newsgroups_corpus,
                             read_text)
    from kiln.models.fetch import fetch_wheel

    text = read_text(calibration_corpus())
    lee = read_text(fetch_wheel(GENSIM_WHEEL) / CALIBRATION_TEXT)
    assert text.startswith(lee) and len(text) > 4 * len(lee)
    assert "Anarchism is a political philosophy" in text and "[[" not in text and "{{" not in text
    evaluation = read_text(default_corpus())
    assert not any(line in evaluation for line in text.splitlines() if len(line) > 80)
    newsgroups = read_text(newsgroups_corpus())
    assert not any(line in newsgroups for line in text.splitlines() if len(line) > 80)
    assert len(text) > 2_000_000  # whole articles after the leads: text for passes that train


@pytest.mark.slow  # the gensim wheel
def test_newsgroups_corpus_is_post_bodies_without_headers_or_quotes():
    import re

    from kiln.corpus import EVAL_CORPORA, read_text

    text = read_text(EVAL_CORPORA["newsgroups"]())
    posts = text.split("\n\n")
    assert len(text) > 200_000 and len(posts) > 150
    assert not re.search(r"^(Path|Xref|Newsgroups|Message-ID|Lines): ", text, flags=re.M)
    assert not re.search(r"^\s*>", text, flags=re.M) and "writes:\n" not in text
    assert "The Space Calendar is updated monthly" in text
