"""MatryoshkaKV (seed 003): grouped KV whose heads are rotated by trainable orthogonal matrices and
truncated to nested ranks, set per layer, per KV head and separately for K and V at inference.

Owns the structure (`MatryoshkaAttention`) and its cache layout (unpadded coefficient tensors, one per
group of heads sharing K/V ranks). The rank API for trainers and searches (`get_ranks`, `set_ranks`,
`sample_ranks_`, `ranks_config`) lives in kvlab.attention.matryoshka_ranks and is re-exported here; PCA
initialisation lives in kvlab.convert.matryoshka (`pca_init_`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from kvlab.attention.base import (
    PLAIN_LINEARS,
    Linears,
    Payload,
    StepPosition,
    TensorState,
    causal_attention,
    decode_attention,
    kv_buffer,
    register,
    register_preset,
)
from kvlab.attention.grouped import GroupedAttention
from kvlab.cache import CacheError
from kvlab.config import AttentionConfig, ConfigError, ModelConfig, ModelShape

RankSpec = int | Sequence[int | Sequence[int]]


def cayley(skew_param: torch.Tensor) -> torch.Tensor:
    """Orthogonal (..., D, D) from an unconstrained (..., D, D): A = W - W^T, Q = (I - A)^-1 (I + A).

    The Cayley map is smooth and exactly orthogonal for any W (I - A is invertible since A is skew), and
    maps W = 0 to the identity. Solved in float32 so bf16 autocast cannot break orthogonality.
    """
    w = skew_param.float()
    a = w - w.transpose(-1, -2)
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype).expand_as(a)
    # solve_ex without its error check: I - A is never singular, and linalg.solve's check reads the
    # factorisation's status on the host, a device sync per layer per training step on a GPU
    return torch.linalg.solve_ex(eye - a, eye + a, check_errors=False)[0]


class MatryoshkaState(TensorState):
    """Coefficient buffers per rank group: "k{g}" (B, n_g, max_len, r_k) and "v{g}" (B, n_g, max_len, r_v)
    for the n_g KV heads sharing the ranks (r_k, r_v) of group g. No head is padded to another's rank;
    with one rank everywhere this is GQA's layout at width r.

    Remembers the ranks it was built for: changing ranks after creating the cache is a user mistake.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], k_ranks: list[int], v_ranks: list[int]):
        super().__init__(tensors, time_dim=2)
        self.k_ranks, self.v_ranks = list(k_ranks), list(v_ranks)


@dataclass
class MatryoshkaOptions:
    n_kv_heads: int | None = None  # KV heads per layer (None = n_head), as grouped attention
    ranks: int | None = None  # K and V rank of every head (None = head_dim, full rank)
    # Per-head ranks (a list of n_kv_heads ints) overriding `ranks`; per layer via AttentionConfig.layers.
    k_ranks: list[int] | None = None
    v_ranks: list[int] | None = None


