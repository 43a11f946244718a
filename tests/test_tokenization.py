"""Token ids equal Google's FullTokenizer (bert-tensorflow's tokenization.py) on real text."""

from __future__ import annotations

import pytest

from bertdistill.errors import StepError
from bertdistill.tokenization import Vocab, wordpiece_tokenizer


@pytest.fixture(scope="module")
def google_tokenizer(sample):
    from absl import flags
    from bert import tokenization

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokenization.FullTokenizer(str(sample / "vocab.txt"), do_lower_case=True)


def test_ids_equal_google_full_tokenizer_on_sample_sentences(all_text, sample, google_tokenizer):
    vocab = Vocab(sample / "vocab.txt")
    assert len(vocab) == 30522
    ours = wordpiece_tokenizer(vocab)
    sentences = [s for s in all_text.read_text(encoding="utf-8").splitlines() if s]
    sentences = sentences[::3]  # Google's pure-Python tokenizer is slow; a third is ~6,700 sentences
    sentences += ["Ünïcödé ÀCCENTS, 中文字符 and a wordthatisfarlongerthan" + "x" * 200 + " end.",
                  "tabs\tand\u200bzero-width\u00a0spaces", "[MASK] [unused5] stays?"]
    encoded = ours.encode_batch(sentences, add_special_tokens=False)
    mismatches = []
    for sentence, enc in zip(sentences, encoded, strict=True):
        expected = google_tokenizer.convert_tokens_to_ids(google_tokenizer.tokenize(sentence))
        if enc.ids != expected:
            mismatches.append(sentence)
    assert len(sentences) > 6000
    assert mismatches == []


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00\x01binary", "not UTF-8"),
    (b'{"[PAD]": 0, "[UNK]": 1}\n', "lacks the special tokens"),
    ("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]).encode(), "no '##' continuation"),
    ("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "##a", "two words"]).encode(), "not a single token"),
])
def test_not_a_wordpiece_vocab(tmp_path, content, message):
    path = tmp_path / "vocab.txt"
    path.write_bytes(content)
    with pytest.raises(StepError, match=message):
        Vocab(path)
