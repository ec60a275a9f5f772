"""Text encoding: T5 exactly as diffusers' CogVideoX pipeline does it, and the LLM's query, answer and
instruction tokens that the token fuser merges in (spec section 2)."""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import StoppingCriteria, StoppingCriteriaList

from .fuser import FuserConfig
from .variants import T5_TEXT_LEN

logger = logging.getLogger(__name__)
_SENTINEL = "MIMIRPROMPTSENTINEL"
TokenCallback = Callable[[int, int], None]  # (answer tokens generated, answer_tokens): progress, interruption


@dataclass
class TextFeatures:
    """What the frozen encoders make of a batch of prompts: the token fuser's input."""

    t5: torch.Tensor  # [B, n, t5_dim]
    llm: torch.Tensor | None = None  # [B, m, llm_dim] query tokens then answer tokens; None: T5 alone
    llm_mask: torch.Tensor | None = None  # [B, m] 1 for real tokens
    instructions: torch.Tensor | None = None  # [B, K, llm_dim], None when K = 0

    def to(self, device=None, dtype=None) -> TextFeatures:
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        mask = None if self.llm_mask is None else self.llm_mask.to(device)
        return TextFeatures(move(self.t5), move(self.llm), mask, move(self.instructions))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"t5": self.t5, "llm": self.llm, "llm_mask": self.llm_mask, "instructions": self.instructions}
        return {k: v.detach().contiguous().cpu() for k, v in out.items() if v is not None}

    def split(self) -> list[TextFeatures]:
        """A batch -> one TextFeatures per prompt (batch 1, on the CPU), LLM tokens cut to the prompt's length."""
        out = []
        for i in range(self.t5.shape[0]):
            length = int(self.llm_mask[i].sum())
            instructions = None if self.instructions is None else self.instructions[i:i + 1]
            out.append(TextFeatures(self.t5[i:i + 1], self.llm[i:i + 1, :length], self.llm_mask[i:i + 1, :length],
                                    instructions).to("cpu"))
        return out

    @classmethod
    def cat(cls, items: list[TextFeatures]) -> TextFeatures:
        """Per-prompt features -> a batch, LLM tokens right-padded with mask 0 as LLMTextEncoder pads them."""
        longest = max(1, max(f.llm.shape[1] for f in items))
        llm = torch.cat([F.pad(f.llm, (0, 0, 0, longest - f.llm.shape[1])) for f in items])
        mask = torch.cat([F.pad(f.llm_mask, (0, longest - f.llm_mask.shape[1])) for f in items])
        instructions = None if items[0].instructions is None else torch.cat([f.instructions for f in items])
        return cls(torch.cat([f.t5 for f in items]), llm, mask, instructions)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> TextFeatures:
        missing = {"t5", "llm", "llm_mask"} - set(tensors)
        if missing:
            raise ValueError(f"text features lack {sorted(missing)}")
        return cls(tensors["t5"], tensors["llm"], tensors["llm_mask"], tensors.get("instructions"))

    def save(self, path, metadata: dict[str, str] | None = None) -> None:
        save_file(self.tensors(), str(path), metadata={"format": "mimir-text-features", **(metadata or {})})

    @classmethod
    def load(cls, path) -> TextFeatures:
        return cls.from_tensors(load_file(str(path)))


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """The words of `prompt` (split at spaces) that `tokenizer` reads, at least in part, as its unknown token:
    the model sees nothing of them. Word-level tokenizers (the demo's) do so for every word outside their
    vocabulary; sentencepiece ones (T5, Llama) for characters outside theirs."""
    words = prompt.split()
    if tokenizer.unk_token_id is None or not words:
        return []
    ids = tokenizer(words, add_special_tokens=False).input_ids
    return [word for word, word_ids in zip(words, ids) if tokenizer.unk_token_id in word_ids]


def encode_t5(tokenizer, text_encoder, prompts: list[str], max_length: int = T5_TEXT_LEN, device=None,
              dtype=None) -> torch.Tensor:
    """T5 features as `CogVideoXPipeline._get_t5_prompt_embeds`: padded to max_length, truncated, no mask."""
    device = device or text_encoder.device
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > max_length:
        dropped = int((full != tokenizer.pad_token_id).sum(-1).max()) - max_length
        if dropped > 0:
            logger.warning("prompt is longer than the T5 limit of %d tokens: %d tokens were dropped", max_length, dropped)
    with torch.no_grad():
        embeds = text_encoder(ids.to(device))[0]
    return embeds.to(device=device, dtype=dtype or embeds.dtype)


