"""Calibration windows: the whole text, wrapped in the tokenizer's special tokens."""

import numpy as np
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
