"""IMSM's gate (Song et al., AAAI 2025): interweave the final hidden states of a siamese pair.

    g   = sigmoid([hq_M ; h_M ; h_M' ; hq_M'] @ W_A @ W_B)     W_A: 4d x r, W_B: r x d, no bias
    h   = g * h_M + (1 - g) * h_M'                              element-wise, then one LM head

``h_M``/``h_M'`` are the frozen base's and the adapted model's final hidden states (after the last
norm) at this position, ``hq_M``/``hq_M'`` their means over the prompt tokens. Weights live in
safetensors as torch Linear layouts: ``proj_a.weight [r, 4d]``, ``proj_b.weight [d, r]`` (``[r, 2d]``
for the "w/o query" variant, which drops the two prompt means). A scalar gate ``g`` needs no
weights and equals logit interpolation ``g * z_M + (1 - g) * z_M'`` ("w/o gate" is g = 0.5).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError


def prompt_means(hidden: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [B, L, d]`` over the positions where ``prompt [B, L]`` is true: ``[B, 1, d]``."""
    weights = prompt.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1)


class ImsmGate(nn.Module):
    """The element-wise gate. ``forward`` returns g ``[..., d]`` in (0, 1)."""

    def __init__(self, hidden_size: int, rank: int = 8, use_query: bool = True, dropout: float = 0.1) -> None:
        super().__init__()
        self.hidden_size, self.rank, self.use_query = hidden_size, rank, use_query
        streams = 4 if use_query else 2
        self.proj_a = nn.Linear(streams * hidden_size, rank, bias=False)
        self.proj_b = nn.Linear(rank, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)  # active in training mode only

    def forward(self, hq_base, h_base, h_adapted, hq_adapted) -> torch.Tensor:
        """All inputs ``[..., d]`` (the prompt means broadcast); returns g ``[..., d]``."""
        parts = [hq_base, h_base, h_adapted, hq_adapted] if self.use_query else [h_base, h_adapted]
        parts = torch.broadcast_tensors(*parts)
        x = torch.cat(parts, dim=-1).to(self.proj_a.weight.dtype)
        return torch.sigmoid(self.dropout(self.proj_b(self.dropout(self.proj_a(x)))))

    def save(self, directory: str | Path) -> None:
        """Write ``gate.safetensors`` and ``gate.json`` (its settings) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, directory / "gate.safetensors")
        settings = {"hidden_size": self.hidden_size, "rank": self.rank, "use_query": self.use_query}
        (directory / "gate.json").write_text(json.dumps(settings, indent=2))

    @classmethod
    def load(cls, path: str | Path, hidden_size: int) -> ImsmGate:
        """Load from a ``.safetensors`` file, or a folder holding ``gate.safetensors``.

        Rank and variant are read off the tensor shapes; they must fit ``hidden_size``.
        """
        path = Path(path)
        file = path / "gate.safetensors" if path.is_dir() else path
        if not file.exists():
            raise ConfigError(f"gate file {str(file)!r} does not exist", param="params.gate")
        state = load_file(str(file))
        if set(state) != {"proj_a.weight", "proj_b.weight"}:
            raise ConfigError(
                f"gate file {str(file)!r} must hold exactly proj_a.weight and proj_b.weight, has {sorted(state)}",
                param="params.gate",
            )
        rank, width = state["proj_a.weight"].shape
        if width not in (4 * hidden_size, 2 * hidden_size) or tuple(state["proj_b.weight"].shape) != (hidden_size, rank):
            raise ConfigError(
                f"gate shapes proj_a {tuple(state['proj_a.weight'].shape)}, proj_b "
                f"{tuple(state['proj_b.weight'].shape)} do not fit hidden size {hidden_size}",
                param="params.gate",
            )
        gate = cls(hidden_size, rank, use_query=width == 4 * hidden_size)
        gate.load_state_dict(state)
        return gate.eval()


def interweave(gate: ImsmGate | float, hq_base, h_base, h_adapted, hq_adapted) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse the two streams: returns ``(h [B, d], g_mean [B])``; ``gate`` a module or a scalar g."""
    if isinstance(gate, ImsmGate):
        g = gate(hq_base, h_base, h_adapted, hq_adapted).to(h_base.dtype)
        return g * h_base + (1 - g) * h_adapted, g.float().mean(dim=-1)
    g = float(gate)
    mean = torch.full(h_base.shape[:-1], g, device=h_base.device)
    return g * h_base + (1 - g) * h_adapted, mean
