"""Text encoding: T5 exactly as diffusers' CogVideoX pipeline does it, and the LLM's query, answer and
instruction tokens that the token fuser merges in (spec section 2)."""

from __future__ import annotations

import logging
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
    llm: torch.Tensor  # [B, m, llm_dim] query tokens then answer tokens
    llm_mask: torch.Tensor  # [B, m] 1 for real tokens
    instructions: torch.Tensor | None  # [B, K, llm_dim], None when K = 0

    def to(self, device=None, dtype=None) -> TextFeatures:
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return TextFeatures(move(self.t5), move(self.llm), self.llm_mask.to(device), move(self.instructions))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"t5": self.t5, "llm": self.llm, "llm_mask": self.llm_mask}
        if self.instructions is not None:
            out["instructions"] = self.instructions
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

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

    def _ids(self, text: str) -> list[int]:
        return text_ids(self.tokenizer, text)

    @property
    def device(self):
        return self.llm.device

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.llm(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        return out.hidden_states[self.config.llm_hidden_layer]

    def _answer(self, ids: list[int], seed: int | None, callback: TokenCallback | None) -> list[int]:
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
                                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        answer = out[0, len(ids):].tolist()
        ends = [i for i, token in enumerate(answer) if token in self._end_ids()]
        return answer[:ends[0]] if ends else answer

    def _end_ids(self) -> set[int]:
        """Every id generation stops at: the generation config's (Phi-3.5: <|end|> 32007, 32001, 32000) and the
        tokenizer's eos, so the stop token's state never joins the answer."""
        configured = getattr(getattr(self.llm, "generation_config", None), "eos_token_id", None)
        configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
        return {*configured, self.tokenizer.eos_token_id} - {None}

    @torch.no_grad()
    def encode_one(self, prompt: str, seed: int | None = None, callback: TokenCallback | None = None):
        """-> (tokens [m, D], instruction tokens [K, D] or None) for one prompt."""
        cfg = self.config
        query = self._ids(prompt)
        context = self.prefix + query + self.suffix
        answer = self._answer(context, seed, callback) if cfg.answer_tokens else []
        if len(query) + len(answer) > cfg.text_len:
            logger.warning("LLM query + answer tokens (%d) exceed text_len %d: the rest is cut",
                           len(query) + len(answer), cfg.text_len)
        ids = torch.tensor([context + answer], device=self.device)
        hidden = self._hidden(ids, torch.ones_like(ids))[0]
        start = len(self.prefix)
        tokens = torch.cat([hidden[start:start + len(query)], hidden[len(context):]])
        instructions = self._instructions(context) if cfg.stabilizer_tokens else None
        return tokens, instructions

    def _instructions(self, context: list[int]) -> torch.Tensor:
        rows = [context + self._ids(text) for text in self.config.instructions]
        longest = max(map(len, rows))
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows], device=self.device)
        hidden = self._hidden(ids, mask)
        last = torch.tensor([len(r) - 1 for r in rows], device=self.device)
        return hidden[torch.arange(len(rows), device=self.device), last]

    def __call__(self, prompts: list[str], seed: int | None = None, callback: TokenCallback | None = None):
        """-> (tokens [B, m, D], mask [B, m], instructions [B, K, D] or None); batch padded with mask 0."""
        encoded = [self.encode_one(p, seed, callback) for p in prompts]
        longest = max(1, max(t.shape[0] for t, _ in encoded))
        tokens = torch.stack([F.pad(t, (0, 0, 0, longest - t.shape[0])) for t, _ in encoded])
        mask = torch.stack([(torch.arange(longest, device=t.device) < t.shape[0]).long() for t, _ in encoded])
        instructions = torch.stack([i for _, i in encoded]) if self.config.stabilizer_tokens else None
        return tokens, mask, instructions
