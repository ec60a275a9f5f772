"""Word-level tokenizers built offline: one token per word of a closed vocabulary, as the demo world's captions
need. kind="t5" appends </s> like T5's tokenizer and has T5's sentinels <extra_id_k> for span corruption;
kind="llm" has a Phi-3-style chat template."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# Phi-3 style chat markup; special tokens are matched before word splitting.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
LLM_SPECIALS = ["<pad>", "<s>", "<|end|>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]


def word_tokenizer(words, kind: str = "t5", extra_ids: int = 0) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer. kind="t5" appends </s> like T5 and has `extra_ids` sentinels
    <extra_id_0> ... (T5's span-corruption markers); kind="llm" has a chat template."""
    sentinels = [f"<extra_id_{k}>" for k in range(extra_ids)]
    specials = ["<pad>", "</s>", "<unk>", *sentinels] if kind == "t5" else LLM_SPECIALS
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                       additional_special_tokens=sentinels)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|end|>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
