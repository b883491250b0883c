"""A character-level tokenizer built offline with `tokenizers`, saved as a PreTrainedTokenizerFast."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Printable ASCII without the control-like whitespace: space .. '~'.
CHARACTERS = tuple(chr(c) for c in range(32, 127))


def char_vocabulary() -> dict[str, int]:
    """Token → id: the special tokens first (pad = 0), then one id per printable character."""
    tokens = list(SPECIAL_TOKENS) + [c for c in CHARACTERS if c not in SPECIAL_TOKENS]
    return {tok: i for i, tok in enumerate(tokens)}


def build_char_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A tokenizer that maps every printable ASCII character to its own id.

    With `add_bos`, encoding prepends <s> (a post-processor); decoding fuses characters back.
    """
    vocab = char_vocabulary()
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.decoder = decoders.Fuse()
    if add_bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )

