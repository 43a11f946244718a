"""WordPiece tokenization with the `tokenizers` library, configured to give Google's ids.

Google's FullTokenizer = BasicTokenizer (clean control characters, space out CJK
characters, lower-case and strip accents, split on punctuation) + greedy longest-match
WordPiece with words over 200 characters mapped to [UNK]. `tokenizers` has the same
pieces in Rust; the one default that differs is the long-word cut-off (100 there, 200 in
Google's code), so it is set explicitly. A test checks the ids against Google's own
tokenization.py on the sample's sentences.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from bertdistill.errors import StepError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
GOOGLE_MAX_INPUT_CHARS_PER_WORD = 200


class Vocab:
    """A WordPiece vocab.txt, validated, with the ids make-examples needs."""

    def __init__(self, path: str | Path, uri: str | None = None):
        self.path = Path(path)
        self.uri = uri or str(path)
        raw = self.path.read_bytes()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.tokens = _parse_vocab(raw, self.uri)
        index = {token: i for i, token in enumerate(self.tokens)}
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (index[t] for t in SPECIAL_TOKENS)

    def __len__(self) -> int:
        return len(self.tokens)

    def is_continuation(self) -> list[bool]:
        """Per id: does the piece continue a word ('##ing')? Whole-word masking needs it."""
        return [token.startswith("##") for token in self.tokens]


def _parse_vocab(raw: bytes, uri: str) -> list[str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StepError(f"{uri} is not a WordPiece vocab: it is not UTF-8 text") from None
    tokens = text.split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    tokens = [t.rstrip("\r") for t in tokens]
    problems = []
    missing = [t for t in SPECIAL_TOKENS if t not in tokens]
    if missing:
        problems.append(f"it lacks the special tokens {', '.join(missing)}")
    if not any(t.startswith("##") for t in tokens):
        problems.append("it has no '##' continuation pieces")
    bad = next((t for t in tokens if t.strip() != t or " " in t or not t), None)
    if bad is not None:
        problems.append(f"line {tokens.index(bad) + 1} ({bad[:40]!r}) is not a single token")
    if len(set(tokens)) != len(tokens):
        problems.append("it repeats tokens")
    if problems:
        raise StepError(f"{uri} is not a WordPiece vocab (one token per line, like BERT's vocab.txt): "
                        + "; ".join(problems))
    return tokens


def is_uncased(tokens: list[str]) -> bool:
    """An uncased vocab (bert-base-uncased, MiniLM) has no upper-case pieces besides [SPECIAL] ones."""
    return not any(t != t.lower() for t in tokens if not (t.startswith("[") and t.endswith("]")))


def wordpiece_tokenizer(vocab: Vocab | list[str], lowercase: bool = True):
    """A `tokenizers.Tokenizer` whose ids equal Google's FullTokenizer(vocab, do_lower_case)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tokens = vocab.tokens if isinstance(vocab, Vocab) else vocab
    model = models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]",
                             max_input_chars_per_word=GOOGLE_MAX_INPUT_CHARS_PER_WORD)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=lowercase, lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer
