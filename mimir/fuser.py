"""The Mimir token fuser (paper Fig. 2): merges T5 tokens with decoder-only LLM tokens for the video DiT.

    e_theta = t5 + Z_theta(t5)                  residual zero-initialised linear on the T5 branch
    e_beta  = Z_beta(s * Norm(llm)) * mask      LLM branch, padded slots exactly zero
    e_s     = P(instr) + e_l                    semantic stabilizer, P = zero-initialised Linear(Norm(.))
    c       = concat(e_theta + e_beta, e_s)     [B, text_len + stabilizer_tokens, t5_dim]

A fresh fuser returns the T5 stream unchanged and e_s == e_l, so training starts from the pretrained prior.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .variants import T5_TEXT_LEN

DEFAULT_INSTRUCTIONS = (
    "Describe the detailed motion of objects in video.",
    "Describe the detailed color of objects in video.",
    "Describe the detailed spatial relationships and positions of objects in video.",
    "Describe the detailed number of objects in video.",
)
FORMAT = "mimir-token-fuser"


@dataclass
class FuserConfig:
    t5_dim: int = 4096  # also the DiT's text width: the fused stream keeps T5's width
    llm_dim: int = 3072  # Phi-3.5-mini hidden size
    text_len: int = T5_TEXT_LEN  # n: CogVideoX's T5 length; LLM tokens are cut/padded to it
    stabilizer_tokens: int = 4  # K; 0 disables instruction tokens and e_l
    instructions: tuple[str, ...] = DEFAULT_INSTRUCTIONS
    answer_tokens: int = 32  # LLM-generated tokens appended to the query tokens; 0 disables
    answer_sampling: bool = False  # greedy by default; sampling needs an explicit seed
    llm_hidden_layer: int = -1  # index into the LLM's hidden_states

    def __post_init__(self):
        self.instructions = tuple(self.instructions)
        for name in ("t5_dim", "llm_dim", "text_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"FuserConfig.{name} must be positive, got {getattr(self, name)}")
        if self.stabilizer_tokens < 0 or self.answer_tokens < 0:
            raise ValueError("FuserConfig.stabilizer_tokens and answer_tokens must be >= 0")
        if len(self.instructions) != self.stabilizer_tokens:
            raise ValueError(f"FuserConfig: {len(self.instructions)} instructions given but stabilizer_tokens="
                             f"{self.stabilizer_tokens}; there must be one instruction per stabilizer token")

    @property
    def out_len(self) -> int:
        return self.text_len + self.stabilizer_tokens

    def check_llm_depth(self, num_hidden_layers: int, where: str = "the fuser") -> None:
        """llm_hidden_layer indexes the LLM's hidden_states (the embeddings, then one entry per layer): refuse
        an index out of range before any text is encoded."""
        n = num_hidden_layers + 1
        if not -n <= self.llm_hidden_layer < n:
            raise ValueError(f"{where}: llm_hidden_layer {self.llm_hidden_layer} is out of range for an LLM with "
                             f"{num_hidden_layers} layers: its hidden_states has {n} entries, so the index must be "
                             f"in {-n}..{n - 1}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> FuserConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"the fuser config must be a JSON object, not {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"fuser config has unknown fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)


def _zero_linear(fan_in: int, fan_out: int) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def align_tokens(tokens: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut or right-pad [B, m, D] tokens and their [B, m] mask to `length` (padding has mask 0)."""
    m = tokens.shape[1]
    if m >= length:
        return tokens[:, :length], mask[:, :length]
    pad = length - m
    return F.pad(tokens, (0, 0, 0, pad)), F.pad(mask, (0, pad))