class _EveryStep(StoppingCriteria):
    """Calls back once per generated token (progress, interruption); never stops generation itself."""

    def __init__(self, callback: TokenCallback, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.done += 1
        self.callback(self.done, self.total)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def chat_template_parts(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids the chat template puts before and after the user's prompt: the LLM reads
    prefix + prompt + suffix (+ an instruction), and the query tokens are cropped out between them."""
    tok = tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and tok("x").input_ids[:1] == [tok.bos_token_id] else []
    if not getattr(tok, "chat_template", None):
        return bos, []
    text = tok.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                   add_generation_prompt=True)
    before, after = text.split(_SENTINEL)
    if tok.bos_token and before.startswith(tok.bos_token):
        bos = []
    return bos + text_ids(tok, before), text_ids(tok, after)


class LLMTextEncoder:
    """Hidden states of a transformers causal LM for the fuser: query, answer and instruction tokens."""

    def __init__(self, llm, tokenizer, config: FuserConfig):
        self.llm, self.tokenizer, self.config = llm, tokenizer, config
        if llm.config.hidden_size != config.llm_dim:
            raise ValueError(f"the fuser expects an LLM of hidden size {config.llm_dim}, but this LLM "
                             f"({type(llm).__name__}) has hidden size {llm.config.hidden_size}")
        config.check_llm_depth(llm.config.num_hidden_layers)
        self.prefix, self.suffix = chat_template_parts(tokenizer)
        # the KV-cache argument is `cache` in transformers >= 5 and `past_key_values` before
        self._cache_kwarg = "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"

    def _ids(self, text: str) -> list[int]:
        return text_ids(self.tokenizer, text)

    @property
    def device(self):
        return self.llm.device

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache=None):
        """-> (hidden states of the chosen layer, the KV cache now also holding `ids`)."""
        out = self.llm(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=True,
                       **{self._cache_kwarg: cache})
        return out.hidden_states[self.config.llm_hidden_layer], _output_cache(out)

    def _answer(self, ids: list[int], seed: int | None, callback: TokenCallback | None):
        """-> (answer token ids, generate()'s output with its hidden states and KV cache)."""
        cfg = self.config
        if cfg.answer_sampling and seed is None:
            raise ValueError("answer_sampling is on: give an explicit seed so the answer tokens are reproducible")
        criteria = StoppingCriteriaList([_EveryStep(callback, cfg.answer_tokens)] if callback else [])
        tensor = torch.tensor([ids], device=self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            out = self.llm.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=cfg.answer_tokens,
                                    min_new_tokens=0, do_sample=cfg.answer_sampling, top_k=None, top_p=None,
                                    temperature=None, stopping_criteria=criteria,
                                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                                    output_hidden_states=True, return_dict_in_generate=True)
        answer = out.sequences[0, len(ids):].tolist()
        ends = [i for i, token in enumerate(answer) if token in self._end_ids()]
        return (answer[:ends[0]] if ends else answer), out

    def _end_ids(self) -> set[int]:
        """Every id generation stops at: the generation config's (Phi-3.5: <|end|> 32007, 32001, 32000) and the
        tokenizer's eos, so the stop token's state never joins the answer."""
        configured = getattr(getattr(self.llm, "generation_config", None), "eos_token_id", None)
        configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
        return {*configured, self.tokenizer.eos_token_id} - {None}

    @torch.no_grad()
    def encode_one(self, prompt: str, seed: int | None = None, callback: TokenCallback | None = None):
        """-> (tokens [m, D], instruction tokens [K, D] or None) for one prompt. The usual empty negative prompt
        is encoded once per loaded LLM and encoder settings (answers greedy), then reused."""
        if prompt == "" and not self.config.answer_sampling:
            return _empty_prompt_features(self, callback)
        return self._encode_one(prompt, seed, callback)

    def _encode_one(self, prompt: str, seed: int | None, callback: TokenCallback | None):
        cfg = self.config
        query = self._ids(prompt)
        context = self.prefix + query + self.suffix
        hidden, answer, cache = self._context_states(context, seed, callback)
        if len(query) + len(answer) > cfg.text_len:
            logger.warning("LLM query + answer tokens (%d) exceed text_len %d: the rest is cut",
                           len(query) + len(answer), cfg.text_len)
        start = len(self.prefix)
        tokens = torch.cat([hidden[start:start + len(query)], hidden[len(context):]])
        instructions = self._instructions(context, hidden[len(context) - 1], cache) if cfg.stabilizer_tokens else None
        return tokens, instructions

    def _context_states(self, context: list[int], seed, callback):
        """-> (hidden states [len(context) + len(answer), D], answer ids, KV cache of the context alone).
        Generation already read the context in one forward: its states and KV cache are kept, and only the
        answer tokens are read again, in one forward over that cache, instead of a second forward over prompt +
        answer. (The states generation computed token by token for the answer are not used: one-row matmuls
        round differently, and on the CPU their last bits even changed with where the weights sit in memory.)"""
        if not self.config.answer_tokens:
            ids = torch.tensor([context], device=self.device)
            hidden, cache = self._forward(ids, torch.ones_like(ids))
            return hidden[0], [], cache
        answer, out = self._answer(context, seed, callback)
        hidden, cache = out.hidden_states[0][self.config.llm_hidden_layer][0], _output_cache(out)
        _crop(cache, len(context))
        if answer:
            ids = torch.tensor([answer], device=self.device)
            more, cache = self._forward(ids, torch.ones(1, len(context) + len(answer), dtype=torch.long,
                                                        device=self.device), cache)
            hidden = torch.cat([hidden, more[0]])
            _crop(cache, len(context))
        return hidden, answer, cache

    def _instructions(self, context: list[int], context_last: torch.Tensor, cache) -> torch.Tensor:
        """Each instruction row reads the context from its KV cache (computed once) and then the instruction;
        its token is the state at the row's last position (the context's last one for an empty instruction)."""
        rows = [self._ids(text) for text in self.config.instructions]
        states = context_last.expand(len(rows), 1, -1)
        longest = max(map(len, rows))
        if longest:
            pad = self.tokenizer.pad_token_id or 0
            ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows], device=self.device)
            mask = torch.tensor([[1] * (len(context) + len(r)) + [0] * (longest - len(r)) for r in rows],
                                device=self.device)
            cache.batch_repeat_interleave(len(rows))
            states = torch.cat([states, self._forward(ids, mask, cache)[0]], dim=1)
        return states[torch.arange(len(rows), device=self.device), torch.tensor([len(r) for r in rows])]

    def __call__(self, prompts: list[str], seed: int | None = None, callback: TokenCallback | None = None):
        """-> (tokens [B, m, D], mask [B, m], instructions [B, K, D] or None); batch padded with mask 0."""
        return stack_encoded([self.encode_one(p, seed, callback) for p in prompts])


def stack_encoded(encoded: list[tuple[torch.Tensor, torch.Tensor | None]]):
    """[(tokens [m_i, D], instructions [K, D] or None)] -> (tokens [B, m, D], mask [B, m], instructions or None)."""
    longest = max(1, max(t.shape[0] for t, _ in encoded))
    tokens = torch.stack([F.pad(t, (0, 0, 0, longest - t.shape[0])) for t, _ in encoded])
    mask = torch.stack([(torch.arange(longest, device=t.device) < t.shape[0]).long() for t, _ in encoded])
    instructions = torch.stack([i for _, i in encoded]) if encoded[0][1] is not None else None
    return tokens, mask, instructions


def _crop(cache, length: int) -> None:
    """Keep the first `length` positions of a KV cache; a negative count removes that many (transformers 4 and 5)."""
    if cache.get_seq_length() > length:
        cache.crop(length - cache.get_seq_length())


def _output_cache(output):
    """The KV cache of a model or generate() output: `cache` in transformers >= 5, `past_key_values` before."""
    return output["cache"] if "cache" in output.keys() else output["past_key_values"]


# LLM -> {inputs and settings: features of the empty prompt}; weak, so it goes when the LLM is released
_EMPTY_PROMPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _empty_prompt_features(encoder: LLMTextEncoder, callback: TokenCallback | None):
    """encode_one("") computed once per LLM: CFG's usual negative prompt costs one generation per loaded model,
    not one per video. Keyed by everything the result depends on (token ids in, generation settings, dtype,
    device), so another tokenizer or config encodes anew. The LLM is frozen: its weights never change."""
    cfg = encoder.config
    key = (tuple(encoder.prefix + encoder.suffix), tuple(tuple(encoder._ids(t)) for t in cfg.instructions),
           cfg.answer_tokens, cfg.llm_hidden_layer, encoder.tokenizer.pad_token_id, tuple(sorted(encoder._end_ids())),
           str(encoder.llm.dtype), str(encoder.device))
    memo = _EMPTY_PROMPT.setdefault(encoder.llm, {})
    if key not in memo:
        memo[key] = encoder._encode_one("", None, callback)
    return memo[key]
