"""What every Triton launcher does before a launch: check the inputs, then plan the grid.

Contract of the checks (each raises ``ValueError`` naming the argument):

- ``member_logits``: a stacked ``[K, B, V]`` tensor or a sequence of K ``[B, V]`` tensors, each
  float32, bfloat16 or float16, all on one device, 1 <= K <= ``MAX_MEMBERS``. Members may be
  strided in any way; when they do not share one (row stride, vocab stride) pair, they are made
  contiguous here (a copy), because the kernels take one stride pair for all members.
- per-row and per-member side inputs (``weights [B, K]``, ``temperature [B]``, ...) must have the
  stated shape and live on the members' device. Their values are not read on the host (that
  would cost a device sync on every step): weights must be >= 0 and temperatures > 0, as the
  reference documents.

``plan(vocab_size, batch_size, device)`` picks the path, and the launchers record it so tests can assert it:

- ``"single"``: ``V <= block``; one program per row holds the whole row in registers and reads
  the members once.
- ``"chunked"``: any V; the row is cut into ``segments`` runs of ``segment_len`` columns (a whole
  number of ``block`` tiles), one program per (row, segment) walks its tiles with an online
  max/sum, and a second kernel combines the segments' partial results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

MAX_MEMBERS = 8  # the kernels take one pointer argument per member: z0 .. z7
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SINGLE_MAX_COLS = 8192  # widest row one program holds in registers (fp32, 16 warps)
CHUNK_COLS = 4096  # tile width of the chunked path


@dataclass(frozen=True)
class Members:
    """K member score matrices ``[B, V]`` that share one (row, vocab) stride pair."""

    tensors: tuple[torch.Tensor, ...]
    stride_b: int
    stride_v: int

    @property
    def K(self) -> int:
        return len(self.tensors)

    @property
    def B(self) -> int:
        return self.tensors[0].shape[0]

    @property
    def V(self) -> int:
        return self.tensors[0].shape[1]

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def pointer_args(self) -> list[torch.Tensor]:
        """Eight pointer arguments ``z0 .. z7``; slots past K repeat member 0 and are never read."""
        return list(self.tensors) + [self.tensors[0]] * (MAX_MEMBERS - self.K)


def members_from(member_logits: torch.Tensor | Sequence[torch.Tensor]) -> Members:
    """Check ``member_logits`` (stacked ``[K, B, V]`` or K x ``[B, V]``) and return its members."""
    if isinstance(member_logits, torch.Tensor):
        if member_logits.dim() != 3:
            raise ValueError(
                f"member_logits must be [K, B, V], got shape {tuple(member_logits.shape)}"
            )
        tensors = tuple(member_logits.unbind(0))  # views, no copy
    else:
        tensors = tuple(member_logits)
        if not all(isinstance(z, torch.Tensor) for z in tensors):
            raise ValueError("member_logits must be a tensor or a sequence of tensors")
    if not 1 <= len(tensors) <= MAX_MEMBERS:
        raise ValueError(
            f"member_logits has K={len(tensors)} members; the Triton kernels take 1 to "
            f"{MAX_MEMBERS} (one pointer argument each); use the torch backend beyond that"
        )
    first = tensors[0]
    for k, z in enumerate(tensors):
        if z.dim() != 2 or z.shape != first.shape:
            raise ValueError(
                f"member_logits[{k}] must be [B, V] like member 0 {tuple(first.shape)}, "
                f"got {tuple(z.shape)}"
            )
        if z.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"member_logits[{k}] has dtype {z.dtype}; expected one of {SUPPORTED_DTYPES}")
        if z.device != first.device:
            raise ValueError(f"member_logits[{k}] is on {z.device}, member 0 on {first.device}")
    if first.shape[1] == 0:
        raise ValueError("member_logits has an empty vocabulary (V = 0)")
    if len({z.stride() for z in tensors}) > 1:
        tensors = tuple(z.contiguous() for z in tensors)  # one stride pair for all members
    return Members(tensors, tensors[0].stride(0), tensors[0].stride(1))


def check_tensor(
    name: str,
    value: torch.Tensor,
    shape: tuple[int, ...],
    device: torch.device,
    *,
    integer: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` has ``shape``, ``device`` and kind."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape {list(shape)}, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device}, member_logits on {device}")
    if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {value.dtype}")
    if not integer and not value.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")


@dataclass(frozen=True)
class Plan:
    """How a launch covers ``[B, V]``: the path, tile width, and the split of each row."""

    path: str  # "single" (one program holds a row) or "chunked" (online max/sum over tiles)
    block: int  # tile width in columns, a power of two
    segments: int  # programs per row (1 on the single path)
    segment_len: int  # columns per segment, a multiple of block
    num_warps: int


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


@lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs worth launching: a few per SM on a GPU; a handful in the CPU interpreter."""
    return 4 * _sm_count(device) if device.type == "cuda" else 4


def plan(
    vocab_size: int,
    batch_size: int,
    device: torch.device,
    *,
    block: int | None = None,
    segments: int | None = None,
) -> Plan:
    """Choose the path for ``batch_size`` rows of ``vocab_size`` columns on ``device``.

    ``block`` (a power of two) and ``segments`` override the defaults; tests use them to run the
    chunked path on small rows. Without ``block``, rows up to ``SINGLE_MAX_COLS`` take the single
    path; wider rows use tiles of ``CHUNK_COLS`` (down to 1024 when the batch is too small to fill
    the device) and enough segments per row to give each SM a few programs.
    """
    if block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if segments is not None and segments < 1:
        raise ValueError(f"segments must be >= 1, got {segments}")
    if block is None and vocab_size <= SINGLE_MAX_COLS:
        block = max(16, _pow2(vocab_size))
    if block is not None and vocab_size <= block:
        return Plan("single", block, 1, block, min(16, max(4, block // 512)))
    if block is None:  # narrower tiles when there are too few to occupy the device (small B)
        block = CHUNK_COLS
        while block > 1024 and batch_size * -(-vocab_size // block) < _target_programs(device) // 2:
            block //= 2
    tiles = -(-vocab_size // block)
    if segments is None:
        segments = -(-_target_programs(device) // max(batch_size, 1))
    segments = max(1, min(segments, tiles))
    tiles_per_segment = -(-tiles // segments)
    segments = -(-tiles // tiles_per_segment)  # no empty segment at the end
    return Plan("chunked", block, segments, tiles_per_segment * block, min(8, max(4, block // 512)))
