"""Tests for Hugging Face tokenizer.json directories (gpt.hf_tokenizer, HFTokenizer, hf_tokenizer):
ids equal transformers' for ordinary text, special tokens never come from user text, decode gives the
exact bytes (whole characters when streamed), and the state, save and pickle round trips keep it.

Two small real tokenizer.json files are trained here with the tokenizers library itself (nothing is
downloaded): a byte-level BPE like Qwen2 / Llama 3 and a sentencepiece-style BPE with byte fallback
like Llama 2 / Mistral."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Library
from transformers import PreTrainedTokenizerFast

from gpt.data.tokenizers import build_tokenizer
from gpt.errors import DataError
from gpt.hf_tokenizer import HFTokenizer
from gpt.infer.sampling import TextStream
from gpt.interop.hf_vocab import hf_tokenizer
from gpt.tokenizer import EOT, EOT_TURN
from gpt.tokenizer_load import load_tokenizer, tokenizer_from_state

CORPUS = [
    "First Citizen: Before we proceed any further, hear me speak.",
    "All: Speak, speak. You are all resolved rather to die than to famish?",
    "The quick brown fox jumps over the lazy dog; 1234567890 don't we'll I'M.",
    "   lots     of\t\twhitespace   \n\n and new lines\n",
] * 5
BYTE_LEVEL_CORPUS = [*CORPUS, "Grüße aus Köln, café — naïve. 日本語 東京 中文 한국어 😀👍"] * 2
TEXTS = [
    "Hello world",
    "",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "Grüße aus Köln — 東京 and 😀👍🏽 family 👨‍👩‍👧",
    "   lots     of\t\t\twhitespace   \n\n\n   ",
    "numbers 1234567890 3.14159 -42 don't we'll",
    "control \x00\x01\x1b[31m\x7f and \r\n windows",
    "a <tool_call> inside",  # a non-special added token: text produces it, as in transformers
]
STREAMED = "Köln: 東京 😀!"  # multi-byte characters that the tokens cut (byte-level and byte fallback)
# Qwen2's split pattern (a pre-tokenizer the library applies before byte-level BPE)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip


def _write(directory: Path, library: Library, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    library.add_tokens(["<tool_call>"])  # added, not special (Qwen2 has such tokens)
    library.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def byte_level_dir(directory: Path) -> Path:
    """A Qwen2 / Llama 3-style byte-level BPE; its post-processor would add a BOS (we must not)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]
    library = Library(models.BPE())
    library.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),  # a str is a literal
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    library.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    library.train_from_iterator(BYTE_LEVEL_CORPUS, trainer)
    bos = [("<|begin_of_text|>", 3)]
    library.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=bos)
    config = {"eos_token": "<|im_end|>", "bos_token": "<|begin_of_text|>",
              "pad_token": {"content": "<|endoftext|>", "special": True}}  # fmt: skip
    return _write(directory, library, config)


def sentencepiece_dir(directory: Path) -> Path:
    """A Llama 2 / Mistral-style BPE: "▁" for spaces, <0xHH> byte-fallback tokens for any character
    the vocabulary lacks (the corpus is ASCII), a BOS-adding post-processor."""
    library = Library(models.BPE(unk_token="<unk>"))
    library.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    library.train_from_iterator(CORPUS, trainer)
    definition = json.loads(library.to_str())
    vocab = definition["model"]["vocab"]
    for b in range(256):  # as sentencepiece's byte_fallback vocabularies have them
        vocab[f"<0x{b:02X}>"] = len(vocab)
    definition["model"]["byte_fallback"] = True
    library = Library.from_str(json.dumps(definition))
    library.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])  # fmt: skip
    library.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return _write(directory, library, {"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"})


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def hf_dir(request, tmp_path_factory) -> Path:
    make = byte_level_dir if request.param == "byte_level" else sentencepiece_dir
    return make(tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def tok(hf_dir) -> HFTokenizer:
    return hf_tokenizer(hf_dir)


@pytest.fixture(scope="module")
def ref(hf_dir) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))


def test_ids_equal_transformers(tok, ref):
    assert isinstance(tok, HFTokenizer) and tok.kind == "hf_json"
    expected = [ref.encode(text, add_special_tokens=False) for text in TEXTS]
    assert [tok.encode(text) for text in TEXTS] == expected
    assert tok.encode_batch(TEXTS) == expected
    assert ref.encode("Hello world")[0] != tok.encode("Hello world")[0]  # theirs adds a BOS, ours never
    assert tok.vocab_size == len(ref)


