"""Plain-PyTorch fp32 reference of MoE++, written straight from docs/MOEPP_SPEC.md.

Independent of ``moepp_megatron``; written to be easy to read, not fast: loops over tokens
and experts wherever that makes the math obvious.  Section numbers refer to the spec.

Conventions (all documented again on the functions that implement them):

* Expert order in a layer (= router columns): the N_ffn FFN experts, then the constant
  experts, then the copy experts, then the zero experts (spec §5 order, generalised).
* Weights: a flat ``dict[str, Tensor]`` with the Hugging Face names of spec §5.
  A vanilla model's router is ``...gate.wg.weight`` [N_ffn, D] and it has no gate_map.
* Capacity: ``math.ceil`` of the float expression of Eq. 8 with T = tokens * topk.
* Over-capacity drop policy: per expert keep the ``capacity`` picks with the highest gate
  (ties -> lower token index), drop the rest (gate 0, no renormalisation).
* Load-balance loss counts the top-k picks *before* capacity dropping.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass
class RefConfig:
    """Model + MoE++ hyper-parameters (spec §1, §2). Defaults describe a tiny test model."""

    vocab_size: int = 64
    hidden_size: int = 32  # D
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 8
    num_kv_heads: Optional[int] = None  # None -> num_heads
    ffn_hidden_size: int = 24  # F, the FFN expert hidden size
    num_ffn_experts: int = 4
    num_zero: int = 1
    num_copy: int = 1
    num_constant: int = 2
    topk: int = 2
    router: str = "linear"  # "linear" (paper) | "mlp" (Linear(D,8N)->tanh->Linear(8N,N))
    gating_residual: bool = True
    routing: str = "paper"  # "paper" | "release"
    tau: float = 0.75
    capacity_factor: Optional[float] = None  # gamma; None = dropless
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    moe_layers: Optional[list] = None  # per layer: True = MoE(++) layer, False = dense SwiGLU
    dense_ffn_hidden_size: Optional[int] = None  # None -> ffn_hidden_size
    vanilla: bool = False  # vanilla MoE baseline: no ZC experts, Megatron top-k routing

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.moe_layers is None:
            self.moe_layers = [True] * self.num_layers
        if self.dense_ffn_hidden_size is None:
            self.dense_ffn_hidden_size = self.ffn_hidden_size
        assert len(self.moe_layers) == self.num_layers
        assert self.num_heads % self.num_kv_heads == 0
        assert self.router in ("linear", "mlp") and self.routing in ("paper", "release")
        assert 1 <= self.topk <= self.num_experts

    @property
    def num_zc(self) -> int:
        """N_zc (0 for a vanilla model: the ZC counts are ignored)."""
        return 0 if self.vanilla else self.num_zero + self.num_copy + self.num_constant

    @property
    def num_experts(self) -> int:
        """N = N_ffn + N_zc."""
        return self.num_ffn_experts + self.num_zc

    @property
    def router_kind(self) -> str:
        """A vanilla model always uses the linear router."""
        return "linear" if self.vanilla else self.router

    @property
    def use_gating_residual(self) -> bool:
        return self.gating_residual and not self.vanilla

    def expert_kinds(self) -> list:
        """Kind of every router column: ffn..., constant..., copy..., zero... (spec §5)."""
        return (["ffn"] * self.num_ffn_experts
                + ["constant"] * (0 if self.vanilla else self.num_constant)
                + ["copy"] * (0 if self.vanilla else self.num_copy)
                + ["zero"] * (0 if self.vanilla else self.num_zero))


# ----------------------------------------------------------------------------- weights

def init_weights(cfg: RefConfig, seed: int = 0) -> dict:
    """Random fp32 weights under the spec §5 names.

    Linear weights ~ N(0, 0.02) except the router (std 1/sqrt(fan_in), so routing is
    decisive rather than near-uniform) and gate_map (std 0.5/sqrt(N), so the residual term
    matters); norm weights = 1 + N(0, 0.1); constant vectors v ~ N(0, 1).
    gate_map is created in every MoE++ layer (spec §5), also the first one / without residual.
    """
    g = torch.Generator().manual_seed(seed)
    D, F_, N, V = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_experts, cfg.vocab_size
    H, Hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    def norm_w():
        return 1.0 + rnd(D, std=0.1)

    w = {"model.embed_tokens.weight": rnd(V, D, std=1.0)}
    for L in range(cfg.num_layers):
        p = f"model.layers.{L}."
        w[p + "input_layernorm.weight"] = norm_w()
        w[p + "self_attn.q_proj.weight"] = rnd(H * hd, D)
        w[p + "self_attn.k_proj.weight"] = rnd(Hkv * hd, D)
        w[p + "self_attn.v_proj.weight"] = rnd(Hkv * hd, D)
        w[p + "self_attn.o_proj.weight"] = rnd(D, H * hd)
        w[p + "post_attention_layernorm.weight"] = norm_w()
        if not cfg.moe_layers[L]:
            Fd = cfg.dense_ffn_hidden_size
            w[p + "mlp.up_proj.weight"] = rnd(2 * Fd, D)
            w[p + "mlp.down_proj.weight"] = rnd(D, Fd)
            continue
        m = p + "mlp.moe."
        if cfg.router_kind == "linear":
            w[m + "gate.wg.weight"] = rnd(N, D, std=D ** -0.5)
        else:
            w[m + "gate.wg.0.weight"] = rnd(8 * N, D, std=D ** -0.5)
            w[m + "gate.wg.2.weight"] = rnd(N, 8 * N, std=(8 * N) ** -0.5)
        if not cfg.vanilla:
            w[m + "gate.gate_map.weight"] = rnd(N, N, std=0.5 * N ** -0.5)
        for e, kind in enumerate(cfg.expert_kinds()):
            q = m + f"experts.experts.{e}."
            if kind == "ffn":
                w[q + "up_proj.weight"] = rnd(2 * F_, D)
                w[q + "down_proj.weight"] = rnd(D, F_)
            elif kind == "constant":
                w[q + "constant"] = rnd(D, std=1.0)
                w[q + "wg.weight"] = rnd(2, D, std=D ** -0.5)
    w["model.norm.weight"] = norm_w()
    w["lm_head.weight"] = rnd(V, D)
    return w


def moe_weights(weights: dict, layer: int) -> dict:
    """Sub-dict of layer ``layer``'s MoE weights, keys relative to ``model.layers.L.mlp.moe.``
    (e.g. ``gate.wg.weight``, ``experts.experts.3.up_proj.weight``)."""
    p = f"model.layers.{layer}.mlp.moe."
    return {k[len(p):]: v for k, v in weights.items() if k.startswith(p)}


# ----------------------------------------------------------------------------- router

def router_logits(x: Tensor, lw: dict, G_prev: Optional[Tensor], cfg: RefConfig) -> Tensor:
    """Router scores, spec §1 "Router and gating residuals", in fp32:

        G^1(x) = R^1(x);   G^j(x) = R^j(x) + W_g^j G^{j-1}(x)

    R(x) = W x (linear) or W_2 tanh(W_1 x) (mlp, no biases).  The residual is added only if
    cfg.use_gating_residual and ``G_prev`` (previous MoE++ layer's full logits [T, N]) is
    given; the first MoE++ layer passes ``G_prev=None`` so its gate_map is unused.
    x: [T, D] (the normed hidden state); returns G: [T, N].
    """
    x = x.float()
    if cfg.router_kind == "linear":
        G = x @ lw["gate.wg.weight"].float().T
    else:
        G = torch.tanh(x @ lw["gate.wg.0.weight"].float().T) @ lw["gate.wg.2.weight"].float().T
    if cfg.use_gating_residual and G_prev is not None:
        G = G + G_prev.float() @ lw["gate.gate_map.weight"].float().T  # (W_g G^{j-1}) per token
    return G


def route(logits: Tensor, cfg: RefConfig):
    """Top-k routing (spec §1 "Two routing variants"). Returns (gates [T,N], topk_mask [T,N]);
    gates are 0 outside the top-k.

    paper:   p = softmax(G) over all N; top-k of p; g_i = p_i (no renormalisation).
    release: as paper, then the zero experts' gates are set to 0 and the remaining top-k
             gates divided by their sum (a token whose picks are all zero experts gets all-0).
    vanilla: Megatron TopKRouter, score_function="softmax", moe_router_pre_softmax=False:
             top-k of the logits, then softmax over only those k logits (gates sum to 1).
    """
    T, N = logits.shape
    k = cfg.topk
    if cfg.vanilla:
        top_vals, top_idx = torch.topk(logits, k, dim=-1)
        gates = torch.zeros_like(logits).scatter(1, top_idx, torch.softmax(top_vals, dim=-1))
        mask = torch.zeros(T, N, dtype=torch.bool).scatter(1, top_idx, True)
        return gates, mask
    probs = torch.softmax(logits.float(), dim=-1)
    _, top_idx = torch.topk(probs, k, dim=-1)
    mask = torch.zeros(T, N, dtype=torch.bool).scatter(1, top_idx, True)
    gates = probs * mask
    if cfg.routing == "release":
        not_zero = torch.tensor([kind != "zero" for kind in cfg.expert_kinds()])
        gates = gates * not_zero
        denom = gates.sum(dim=-1, keepdim=True)
        gates = gates / torch.where(denom > 0, denom, torch.ones_like(denom))
    return gates, mask


# ----------------------------------------------------------------------------- capacity

def capacities(num_tokens: int, cfg: RefConfig):
    """Per-expert capacities (cap_ffn, cap_zc), spec Eq. 8, with T = num_tokens * topk slots:

        cap_ffn = ceil(gamma * tau * T / (tau * N_ffn + N_zc))
        cap_zc  = ceil(gamma *       T / (tau * N_ffn + N_zc))

    evaluated in Python floats in exactly that order, then math.ceil (so at exact-integer
    points float rounding can add 1, e.g. (16+4)E, gamma 1.1, T=800 -> cap_zc 56, not 55).
    Vanilla: Megatron's get_capacity, ceil((T / N_ffn) * gamma), and cap_zc = None.
    Dropless (gamma None): (None, None).
    """
    gamma = cfg.capacity_factor
    if gamma is None:
        return None, None
    T = num_tokens * cfg.topk
    if cfg.vanilla:
        return math.ceil((T / cfg.num_ffn_experts) * gamma), None
    denom = cfg.tau * cfg.num_ffn_experts + cfg.num_zc
    return math.ceil(gamma * cfg.tau * T / denom), math.ceil(gamma * T / denom)


def apply_capacity(gates: Tensor, topk_mask: Tensor, cfg: RefConfig):
    """Drop over-capacity assignments (spec §1 "Heterogeneous expert capacity").

    For every expert i with more picks than its capacity, keep the ``capacity`` picks with the
    highest gate (Megatron drop policy "probs"; ties -> lower token index) and drop the rest:
    their gate becomes 0, the other gates of that token are NOT renormalised.  Applied to the
    final gates (after the release renormalisation).  Returns (kept_gates, kept_mask).
    """
    T, N = gates.shape
    cap_ffn, cap_zc = capacities(T, cfg)
    kept = topk_mask.clone()
    if cap_ffn is None:
        return gates * kept, kept
    for i, kind in enumerate(cfg.expert_kinds()):
        cap = cap_ffn if kind == "ffn" else cap_zc
        picked = [t for t in range(T) if topk_mask[t, i]]
        if len(picked) > cap:
            by_gate = sorted(picked, key=lambda t: (-gates[t, i].item(), t))
            for t in by_gate[cap:]:
                kept[t, i] = False
    return gates * kept, kept


# ----------------------------------------------------------------------------- aux loss

def load_balance_loss(probs_full: Tensor, topk_mask: Tensor, cfg: RefConfig) -> Tensor:
    """Heterogeneous load-balance loss, spec Eq. 7/9 (beta NOT included):

        L_b = sum_i eta_i * f_i * P_i,   eta_i = 1 (FFN) or tau (ZC),
        f_i = #{t : i in top-k(t)} / T   (top-k picks before capacity dropping),
        P_i = (1/T) sum_t softmax(G(x_t))_i.

    Vanilla: Megatron's switch loss  N_ffn * sum_i (count_i / (T * k)) * P_i.
    probs_full: softmax(G) over all N experts [T, N]; topk_mask: [T, N] bool.
    """
    T, N = probs_full.shape
    kinds = cfg.expert_kinds()
    loss = probs_full.new_zeros(())
    for i in range(N):
        count_i = sum(int(topk_mask[t, i]) for t in range(T))
        P_i = sum(probs_full[t, i] for t in range(T)) / T
        if cfg.vanilla:
            loss = loss + cfg.num_ffn_experts * (count_i / (T * cfg.topk)) * P_i
        else:
            eta_i = 1.0 if kinds[i] == "ffn" else cfg.tau
            loss = loss + eta_i * (count_i / T) * P_i
    return loss


# ----------------------------------------------------------------------------- experts

def ffn_expert(x: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """SwiGLU FFN expert (spec §1): down(silu(x W_gate) * (x W_up)).
    up: [2F, D] with rows 0..F-1 the gate half, F..2F-1 the up half (spec §5); down: [D, F]."""
    F_ = up.shape[0] // 2
    return (F.silu(x @ up[:F_].T) * (x @ up[F_:].T)) @ down.T


def zc_expert(kind: str, x: Tensor, params: Optional[dict] = None) -> Tensor:
    """Zero-computation experts (spec §1):
    zero: E(x) = 0;  copy: E(x) = x;
    constant: E(x) = a1 * x + a2 * v, [a1, a2] = softmax(W_c x), params {"wg": W_c [2,D], "constant": v [D]}.
    """
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "copy":
        return x
    assert kind == "constant"
    a = torch.softmax(x @ params["wg"].T, dim=-1)
    return a[..., 0:1] * x + a[..., 1:2] * params["constant"]


def expert_forward(i: int, x: Tensor, lw: dict, cfg: RefConfig) -> Tensor:
    """E_i(x) for router column i of a layer with MoE weights ``lw`` (see moe_weights)."""
    kind = cfg.expert_kinds()[i]
    q = f"experts.experts.{i}."
    if kind == "ffn":
        return ffn_expert(x, lw[q + "up_proj.weight"], lw[q + "down_proj.weight"])
    params = {"wg": lw[q + "wg.weight"], "constant": lw[q + "constant"]} if kind == "constant" else None
    return zc_expert(kind, x, params)


def moepp_layer(x: Tensor, lw: dict, G_prev: Optional[Tensor], cfg: RefConfig):
    """One MoE++ (or vanilla MoE) layer on tokens x [T, D] (spec §1):

        y_t = sum over kept top-k picks i of token t of  g_{t,i} * E_i(x_in_t)

    x_in = x ("paper", vanilla) or topk * x ("release", for FFN, copy and constant experts);
    the router always sees x.  Returns (y [T,D], G [T,N] = this layer's full logits, aux) with
    aux = {lb_loss, gates (after capacity), topk_mask (before capacity), kept_mask, probs,
    logits, router_input}.
    """
    T, D = x.shape
    G = router_logits(x, lw, G_prev, cfg)
    probs = torch.softmax(G, dim=-1)
    gates_topk, topk_mask = route(G, cfg)
    gates, kept = apply_capacity(gates_topk, topk_mask, cfg)
    lb = load_balance_loss(probs, topk_mask, cfg)
    x_in = x * cfg.topk if (cfg.routing == "release" and not cfg.vanilla) else x
    rows = []
    for t in range(T):
        y_t = x.new_zeros(D)
        for i in range(cfg.num_experts):
            if kept[t, i]:
                y_t = y_t + gates[t, i] * expert_forward(i, x_in[t], lw, cfg)
        rows.append(y_t)
    aux = {"lb_loss": lb, "gates": gates, "topk_mask": topk_mask, "kept_mask": kept,
           "probs": probs, "logits": G, "router_input": x}
    return torch.stack(rows), G, aux


# ----------------------------------------------------------------------------- backbone

def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """RMSNorm in fp32: x * rsqrt(mean(x^2) + eps) * w."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * w.float()


def apply_rope(x: Tensor, theta: float) -> Tensor:
    """Rotate-half RoPE (LLaMA/HF) on x [B, H, S, hd], positions 0..S-1:
    inv_freq_j = theta^(-2j/hd); x*cos + rotate_half(x)*sin with angles cat(f, f)."""
    S, hd = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.outer(torch.arange(S, dtype=torch.float32), inv_freq)  # [S, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def attention(x: Tensor, weights: dict, layer: int, cfg: RefConfig) -> Tensor:
    """Causal multi-head self-attention, LLaMA layout, no biases, GQA (kv head h // (H/Hkv)),
    scale 1/sqrt(head_dim), softmax in fp32.  x: [B, S, D] (already normed)."""
    B, S, _ = x.shape
    H, Hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p = f"model.layers.{layer}.self_attn."
    q = (x @ weights[p + "q_proj.weight"].T).view(B, S, H, hd).transpose(1, 2)
    k = (x @ weights[p + "k_proj.weight"].T).view(B, S, Hkv, hd).transpose(1, 2)
    v = (x @ weights[p + "v_proj.weight"].T).view(B, S, Hkv, hd).transpose(1, 2)
    q, k = apply_rope(q, cfg.rope_theta), apply_rope(k, cfg.rope_theta)
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    causal = torch.ones(S, S, dtype=torch.bool).triu(1)
    probs = torch.softmax(scores.float().masked_fill(causal, float("-inf")), dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(B, S, H * hd)
    return out @ weights[p + "o_proj.weight"].T


def model_forward(input_ids: Tensor, weights: dict, cfg: RefConfig):
    """LLaMA-style causal LM with MoE++ FFNs (spec §1, §2):

        h = x + Attn(RMSNorm(x));  x' = h + FFN(RMSNorm(h))     (pre-norm blocks)
        logits = lm_head(RMSNorm(x_final))                         (untied)

    FFN is moepp_layer on the B*S post_attention_layernorm outputs (capacity counts all B*S
    tokens of the call) or a dense SwiGLU for moe_layers[L] == False.  The gating residual G
    flows from MoE++ layer to MoE++ layer; dense layers pass it through unchanged.
    Returns (logits [B, S, V], aux) with aux = {"lb_losses": [one scalar per MoE layer],
    "layers": [per-layer aux dict, None for dense layers]}.
    """
    B, S = input_ids.shape
    D, eps = cfg.hidden_size, cfg.rms_norm_eps
    x = weights["model.embed_tokens.weight"][input_ids].float()
    G_prev = None
    aux = {"lb_losses": [], "layers": []}
    for L in range(cfg.num_layers):
        p = f"model.layers.{L}."
        h = x + attention(rms_norm(x, weights[p + "input_layernorm.weight"], eps), weights, L, cfg)
        n = rms_norm(h, weights[p + "post_attention_layernorm.weight"], eps).reshape(B * S, D)
        if cfg.moe_layers[L]:
            y, G_prev, layer_aux = moepp_layer(n, moe_weights(weights, L), G_prev, cfg)
            aux["lb_losses"].append(layer_aux["lb_loss"])
            aux["layers"].append(layer_aux)
        else:
            y = ffn_expert(n, weights[p + "mlp.up_proj.weight"], weights[p + "mlp.down_proj.weight"])
            aux["layers"].append(None)
        x = h + y.reshape(B, S, D)
    x = rms_norm(x, weights["model.norm.weight"], eps)
    return x @ weights["lm_head.weight"].T, aux


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean token cross-entropy L_ce; labels are aligned with logits (already shifted),
    entries equal to -100 are ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def total_loss(logits: Tensor, labels: Tensor, aux: dict, beta: float = 0.01) -> Tensor:
    """L = L_ce + beta * sum over MoE layers of L_b (spec Eq. 9)."""
    return lm_loss(logits, labels) + beta * sum(aux["lb_losses"], logits.new_zeros(()))
