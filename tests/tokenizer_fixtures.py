"""Small local stand-ins for tests and benchmarks: a ChatML-style tokenizer.json built on the spot."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
DEFAULT_CORPUS = ("system\nuser\nassistant\n", "What color is it?", "Red.", "Why?", "It is red because it is.",
                  "Describe the image briefly.", "A cat on a mat.")


def build_tokenizer_json(path: str, corpus: Iterable[str] = DEFAULT_CORPUS,
                         extra_specials: Sequence[str] = ()) -> str:
    """Writes a word-level, byte-level-pretokenized tokenizer.json shaped like Qwen's and returns its path.

    Qwen-like: ByteLevel pre-tokenizer ("\\n" -> "Ċ", " color" -> "Ġcolor") and the ChatML special tokens
    (<|endoftext|> as pad, <|im_start|>, <|im_end|>); words outside `corpus` map to <unk>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(CHATML_SPECIALS) + [s for s in extra_specials if s not in CHATML_SPECIALS]
    tok.train_from_iterator(list(corpus), trainers.WordLevelTrainer(special_tokens=specials))
    tok.save(str(path))
    return str(path)


def build_bpe_tokenizer_json(path: str, corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 400) -> str:
    """A byte-level BPE tokenizer.json like Qwen's: BPE merges learned from `corpus` over the 256 byte symbols, and
    Qwen's special tokens (<|endoftext|>, <|im_start|>, <|im_end|>) as added tokens, plus <image>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                         "<|im_end|>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) * 20, trainer)
    tok.save(str(path))
    return str(path)
