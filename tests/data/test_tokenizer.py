from data.tokenizer import SPECIAL_TOKENS, SpecialIds, load_tokenizer, tokenizer_sha256, train_tokenizer

TEXTS = [
    "Hello, world!  Two spaces,\ttabs\nand newlines.\n\n",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🎉🚀, Ελληνικά, עברית.",
    "   leading and trailing spaces   ",
]


def test_round_trip_is_exact(tiny_dir):
    tok = load_tokenizer(tiny_dir / "tokenizer.json")
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_have_fixed_ids(tiny_dir):
    tok = load_tokenizer(tiny_dir / "tokenizer.json")
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i
    assert {"<|system|>", "<|user|>", "<|assistant|>", "<|end_of_turn|>", "<|reserved_0|>"} <= set(SPECIAL_TOKENS)
    assert SpecialIds.of(tok) == SpecialIds(bos=0, eos=1, pad=2)
    assert tok.encode("<|eos|>").ids == [1]  # one token, not split into pieces


def test_train_small_vocab_and_hash(tmp_path):
    tok = train_tokenizer(TEXTS * 20, vocab_size=300)
    assert tok.get_vocab_size() == 300
    assert tok.decode(tok.encode(TEXTS[1]).ids) == TEXTS[1]
    path = tmp_path / "tok.json"
    tok.save(str(path))
    digest = tokenizer_sha256(path)
    assert len(digest) == 64
    path.write_text(path.read_text() + " ")
    assert tokenizer_sha256(path) != digest