class TokenFuser(nn.Module):
    def __init__(self, config: FuserConfig):
        super().__init__()
        self.config = config
        self.z_theta = _zero_linear(config.t5_dim, config.t5_dim)
        self.z_beta = _zero_linear(config.llm_dim, config.t5_dim)
        self.scale = nn.Parameter(torch.ones(1))  # [1], not 0-dim: FSDP cannot shard a scalar parameter
        if config.stabilizer_tokens:
            self.instruction_proj = _zero_linear(config.llm_dim, config.t5_dim)
            self.stabilizer = nn.Parameter(torch.randn(config.stabilizer_tokens, config.t5_dim) * 0.02)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics: LLM hidden states of bf16 models reach magnitudes where bf16 norms lose precision
        return F.layer_norm(x.float(), x.shape[-1:]).to(self.z_beta.weight.dtype)

    def forward(self, t5: torch.Tensor, llm: torch.Tensor, llm_mask: torch.Tensor,
                instructions: torch.Tensor | None = None) -> torch.Tensor:
        """t5 [B, n, t5_dim], llm [B, m, llm_dim] with llm_mask [B, m], instructions [B, K, llm_dim] -> [B, n+K, t5_dim]."""
        self.check_inputs(t5, llm, llm_mask, instructions)
        dtype = self.z_theta.weight.dtype
        t5 = t5.to(dtype)
        llm, llm_mask = align_tokens(llm, llm_mask, t5.shape[1])
        e_theta = t5 + self.z_theta(t5)
        e_beta = self.z_beta(self.scale * self._norm(llm)) * llm_mask.unsqueeze(-1).to(dtype)
        fused = e_theta + e_beta
        if not self.config.stabilizer_tokens:
            return fused
        e_s = self.instruction_proj(self._norm(instructions)) + self.stabilizer.to(dtype)
        return torch.cat([fused, e_s], dim=1)

    def check_inputs(self, t5, llm, llm_mask, instructions):
        cfg = self.config
        if t5.ndim != 3 or t5.shape[-1] != cfg.t5_dim:
            raise ValueError(f"TokenFuser: T5 features must be [B, n, {cfg.t5_dim}], got {list(t5.shape)}")
        if llm.ndim != 3 or llm.shape[-1] != cfg.llm_dim:
            raise ValueError(f"TokenFuser: LLM features must be [B, m, {cfg.llm_dim}] (fuser llm_dim), "
                             f"got {list(llm.shape)}; was the fuser trained for another LLM?")
        if llm_mask.shape != llm.shape[:2]:
            raise ValueError(f"TokenFuser: LLM mask {list(llm_mask.shape)} does not match LLM features {list(llm.shape)}")
        if cfg.stabilizer_tokens:
            want = [t5.shape[0], cfg.stabilizer_tokens, cfg.llm_dim]
            if instructions is None or list(instructions.shape) != want:
                got = None if instructions is None else list(instructions.shape)
                raise ValueError(f"TokenFuser: instruction tokens must be {want}, got {got}")


def save_fuser(fuser: TokenFuser, path, extra_metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in fuser.state_dict().items()}
    metadata = {"format": FORMAT, "config": fuser.config.to_json(), **(extra_metadata or {})}
    save_file(tensors, str(path), metadata=metadata)


def read_fuser_config(path) -> FuserConfig:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:
        raise ValueError(f"{path}: not a readable .safetensors file ({exc})") from exc
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise ValueError(f"{path}: not a Mimir token-fuser file (its safetensors metadata has no fuser config)")
    try:
        return FuserConfig.from_json(metadata["config"])
    except (ValueError, TypeError) as exc:  # invalid JSON (with its line and column), unknown or invalid fields
        raise ValueError(f"{path}: the fuser config in its metadata is not valid: {exc}") from exc


def load_fuser(path, device="cpu", dtype: torch.dtype = torch.float32) -> TokenFuser:
    """Load a fuser file, checking every tensor name and shape against the config stored inside it."""
    config = read_fuser_config(path)
    fuser = TokenFuser(config)
    expected = {k: tuple(v.shape) for k, v in fuser.state_dict().items()}
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    if "scale" in state and state["scale"].ndim == 0:  # files written before the scale became [1]
        state["scale"] = state["scale"].reshape(1)
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: shape {tuple(state[k].shape)} but the config needs {expected[k]}"
                 for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if problems:
        raise ValueError(f"{path}: fuser weights do not match its config: " + "; ".join(problems))
    fuser.load_state_dict(state)
    return fuser.to(device=device, dtype=dtype).eval()