@register("matryoshka")
class MatryoshkaAttention(GroupedAttention):
    """Grouped KV + per-head orthogonal U_k, U_v (D x D) and trainable means mu_k, mu_v (D).

    Head h caches c_k = (k - mu_k) @ U_k[:, :r_k] and c_v = (v - mu_v) @ U_v[:, :r_v]. Reading them back
    needs no reconstruction of past keys: q·k ≈ (q @ U_k[:, :r]) · c_k + q·mu_k, and q·mu_k is the same
    for every key so softmax drops it; sum_j p_j v_j ≈ (p @ c_v) @ U_v[:, :r]^T + mu_v since rows of p sum
    to 1. U = base @ cayley(skew): base is identity (or PCA eigenvectors), skew starts at zero, so a
    fresh layer at full rank equals plain grouped attention. q_proj/kv_proj/c_proj keep GQA's names, so a
    GQA state dict loads into this layer with only the projection parameters added.
    """

    kv_share_unsupported = "the coefficients are only readable with the owner's projection"
    Options = MatryoshkaOptions

    def __init__(self, cfg: AttentionConfig, model_cfg: ModelConfig, layer_idx: int, owns_kv: bool):
        super().__init__(cfg, model_cfg, layer_idx, owns_kv)
        H, D = self.n_kv_heads, self.head_dim
        # The ranks as a (K/V, H_kv) tensor, written whenever they are set (`k_ranks`, `v_ranks`): the
        # training path's column masks are computed from it in the graph, so a compiled forward reads
        # the ranks as data and a rank sampler's draw per step does not recompile it. Not persistent:
        # checkpoints carry the ranks in the config (`ranks_config`).
        self.register_buffer("rank_table", torch.zeros(2, H, dtype=torch.long), persistent=False)
        self._k_ranks, self._v_ranks = _config_ranks(cfg, H, D)
        self._write_rank_table()
        # Persistent buffer: a PCA-initialised basis is part of the model and must survive save/load.
        self.register_buffer("k_base", torch.eye(D).repeat(H, 1, 1))  # (H_kv, D, D)
        self.register_buffer("v_base", torch.eye(D).repeat(H, 1, 1))  # (H_kv, D, D)
        self.k_skew = nn.Parameter(torch.zeros(H, D, D))  # Cayley generator of the trained rotation
        self.v_skew = nn.Parameter(torch.zeros(H, D, D))
        self.k_mean = nn.Parameter(torch.zeros(H, D))  # mean-centring before projection (seed 003)
        self.v_mean = nn.Parameter(torch.zeros(H, D))
        self._bases_cache: tuple | None = None  # (parameter versions, (U_k, U_v)) for inference

    @property
    def k_ranks(self) -> list[int]:
        """K rank per KV head (Python ints: the cache layout and the cached path's shapes)."""
        return self._k_ranks

    @k_ranks.setter
    def k_ranks(self, ranks: Sequence[int]) -> None:
        self._k_ranks = [int(r) for r in ranks]
        self._write_rank_table()

    @property
    def v_ranks(self) -> list[int]:
        """V rank per KV head."""
        return self._v_ranks

    @v_ranks.setter
    def v_ranks(self, ranks: Sequence[int]) -> None:
        self._v_ranks = [int(r) for r in ranks]
        self._write_rank_table()

    def _write_rank_table(self) -> None:
        """Copy the ranks into rank_table, to a GPU from pinned memory without blocking (a plain copy from
        pageable memory waits for the stream: once per layer per step under a rank sampler)."""
        self._table_ranks = (tuple(self._k_ranks), tuple(self._v_ranks))
        host = torch.tensor(self._table_ranks, dtype=torch.long)  # (2, H_kv)
        table = self.rank_table
        if table.device.type == "cuda":
            host = host.pin_memory()
        with torch.no_grad():
            table.copy_(host, non_blocking=table.device.type == "cuda")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # A model built on the meta device and loaded with assign=True (kvlab.checkpoint, the HF import)
        # gets real parameters but keeps its non-persistent buffer on meta: rebuild it beside them.
        if self.rank_table.is_meta and not self.k_mean.is_meta:
            self.rank_table = torch.tensor([self.k_ranks, self.v_ranks], device=self.k_mean.device)

    # ---- configuration --------------------------------------------------------------------------
    @classmethod
    def validate(cls, cfg: AttentionConfig, model_cfg: ModelConfig) -> None:
        _config_ranks(cfg, cfg.n_kv_heads or model_cfg.n_head, model_cfg.head_dim)

    def reset_parameters(self) -> None:
        """Identity rotation and zero means: the layer equals plain grouped attention at full rank."""
        with torch.no_grad():
            for name in ("k", "v"):
                getattr(self, f"{name}_base").copy_(torch.eye(self.head_dim).expand_as(self.k_base))
                getattr(self, f"{name}_skew").zero_()
                getattr(self, f"{name}_mean").zero_()

    # ---- projections ----------------------------------------------------------------------------
    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """U_k, U_v: (H_kv, D, D) orthogonal, columns ordered by importance (rank r keeps the first r)."""
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            # A compiled decode step (kvlab.decode) reads what its eager first step cached, or solves in
            # the graph: the cache key below (data_ptr, version counters, is_inference) cannot be traced,
            # and the Decoder's weights are fixed while it runs.
            cached = self._bases_cache
            return cached[1] if cached is not None else self._compute_bases()
        tensors = (self.k_base, self.v_base, self.k_skew, self.v_skew)
        # Training rebuilds so gradients reach skew; so do parameters made under inference_mode, which
        # have no version counter to tell us they changed.
        if torch.is_grad_enabled() or any(t.is_inference() for t in tensors):
            self._bases_cache = None
            return self._compute_bases()
        # Inference: the Cayley solve (a host sync on GPU) costs more than a decode step's attention, so
        # reuse it until a parameter is replaced or written in place (optimizer step, load_state_dict,
        # .to()). Writes through `.data` bypass version counters: call `clear_bases_cache()` after them.
        key = tuple((id(t), t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)
        if self._bases_cache is None or self._bases_cache[0] != key:
            self._bases_cache = (key, self._compute_bases())
        return self._bases_cache[1]

    def clear_bases_cache(self) -> None:
        self._bases_cache = None

    def _compute_bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        u_k = self.k_base.float() @ cayley(self.k_skew)
        u_v = self.v_base.float() @ cayley(self.v_skew)
        return u_k.to(self.k_skew.dtype), u_v.to(self.v_skew.dtype)

    def set_bases_(self, u_k: torch.Tensor, u_v: torch.Tensor) -> None:
        """Make U_k, U_v exactly the given orthogonal (H_kv, D, D) matrices (skew reset to zero)."""
        with torch.no_grad():
            for name, u in (("k", u_k), ("v", u_v)):
                getattr(self, f"{name}_base").copy_(u)
                getattr(self, f"{name}_skew").zero_()

    def full_kv(self, x: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The unprojected K, V of grouped attention: (B, H_kv, T, D) each (PCA calibration reads these)."""
        return super().project_kv(x, pos)

    def rank_groups(self) -> list[tuple[int, int, list[int]]]:
        """(r_k, r_v, KV heads) for each distinct rank pair, in order of first head: the cache layout."""
        groups: dict[tuple[int, int], list[int]] = {}
        for h, pair in enumerate(zip(self.k_ranks, self.v_ranks)):
            groups.setdefault(pair, []).append(h)
        return [(r_k, r_v, heads) for (r_k, r_v), heads in groups.items()]

    def _full_coefficients(self, k, v, u_k, u_v) -> tuple[torch.Tensor, torch.Tensor]:
        c_k = (k - self.k_mean[:, None, :]) @ u_k  # (B, H_kv, T, D)
        c_v = (v - self.v_mean[:, None, :]) @ u_v  # (B, H_kv, T, D)
        return c_k, c_v

    def _group_payload(self, c_k: torch.Tensor, c_v: torch.Tensor) -> Payload:
        """Each rank group's prefix of the full-width coefficients: K groups (B, n_g, T, r_k), V groups."""
        groups = self.rank_groups()
        ks = tuple(_heads(c_k, heads)[..., :r_k] for r_k, _, heads in groups)
        vs = tuple(_heads(c_v, heads)[..., :r_v] for _, r_v, heads in groups)
        return ks + vs

    def project_kv(self, x: torch.Tensor, pos: int) -> Payload:
        k, v = super().project_kv(x, pos)  # (B, H_kv, T, D) each
        return self._group_payload(*self._full_coefficients(k, v, *self.bases()))

    def new_state(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        groups = self.rank_groups()
        tensors = {
            f"{kv}{g}": kv_buffer((batch_size, len(heads), max_len, r), device, dtype)
            for kv in ("k", "v")
            for g, (r_k, r_v, heads) in enumerate(groups)
            for r in [r_k if kv == "k" else r_v]
        }
        return MatryoshkaState(tensors, self.k_ranks, self.v_ranks)

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> float:
        return (sum(self.k_ranks) + sum(self.v_ranks)) * dtype.itemsize if self.owns_kv else 0

    @property
    def latent_rank_ratio(self) -> float:
        ranks = self.k_ranks + self.v_ranks
        return sum(ranks) / (len(ranks) * self.head_dim)

    # ---- attention ------------------------------------------------------------------------------
    def attend(self, x: torch.Tensor, pos: int, kv: Payload) -> torch.Tensor:
        """Queries over rank-group coefficients (cached path): one SDPA per group of KV heads that share
        (r_k, r_v), with their query heads; one group (one SDPA) when every head has the same ranks."""
        B, T, C = x.shape
        H_kv, G, D = self.n_kv_heads, self.n_head // self.n_kv_heads, self.head_dim
        u_k, u_v = self.bases()
        q = self.queries(x, pos).view(B, H_kv, G, T, D)  # (B, H_kv, G, T, D)
        scale = 1.0 / math.sqrt(D)  # the score scale of the full-width head
        dropout_p = self.dropout if self.training else 0.0
        groups = self.rank_groups()
        y = None
        for g, (r_k, r_v, heads) in enumerate(groups):
            n = len(heads)
            c_k, c_v = kv[g], kv[len(groups) + g]  # (B, n, S, r_k), (B, n, S, r_v)
            # U_k absorbed into the query: (B, n, G, T, D) @ (n, 1, D, r_k) -> (B, n * G, T, r_k)
            q_g = (_heads(q, heads) @ _heads(u_k, heads, 0)[:, None, :, :r_k]).view(B, n * G, T, r_k)
            o = causal_attention(q_g, c_k, c_v, pos, scale=scale, dropout_p=dropout_p)  # (B, n*G, T, r_v)
            u_vr = _heads(u_v, heads, 0)[:, None, :, :r_v].transpose(-1, -2)  # (n, 1, r_v, D)
            mean = _heads(self.v_mean, heads, 0)[:, None, None, :]  # (n, 1, 1, D)
            out = o.view(B, n, G, T, r_v) @ u_vr + mean  # (B, n, G, T, D)
            if len(groups) == 1:
                y = out
            else:
                y = out.new_empty(B, H_kv, G, T, D) if y is None else y  # dtype of out (autocast)
                y[:, heads] = out
        y = y.reshape(B, self.n_head, T, D)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def decode(
        self, x: torch.Tensor, at: StepPosition, state, linear: Linears = PLAIN_LINEARS
    ) -> torch.Tensor:
        """One token per sequence, x (B, C): `project_kv` + `attend` for T = 1 without the payload tuple.

        Writes each rank group's coefficients of the new K/V at `pos`, then per group: the query absorbs
        U_k's first r_k columns, attends over the group's coefficients in place, and U_v's first r_v
        columns (plus the mean) map the result back to head_dim.
        """
        self._check_state(state)
        B = x.shape[0]
        H_kv, D = self.n_kv_heads, self.head_dim
        u_k, u_v = self.bases()  # (H_kv, D, D) each
        groups = self.rank_groups()
        held = state.tensors
        kv = linear(self.kv_proj, x).view(B, 2, H_kv, 1, D)  # (B, 2, H_kv, 1, D)
        k = kv[:, 0] if self.rotary is None else at.rope(self.rotary, kv[:, 0])  # post-RoPE
        c_k, c_v = self._full_coefficients(k, kv[:, 1], u_k, u_v)  # (B, H_kv, 1, D) each
        q = linear(self.q_proj, x).view(B, self.n_head, 1, D)  # (B, H, 1, D)
        if self.rotary is not None:
            q = at.rope(self.rotary, q)
        q = q.view(B, H_kv, -1, D)  # (B, H_kv, G, D)
        y = None
        for g, (r_k, r_v, heads) in enumerate(groups):
            k_buf, v_buf = held[f"k{g}"], held[f"v{g}"]  # (B, n, max_len, r_k), (B, n, max_len, r_v)
            at.write(k_buf, 2, _heads(c_k, heads)[..., :r_k])
            at.write(v_buf, 2, _heads(c_v, heads)[..., :r_v])
            q_g = _heads(q, heads) @ _heads(u_k, heads, 0)[..., :r_k]  # (B, n, G, r_k)
            c_kg, c_vg = at.held(k_buf, 2), at.held(v_buf, 2)
            mask = at.mask(c_kg.shape[2], x.device)
            o = decode_attention(q_g, c_kg, c_vg, scale=D**-0.5, mask=mask)  # (B, n, G, r_v), attend_dtype
            u_vr = _heads(u_v, heads, 0)[..., :r_v].transpose(-1, -2)  # (n, r_v, D)
            out = o @ u_vr + _heads(self.v_mean, heads, 0)[:, None, :]  # (B, n, G, D)
            if len(groups) == 1:
                y = out
            else:
                y = out.new_empty(B, H_kv, out.shape[2], D) if y is None else y
                y[:, heads] = out
        return linear(self.c_proj, y.reshape(B, self.n_embd))

    def _check_state(self, state) -> None:
        if isinstance(state, MatryoshkaState) and (state.k_ranks, state.v_ranks) != (
            self.k_ranks,
            self.v_ranks,
        ):
            raise CacheError(
                f"layer {self.layer_idx}: ranks changed after the cache was created (cache K {state.k_ranks}"
                f" V {state.v_ranks}, now K {self.k_ranks} V {self.v_ranks}); create a new cache with "
                "model.new_cache(...) after setting ranks"
            )

    def _attend_masked(self, x: torch.Tensor, c_k: torch.Tensor, c_v: torch.Tensor, u_k, u_v) -> torch.Tensor:
        """Training path: one batched SDPA over K/V reconstructed from rank-masked coefficients.

        Equal to `attend` on the truncated coefficients (same subspace, same mean), but heads with
        different ranks need no loop, which matters when a trainer samples ranks every step.
        """
        B, T, C = x.shape
        k_mask, v_mask = self._rank_masks(c_k.dtype)  # (H_kv, D) each
        # (B, H_kv, T, D): zero the dropped columns, rotate back, re-add the mean.
        k_hat = (c_k * k_mask[:, None, :]) @ u_k.transpose(-1, -2) + self.k_mean[:, None, :]
        v_hat = (c_v * v_mask[:, None, :]) @ u_v.transpose(-1, -2) + self.v_mean[:, None, :]
        q = self.queries(x, 0)  # (B, H, T, D): the full forward starts at 0
        y = causal_attention(q, k_hat, v_hat, 0, dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # y: (B, H, T, D)

    def _rank_masks(self, dtype: torch.dtype) -> torch.Tensor:
        """(2, H_kv, D): 1 where a column is inside the head's K (row 0) or V (row 1) rank, else 0.

        Computed from `rank_table` in the step itself (two small ops per layer): no host copy, and a
        compiled forward sees the ranks as a tensor, not as constants it would guard on. Eagerly, a rank
        list changed in place (`attn.k_ranks[h] = r`, which the setters do not see) is written first; a
        compiled forward trusts the table, which every assignment of k_ranks / v_ranks keeps current."""
        if not torch.compiler.is_compiling() and self._table_ranks != (
            tuple(self._k_ranks),
            tuple(self._v_ranks),
        ):
            self._write_rank_table()
        return _column_masks(self.rank_table, self.head_dim, dtype)

    def forward(self, x: torch.Tensor, pos: int = 0, state=None, kv: Payload | None = None):
        if state is None:  # no payload for borrowers: no layer can read this one's (kv_share_unsupported)
            u_k, u_v = self.bases()
            k, v = super().project_kv(x, pos)  # (B, H_kv, T, D) each
            c_k, c_v = self._full_coefficients(k, v, u_k, u_v)  # (B, H_kv, T, D) each
            return self._attend_masked(x, c_k, c_v, u_k, u_v), None
        self._check_state(state)
        return super().forward(x, pos=pos, state=state, kv=kv)


def _column_masks(ranks: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """ranks (..., n) -> (..., n, width): 1 in the first `rank` columns, else 0."""
    return (torch.arange(width, device=ranks.device) < ranks[..., None]).to(dtype)


def _heads(t: torch.Tensor, heads: list[int], dim: int = 1) -> torch.Tensor:
    """t restricted to KV heads `heads` along dim: a view when they are consecutive, else a gather."""
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return t.narrow(dim, heads[0], len(heads))
    return t.index_select(dim, torch.tensor(heads, device=t.device))


def _config_ranks(cfg: AttentionConfig, n_kv_heads: int, head_dim: int) -> tuple[list[int], list[int]]:
    """K and V ranks per head from `ranks` / `k_ranks` / `v_ranks`, checked (ConfigError names the field)."""
    base = head_dim if cfg.ranks is None else cfg.ranks
    _check_rank(base, head_dim, "ranks")
    out = []
    for name in ("k_ranks", "v_ranks"):
        given = getattr(cfg, name)
        if given is None:
            out.append([base] * n_kv_heads)
            continue
        if isinstance(given, (int, str)) or len(given) != n_kv_heads:
            raise ConfigError(
                f"{name}={given!r} must be a list of {n_kv_heads} ranks (one per KV head); "
                "use `ranks` for one rank everywhere"
            )
        for h, r in enumerate(given):
            _check_rank(r, head_dim, f"{name}[{h}]")
        out.append([int(r) for r in given])
    return out[0], out[1]


def _check_rank(r, head_dim: int, where: str) -> None:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= r <= head_dim:
        raise ConfigError(f"{where}={r!r} must be an integer rank between 1 and head_dim={head_dim}")


@register_preset(r"matryoshka-(\d+)", "matryoshka-<R>")
def _matryoshka(shape: ModelShape, rank: int) -> AttentionConfig:
    return AttentionConfig(kind="matryoshka", ranks=rank)


# The rank API, importable from here as before (matryoshka_ranks reads MatryoshkaAttention, defined above).
from kvlab.attention.matryoshka_ranks import (  # noqa: E402
    RankSampler,
    get_ranks,
    layers_or_error,
    matryoshka_layers,
    projection_parameters,
    rank_choices,
    ranks_config,
    sample_ranks_,
    set_ranks,
)

__all__ = [
    "MatryoshkaAttention", "MatryoshkaOptions", "MatryoshkaState", "RankSampler", "RankSpec", "cayley",
    "get_ranks", "layers_or_error", "matryoshka_layers", "projection_parameters", "rank_choices",
    "ranks_config", "sample_ranks_", "set_ranks",
]  # fmt: skip
