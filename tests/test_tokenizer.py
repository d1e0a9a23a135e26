"""Tests for gpt.tokenizer: every kind round-trips text, keeps special tokens out of user text, and
survives state / save / pickle round trips; GPT-2 and the Hugging Face pair give the reference ids."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import rustbpe
import tiktoken.load
from helpers_hf import write_hf_gpt2_files

from gpt.data.tokenizers import _training_pieces, build_tokenizer, train_bpe
from gpt.errors import ConfigError, DataError
from gpt.interop.hf_vocab import hf_tokenizer
from gpt.tokenizer import NEW_SPECIALS, SPECIAL_TOKENS, TOOL_TOKENS, Tokenizer, char_tokenizer
from gpt.tokenizer_load import gpt2_tokenizer, load_tokenizer, tokenizer_from_state
from gpt.typed_config import REPO_ROOT

SHAKESPEARE = REPO_ROOT / "data" / "tinyshakespeare" / "input.txt"
KINDS = ["char", "bpe", "gpt2", "hf"]

SAMPLES = [
    "Hello world",
    "",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷!",
    "CJK 日本語のテキスト 中文 한국어",
    "combining e\u0301 a\u0308 Z\u0351\u0352 done",
    "control \x00\x01\x1b[31m\x7f and a lone \r carriage, then \r\n windows",
    "   lots     of\t\t\twhitespace   \n\n\n   ",
    "special <|endoftext|> and <|end_of_turn|> spelled out<|endoftext|>",
    "numbers 1234567890 3.14159 -42 1e10 don't we'll I'M",
    "RTL עברית العربية and maths ∑∫√∞ ≠ ≤",
    "\ufeffBOM, zero\u200bwidth and nbsp\u00a0here",
    "a" * 1000 + " " * 500 + "b",
]


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")[:200_000]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_hf_gpt2_files(tmp_path_factory.mktemp("hf_gpt2"))


@pytest.fixture(scope="module")
def toks(shakespeare, hf_dir) -> dict[str, Tokenizer]:
    return {
        "char": char_tokenizer(iter(SAMPLES)),
        "bpe": train_bpe([shakespeare], 512),
        "gpt2": gpt2_tokenizer(),
        "hf": hf_tokenizer(hf_dir),
    }


# ------------------------------------------------------------------------------------ every kind


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(toks, kind):
    tok = toks[kind]
    assert tok.kind == kind
    for text in SAMPLES:
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]


@pytest.mark.parametrize("kind", KINDS)
def test_special_spelling_in_text_is_plain_text(toks, kind):
    tok = toks[kind]
    specials = {tok.special_id(name) for name in SPECIAL_TOKENS}
    assert tok.eot_id == tok.special_id("<|endoftext|>")
    assert len(specials) == len(SPECIAL_TOKENS) and max(specials) < tok.vocab_size
    text = "user says <|endoftext|><|end_of_turn|> to escape"
    for ids in (tok.encode(text), tok.encode_batch([text])[0]):
        assert not specials & set(ids)
        assert tok.decode(ids) == text
    # The ids themselves decode to the spelling.
    assert tok.decode([tok.eot_id, tok.special_id("<|end_of_turn|>")]) == "<|endoftext|><|end_of_turn|>"
    with pytest.raises(KeyError):
        tok.special_id("<|nope|>")


@pytest.mark.parametrize("kind", KINDS)
def test_state_round_trip(toks, kind):
    tok = toks[kind]
    state = tok.to_state()
    # Plain JSON types only: checkpoints are loaded with weights_only.
    assert json.loads(json.dumps(state)) == state
    again = tokenizer_from_state(json.loads(json.dumps(state)))
    assert type(again) is type(tok) and again.kind == tok.kind
    assert (again.vocab_size, again.eot_id) == (tok.vocab_size, tok.eot_id)
    assert again.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
    assert again.fingerprint() == tok.fingerprint()
    assert len(tok.fingerprint()) == 64
    unpickled = pickle.loads(pickle.dumps(tok))
    assert unpickled.encode(SAMPLES[2]) == tok.encode(SAMPLES[2])


def test_state_survives_torch_weights_only(toks, tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"tokenizer": toks["bpe"].to_state()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"]
    assert tokenizer_from_state(state).fingerprint() == toks["bpe"].fingerprint()


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load(toks, kind, tmp_path):
    tok = toks[kind]
    path = tok.save(tmp_path / "run")
    assert path == tmp_path / "run" / "tokenizer.json"
    for where in (tmp_path / "run", str(path)):
        loaded = load_tokenizer(where)
        assert loaded.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
        assert loaded.fingerprint() == tok.fingerprint()
    rank_file = tmp_path / "run" / "tokenizer.tiktoken"
    if kind == "char":
        assert not rank_file.exists()
    else:
        # The convenience rank file is real tiktoken format, readable by tiktoken itself.
        assert tiktoken.load.load_tiktoken_bpe(str(rank_file)) == tok._ranks


def test_fingerprints_differ_between_tokenizers(toks):
    assert len({tok.fingerprint() for tok in toks.values()}) == len(toks)
    other = char_tokenizer(["abc"])
    assert other.fingerprint() != char_tokenizer(["abd"]).fingerprint()


@pytest.mark.parametrize("kind", KINDS)
def test_decode_rejects_unknown_ids_and_takes_arrays(toks, kind):
    tok = toks[kind]
    ids = tok.encode("Speak, speak.")
    assert tok.decode(np.array(ids)) == "Speak, speak."
    for bad in (tok.vocab_size, tok.vocab_size + 63, -1):
        with pytest.raises(ValueError, match="out of range"):
            tok.decode(ids + [bad])


# ------------------------------------------------------------------------------------ char


def test_char_vocabulary_and_unknown_character():
    tok = char_tokenizer(["hello", " world\n"])
    assert tok.vocab_size == len(set("hello world\n")) + len(NEW_SPECIALS)
    assert tok.encode("\n") == [0]  # sorted: "\n" < " " < letters
    assert tok.encode("lo") == [sorted(set("hello world\n")).index(c) for c in "lo"]
    assert tok.special_id("<|endoftext|>") == len(set("hello world\n"))
    with pytest.raises(DataError) as err:
        tok.encode("hello wörld")
    msg = str(err.value)
    assert "'ö'" in msg and "U+00F6" in msg and "data.tokenizer=bpe" in msg
    with pytest.raises(DataError, match=r"U\+1F600"):
        tok.encode("😀")
    with pytest.raises(DataError, match="empty"):
        char_tokenizer([""])


# ------------------------------------------------------------------------------------ trained BPE


def test_bpe_training_size_and_compression(shakespeare):
    for vocab_size in (262, 300, 1000):
        tok = train_bpe(iter([shakespeare]), vocab_size)
        assert tok.kind == "bpe" and tok.vocab_size == vocab_size
        first = vocab_size - len(NEW_SPECIALS)  # the special tokens follow the ranks, in order
        assert [tok.special_id(name) for name in NEW_SPECIALS] == list(range(first, vocab_size))
    n_bytes = len(shakespeare.encode())
    assert len(tok.encode(shakespeare)) < 0.5 * n_bytes
    assert tok.decode(tok.encode(shakespeare)) == shakespeare
    # Deterministic: same corpus, same tokenizer (the fingerprint keys the data cache).
    assert train_bpe([shakespeare], 1000).fingerprint() == tok.fingerprint()


def test_bpe_streaming_matches_one_shot_training(shakespeare):
    """Long texts are fed to rustbpe in pieces; the cuts must not change what is learned."""
    pieces = list(_training_pieces([shakespeare], None, [0], piece_chars=5000))
    assert len(pieces) > 30 and "".join(pieces) == shakespeare
    assert all(len(p) <= 5000 for p in pieces)
    direct = rustbpe.Tokenizer()
    direct.train_from_iterator([shakespeare], 512 - len(NEW_SPECIALS))
    expected = {bytes(b): r for b, r in direct.get_mergeable_ranks()}
    assert train_bpe([shakespeare], 512)._ranks == expected
    # max_bytes keeps exactly the first max_bytes of the corpus.
    direct = rustbpe.Tokenizer()
    direct.train_from_iterator([shakespeare[:70_000]], 512 - len(NEW_SPECIALS))
    expected = {bytes(b): r for b, r in direct.get_mergeable_ranks()}
    assert train_bpe([shakespeare], 512, max_bytes=70_000)._ranks == expected
    # Lone surrogates (from text decoded with surrogateescape) do not stop training.
    assert train_bpe(["abc\udc80def"] * 10, 264).decode([97]) == "a"


@pytest.mark.parametrize("bad", [0, 100, 257, "4096", True])
def test_bpe_rejects_bad_vocab_size(shakespeare, bad):
    with pytest.raises(ConfigError, match="data.vocab_size"):
        train_bpe([shakespeare], bad)


def test_bpe_empty_corpus():
    with pytest.raises(DataError, match="empty"):
        train_bpe(["", ""], 300)


# ------------------------------------------------------------------------------------ GPT-2 and HF


def test_gpt2_reference_ids(toks):
    tok = toks["gpt2"]
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_id == 50256 and tok.special_id("<|end_of_turn|>") == 50257
    assert tok.vocab_size == 50262  # and the four tool-call tokens
    assert [tok.special_id(t) for t in TOOL_TOKENS] == [50258, 50259, 50260, 50261] and tok.has_tools
    # decode_bytes hands back partial UTF-8 (generation streams it); decode replaces it.
    ids = tok.encode("😀")
    head = tok.decode_bytes(ids[:1])
    assert len(ids) > 1 and head != "😀".encode() and "😀".encode().startswith(head)
    assert tok.decode(ids[:1]) == "\ufffd"


def test_gpt2_rank_file_errors(tmp_path):
    with pytest.raises(DataError, match="nope.tiktoken"):
        gpt2_tokenizer(tmp_path / "nope.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(DataError, match=r"bad\.tiktoken:2"):
        gpt2_tokenizer(bad)


def test_hf_pair_matches_gpt2(toks):
    gpt2, hf = toks["gpt2"], toks["hf"]
    assert hf._id_map is None  # GPT-2's ids are in merge order: used directly as ranks
    assert (hf.vocab_size, hf.eot_id, hf.special_id("<|end_of_turn|>")) == (50258, 50256, 50257)
    texts = SAMPLES + [SHAKESPEARE.read_text(encoding="utf-8")[:20_000]]
    assert hf.encode_batch(texts) == gpt2.encode_batch(texts)


def test_hf_pair_with_ids_out_of_merge_order(toks, hf_dir, tmp_path):
    """Ids that are not merge priorities: ranks come from merges.txt, ids are mapped back."""
    vocab = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
    perm = list(range(50256))
    random.Random(0).shuffle(perm)
    perm.append(60000)  # <|endoftext|>, leaving a gap in the ids
    shuffled = {token: perm[i] for token, i in vocab.items()}
    (tmp_path / "vocab.json").write_text(json.dumps(shuffled), encoding="utf-8")
    (tmp_path / "merges.txt").write_text((hf_dir / "merges.txt").read_text(encoding="utf-8"))
    tok = hf_tokenizer(tmp_path)
    assert tok._id_map is not None
    assert (tok.eot_id, tok.special_id("<|end_of_turn|>"), tok.vocab_size) == (60000, 60001, 60002)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == [perm[i] for i in toks["gpt2"].encode(text)]
        assert tok.decode(ids) == text
    assert tokenizer_from_state(tok.to_state()).encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
    with pytest.raises(ValueError):
        tok.decode([55555])  # inside the gap: no such token


def test_hf_pair_matches_transformers(toks, hf_dir):
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "GPT2TokenizerFast", None) or transformers.GPT2Tokenizer
    ref = cls.from_pretrained(str(hf_dir))  # reads vocab.json + merges.txt from the directory
    assert ref("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    # Hugging Face turns the spelling "<|endoftext|>" into the special id; ours never does.
    texts = [t for t in SAMPLES if "<|endoftext|>" not in t]
    texts.append(SHAKESPEARE.read_text(encoding="utf-8")[:5000])
    for text in texts:
        assert toks["hf"].encode(text) == ref(text, add_special_tokens=False)["input_ids"], text


def test_hf_pair_errors(hf_dir, tmp_path):
    with pytest.raises(DataError, match="vocab.json"):
        hf_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "merges.txt").write_text((hf_dir / "merges.txt").read_text(encoding="utf-8"))
    with pytest.raises(DataError, match="vocab.json"):
        hf_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text((hf_dir / "vocab.json").read_text(encoding="utf-8"))
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(DataError, match="merges.txt"):
        hf_tokenizer(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nthree parts here\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"merges\.txt:3"):
        hf_tokenizer(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ zzzzq\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"merges\.txt:2.*not in vocab\.json"):
        hf_tokenizer(tmp_path)


# ------------------------------------------------------------------------------------ loading, dispatch


def test_load_tokenizer_errors(toks, tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match=str(missing)):
        load_tokenizer(missing)
    corrupt = tmp_path / "tokenizer.json"
    for content in ("{truncated", "[1, 2]", '{"format": 1, "kind": "char"}', '{"format": 1, "kind": "x"}'):
        corrupt.write_text(content)
        with pytest.raises(DataError, match=str(corrupt)):
            load_tokenizer(tmp_path)
    state = toks["gpt2"].to_state()
    state["mergeable_ranks"]["@@not base64@@"] = 1
    corrupt.write_text(json.dumps(state))
    with pytest.raises(DataError, match=str(corrupt)):
        load_tokenizer(corrupt)


def test_build_tokenizer_dispatch(shakespeare, hf_dir):
    def never():
        raise AssertionError("texts_factory must not be called for a fixed vocabulary")

    assert build_tokenizer("char", lambda: ["ab", "c"]).encode("cab") == [2, 0, 1]
    assert build_tokenizer("bpe", lambda: iter([shakespeare]), vocab_size=300).vocab_size == 300
    assert build_tokenizer("gpt2", never).encode("Hello world") == [15496, 995]
    assert build_tokenizer("hf", never, path=str(hf_dir)).encode("Hello world") == [15496, 995]
    with pytest.raises(ConfigError, match="data.tokenizer_path"):
        build_tokenizer("hf", never)
    with pytest.raises(ConfigError, match=r"data\.tokenizer.*char, bpe, gpt2, hf"):
        build_tokenizer("wordpiece", never)