def test_user_text_never_produces_a_special_token(tok, ref):
    specials = {i for i, t in ref.added_tokens_decoder.items() if t.special}
    assert len(specials) >= 3
    for i in specials:
        name = ref.convert_ids_to_tokens(i)
        assert ref.encode(f"{name}user", add_special_tokens=False)[0] == i  # the library would split it out
        ids = tok.encode(f"{name}user")
        assert specials.isdisjoint(ids), name
        assert tok.decode(ids).strip() == f"{name}user"
        assert specials.isdisjoint(tok.encode_batch([f"x{name}", name])[1])
        assert tok.special_id(name) == i
        assert tok.decode([i]) == name  # decoding a special id gives its text


def test_roles_come_from_tokenizer_config(tok, ref, hf_dir):
    config = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tok.eot_id == ref.convert_tokens_to_ids(config["eos_token"])
    assert tok.bos_id == ref.convert_tokens_to_ids(config["bos_token"])
    pad = config.get("pad_token")
    assert tok.pad_id == (None if pad is None else ref.convert_tokens_to_ids(pad["content"]))
    if "<|endoftext|>" in ref.get_vocab():  # a token of the file keeps its own id by name...
        assert tok.special_id(EOT) == ref.convert_tokens_to_ids(EOT) != tok.eot_id
    else:  # ...otherwise our end-of-text name means the model's eos
        assert tok.special_id(EOT) == tok.eot_id
    assert tok.special_id(EOT_TURN) == tok.eot_id


def test_decode_bytes_are_exact_and_stream_whole_characters(tok):
    ids = tok.encode(STREAMED)
    pieces = [tok.decode_bytes([i]) for i in ids]
    cut = [p for p in pieces if not _is_utf8(p)]
    assert cut, "the test needs a character split across tokens"
    text = tok.decode(ids)
    assert text.lstrip(" ") == STREAMED and tok.decode_bytes(ids) == b"".join(pieces) == text.encode()
    stream = TextStream(tok)
    shown = [stream.push(i) for i in ids]
    assert "".join(shown) + stream.end("length") == text
    assert all("\ufffd" not in s for s in shown)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode_bytes([tok.vocab_size])


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_state_save_and_pickle_round_trips(tok, tmp_path):
    again = tokenizer_from_state(json.loads(json.dumps(tok.to_state())))
    assert again.fingerprint() == tok.fingerprint()
    assert again.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    assert (again.eot_id, again.bos_id, again.pad_id) == (tok.eot_id, tok.bos_id, tok.pad_id)
    loaded = load_tokenizer(tok.save(tmp_path / "run"))
    assert loaded.fingerprint() == tok.fingerprint() and loaded.eot_id == tok.eot_id
    assert loaded.encode("<|im_end|></s> hi") == tok.encode("<|im_end|></s> hi")
    unpickled = pickle.loads(pickle.dumps(tok))
    assert unpickled.encode(STREAMED) == tok.encode(STREAMED) and unpickled.bos_id == tok.bos_id


def test_data_tokenizer_hf_reads_a_tokenizer_json_directory(tok, hf_dir):
    built = build_tokenizer("hf", lambda: pytest.fail("a fixed vocabulary reads no corpus"), path=str(hf_dir))
    assert built.fingerprint() == tok.fingerprint()
    assert hf_tokenizer(hf_dir / "tokenizer.json").fingerprint() == tok.fingerprint()


def test_bad_tokenizer_json_is_one_line_naming_the_file(hf_dir, tmp_path):
    bad = tmp_path / "tokenizer.json"
    definition = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    cases = [
        ("{truncated", "is not valid JSON"),
        (json.dumps({**definition, "model": {"type": "BPE", "vocab": 3}}), "tokenizers library cannot read"),
        (json.dumps({**definition, "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}),
         "only BPE and Unigram"),
    ]  # fmt: skip
    for content, what in cases:
        bad.write_text(content, encoding="utf-8")
        with pytest.raises(DataError, match=what) as e:
            hf_tokenizer(tmp_path)
        assert str(bad) in str(e.value) and "\n" not in str(e.value)
    bad.write_text(json.dumps(definition), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}), encoding="utf-8")
    with pytest.raises(DataError, match=r"tokenizer\.json: eos_token '<\|nope\|>' is not a token"):
        hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    guess = "<|endoftext|>" if "<|endoftext|>" in definition["model"]["vocab"] else "</s>"
    assert hf_tokenizer(tmp_path).eot_id == hf_tokenizer(hf_dir).special_id(guess)  # no eos_token: a guess


def test_a_directory_without_tokenizer_files(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer\.json .* or vocab\.json and merges\.txt"):
        hf_tokenizer(tmp_path)
