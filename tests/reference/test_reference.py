"""Tests of the plain-PyTorch MoE++ reference against hand-computed cases.

The expected numbers are worked out by hand in the comments, so these tests also document
the formulas of docs/MOEPP_SPEC.md §1.
"""
import math

import pytest
import torch

from tests.reference.moepp_reference import (
    RefConfig, apply_capacity, capacities, ffn_expert, init_weights, load_balance_loss,
    lm_loss, model_forward, moe_weights, moepp_layer, route, router_logits, total_loss,
    zc_expert,
)


def small_cfg(**kw):
    """2 FFN experts + 1 copy + 1 zero: router columns [ffn0, ffn1, copy, zero]."""
    base = dict(hidden_size=2, num_ffn_experts=2, num_constant=0, num_copy=1, num_zero=1,
                topk=2, tau=0.75)
    base.update(kw)
    return RefConfig(**base)


def test_expert_order():
    cfg = RefConfig(num_ffn_experts=3, num_constant=2, num_copy=1, num_zero=1)
    assert cfg.expert_kinds() == ["ffn"] * 3 + ["constant"] * 2 + ["copy", "zero"]
    assert cfg.num_experts == 7 and cfg.num_zc == 4
    v = RefConfig(num_ffn_experts=3, vanilla=True)
    assert v.expert_kinds() == ["ffn"] * 3 and v.num_experts == 3


# ----------------------------------------------------------------------------- routing

# probs chosen so that logits = log(probs) reproduces them exactly under softmax.
PROBS = torch.tensor([[0.40, 0.10, 0.20, 0.30],   # picks ffn0 (.4) + zero (.3)
                      [0.10, 0.20, 0.30, 0.40],   # picks zero (.4) + copy (.3)
                      [0.35, 0.05, 0.45, 0.15]])  # picks copy (.45) + ffn0 (.35)
MASK = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)


def test_route_paper_keeps_raw_probs():
    gates, mask = route(PROBS.log(), small_cfg(routing="paper"))
    assert torch.equal(mask, MASK)
    expected = torch.tensor([[0.40, 0, 0, 0.30], [0, 0, 0.30, 0.40], [0.35, 0, 0.45, 0]])
    torch.testing.assert_close(gates, expected)


def test_route_release_zero_gate_and_renormalise():
    gates, mask = route(PROBS.log(), small_cfg(routing="release"))
    assert torch.equal(mask, MASK)
    # token 0: zero expert -> 0, ffn0 .4/.4 = 1;  token 1: copy .3/.3 = 1;
    # token 2: ffn0 .35/.80 = .4375, copy .45/.80 = .5625
    expected = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0.4375, 0, 0.5625, 0]])
    torch.testing.assert_close(gates, expected)


def test_route_vanilla_softmax_over_selected_k():
    cfg = RefConfig(num_ffn_experts=4, topk=2, vanilla=True)
    gates, mask = route(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), cfg)
    # top-2 logits 3 and 2 -> softmax([3, 2]) = [e/(e+1), 1/(e+1)] = [.7310586, .2689414]
    torch.testing.assert_close(gates, torch.tensor([[0.0, 0.7310586, 0.2689414, 0.0]]))
    assert mask.tolist() == [[False, True, True, False]]


def test_router_gating_residual():
    cfg = small_cfg()
    lw = {"gate.wg.weight": torch.tensor([[1.0, 0], [0, 1.0], [1.0, 1.0], [0, 0]]),
          "gate.gate_map.weight": torch.eye(4) * 2}
    x = torch.tensor([[1.0, 2.0]])
    # R(x) = [1, 2, 3, 0]
    torch.testing.assert_close(router_logits(x, lw, None, cfg), torch.tensor([[1.0, 2, 3, 0]]))
    G_prev = torch.tensor([[1.0, 0, 0, -1.0]])
    # G = R(x) + W_g G_prev = [1, 2, 3, 0] + [2, 0, 0, -2]
    torch.testing.assert_close(router_logits(x, lw, G_prev, cfg), torch.tensor([[3.0, 2, 3, -2]]))
    off = small_cfg(gating_residual=False)
    torch.testing.assert_close(router_logits(x, lw, G_prev, off), torch.tensor([[1.0, 2, 3, 0]]))


def test_router_mlp():
    cfg = small_cfg(router="mlp")
    w0 = torch.zeros(32, 2)
    w0[0, 0] = 1.0  # hidden unit 0 = tanh(x_0)
    w2 = torch.zeros(4, 32)
    w2[2, 0] = 2.0  # copy logit = 2 * tanh(x_0)
    G = router_logits(torch.tensor([[0.5, 9.0]]), {"gate.wg.0.weight": w0, "gate.wg.2.weight": w2}, None, cfg)
    torch.testing.assert_close(G, torch.tensor([[0.0, 0.0, 2 * math.tanh(0.5), 0.0]]))


# ----------------------------------------------------------------------------- capacity

def test_capacities_16_plus_4():
    cfg = RefConfig(num_ffn_experts=16, num_constant=2, num_copy=1, num_zero=1,
                    tau=0.75, capacity_factor=1.1)
    # denominator tau*N_ffn + N_zc = 12 + 4 = 16
    # 100 tokens -> T = 200: ffn 1.1*.75*200/16 = 10.3125 -> 11; zc 1.1*200/16 = 13.75 -> 14
    assert capacities(100, cfg) == (11, 14)
    # 8 tokens -> T = 16: ffn .825 -> 1; zc 1.1 -> 2
    assert capacities(8, cfg) == (1, 2)
    # 1000 tokens -> T = 2000: ffn 103.125 -> 104; zc 137.5 -> 138
    assert capacities(1000, cfg) == (104, 138)
    cfg.capacity_factor = None
    assert capacities(100, cfg) == (None, None)
    van = RefConfig(num_ffn_experts=16, vanilla=True, capacity_factor=1.1)
    # Megatron: ceil(200 / 16 * 1.1) = ceil(13.75) = 14
    assert capacities(100, van) == (14, None)


def test_capacity_share_gives_expected_ffn_experts_per_token():
    # gamma 1, (16+4)E, tau .75, 32 tokens -> T = 64 slots: cap_ffn = .75*64/16 = 3, cap_zc = 4.
    # Total capacity 16*3 + 4*4 = 64 = T; FFN slots 48 -> 48/32 = 1.5 FFN experts per token
    # = k * tau*N_ffn / (tau*N_ffn + N_zc) = 2 * 12/16 (spec §1).
    cfg = RefConfig(num_ffn_experts=16, tau=0.75, capacity_factor=1.0)
    cap_ffn, cap_zc = capacities(32, cfg)
    assert (cap_ffn, cap_zc) == (3, 4)
    assert 16 * cap_ffn + 4 * cap_zc == 64
    assert 16 * cap_ffn / 32 == 1.5


def test_apply_capacity_drops_lowest_gate():
    # 2 tokens -> T = 4 slots; tau*N_ffn + N_zc = 1.5 + 2 = 3.5
    # cap_ffn = ceil(.75*4/3.5) = ceil(.857) = 1; cap_zc = ceil(4/3.5) = 2
    cfg = small_cfg(capacity_factor=1.0)
    assert capacities(2, cfg) == (1, 2)
    gates = torch.tensor([[0.6, 0.2, 0.0, 0.0], [0.5, 0.0, 0.3, 0.0]])
    mask = gates > 0
    kept_gates, kept = apply_capacity(gates, mask, cfg)
    # ffn0 has 2 picks > cap 1 -> token 1's (gate .5) is dropped; no renormalisation
    torch.testing.assert_close(kept_gates, torch.tensor([[0.6, 0.2, 0.0, 0.0], [0.0, 0.0, 0.3, 0.0]]))
    assert kept.tolist() == [[True, True, False, False], [False, False, True, False]]


def test_apply_capacity_zc_expert():
    # 3 tokens -> T = 6: cap_ffn = ceil(4.5/3.5) = 2, cap_zc = ceil(6/3.5) = 2
    cfg = small_cfg(capacity_factor=1.0)
    assert capacities(3, cfg) == (2, 2)
    gates = torch.tensor([[0.3, 0.0, 0.50, 0.0],
                          [0.0, 0.3, 0.40, 0.0],
                          [0.2, 0.0, 0.45, 0.0]])
    kept_gates, _ = apply_capacity(gates, gates > 0, cfg)
    # copy has 3 picks > 2 -> the .40 one (token 1) is dropped; ffn0 has 2 <= 2 -> kept
    expected = gates.clone()
    expected[1, 2] = 0.0
    torch.testing.assert_close(kept_gates, expected)
    # dropless keeps everything
    same, _ = apply_capacity(gates, gates > 0, small_cfg())
    torch.testing.assert_close(same, gates)


# ----------------------------------------------------------------------------- aux loss

def test_load_balance_loss_uniform():
    cfg = small_cfg()
    probs = torch.full((2, 4), 0.25)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    # f_i = 1/2 for all, P_i = 1/4: L = 1/8 * (1 + 1 + .75 + .75) = .4375
    torch.testing.assert_close(load_balance_loss(probs, mask, cfg), torch.tensor(0.4375))


def test_load_balance_loss_skewed():
    cfg = small_cfg()
    probs = PROBS[:2]
    mask = MASK[:2]  # token 0: {ffn0, zero}, token 1: {copy, zero}
    # f = [.5, 0, .5, 1];  P = [.25, .15, .25, .35]
    # L = 1*.5*.25 + 0 + .75*.5*.25 + .75*1*.35 = .125 + .09375 + .2625 = .48125
    torch.testing.assert_close(load_balance_loss(probs, mask, cfg), torch.tensor(0.48125))


def test_load_balance_loss_vanilla_switch():
    cfg = RefConfig(num_ffn_experts=2, topk=1, vanilla=True)
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    mask = torch.tensor([[True, False], [True, False]])
    # N * sum_i count_i/(T k) * P_i = 2 * (2/2 * .65 + 0) = 1.3
    torch.testing.assert_close(load_balance_loss(probs, mask, cfg), torch.tensor(1.3))
    uniform = torch.full((2, 2), 0.5)
    # balanced: 2 * (.5*.5 + .5*.5) = 1
    torch.testing.assert_close(load_balance_loss(uniform, ~torch.eye(2, dtype=torch.bool), cfg),
                               torch.tensor(1.0))


# ----------------------------------------------------------------------------- experts

def test_zc_experts():
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(zc_expert("zero", x), torch.zeros(2))
    assert torch.equal(zc_expert("copy", x), x)
    # W_c = I -> W_c x = [1, 2] -> a = softmax([1, 2]) = [.26894142, .73105858]
    # E(x) = a1 * [1, 2] + a2 * [3, -1] = [2.46211716, -0.19317574]
    out = zc_expert("constant", x, {"wg": torch.eye(2), "constant": torch.tensor([3.0, -1.0])})
    torch.testing.assert_close(out, torch.tensor([2.46211716, -0.19317574]))


def test_ffn_expert_halves():
    # F = 1, D = 1: up = [[gate], [up]]: y = down * silu(2x) * (3x)
    x = torch.tensor([[0.5]])
    y = ffn_expert(x, torch.tensor([[2.0], [3.0]]), torch.tensor([[4.0]]))
    silu1 = 1.0 / (1.0 + math.exp(-1.0))
    torch.testing.assert_close(y, torch.tensor([[4.0 * silu1 * 1.5]]))


def _copy_zero_layer(routing):
    """One token x=[1,0] routed to copy + zero: logits [0, 0, 2, 1]."""
    cfg = small_cfg(routing=routing)
    lw = {"gate.wg.weight": torch.tensor([[0.0, 0], [0, 0], [2.0, 0], [1.0, 0]]),
          "gate.gate_map.weight": torch.zeros(4, 4)}
    for e in range(2):
        lw[f"experts.experts.{e}.up_proj.weight"] = torch.ones(2, 2)
        lw[f"experts.experts.{e}.down_proj.weight"] = torch.ones(2, 1)
    return moepp_layer(torch.tensor([[1.0, 0.0]]), lw, None, cfg)


def test_layer_paper_vs_release_input_scaling():
    p_copy = math.exp(2) / (2 + math.exp(2) + math.e)
    y, G, aux = _copy_zero_layer("paper")
    torch.testing.assert_close(y, torch.tensor([[p_copy, 0.0]]))  # p_copy * x
    torch.testing.assert_close(G, torch.tensor([[0.0, 0.0, 2.0, 1.0]]))
    y, _, aux = _copy_zero_layer("release")
    # copy gets gate 1 (zero expert's gate removed) and sees k * x = 2 * x
    torch.testing.assert_close(y, torch.tensor([[2.0, 0.0]]))


def test_one_expert_vanilla_equals_dense_swiglu():
    cfg = RefConfig(hidden_size=8, ffn_hidden_size=12, num_ffn_experts=1, topk=1, vanilla=True)
    w = init_weights(cfg, seed=3)
    lw = moe_weights(w, 0)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    y, _, aux = moepp_layer(x, lw, None, cfg)
    dense = ffn_expert(x, lw["experts.experts.0.up_proj.weight"], lw["experts.experts.0.down_proj.weight"])
    torch.testing.assert_close(y, dense)
    torch.testing.assert_close(aux["lb_loss"], torch.tensor(1.0))  # 1 * (T/T) * 1


# ----------------------------------------------------------------------------- full model

MODEL_KW = dict(vocab_size=50, hidden_size=16, num_layers=3, num_heads=4, head_dim=4,
                ffn_hidden_size=12, num_ffn_experts=4, num_constant=2, num_copy=1, num_zero=1)


def _run_model(cfg, seed=0, B=2, S=12):
    w = {k: v.clone().requires_grad_(True) for k, v in init_weights(cfg, seed).items()}
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))
    logits, aux = model_forward(ids, w, cfg)
    labels = torch.roll(ids, -1, dims=1)
    loss = total_loss(logits, labels, aux, beta=0.01)
    loss.backward()
    return w, ids, logits, aux, loss


@pytest.mark.parametrize("router,routing,residual,moe_layers", [
    ("linear", "paper", True, [True, True, True]),
    ("mlp", "release", True, [True, False, True]),
    ("linear", "release", False, [True, True, False]),
])
def test_model_runs_and_grads_flow(router, routing, residual, moe_layers):
    cfg = RefConfig(router=router, routing=routing, gating_residual=residual,
                    moe_layers=moe_layers, num_kv_heads=2, **MODEL_KW)
    w, ids, logits, aux, loss = _run_model(cfg)
    assert logits.shape == (2, 12, cfg.vocab_size)
    assert torch.isfinite(loss)
    assert len(aux["lb_losses"]) == sum(moe_layers)
    first_moe = moe_layers.index(True)
    for name, p in w.items():
        if name.endswith("gate.gate_map.weight") and (not residual or f"layers.{first_moe}." in name):
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # G threads from MoE layer to the previous MoE layer (a dense layer in between passes it
    # through): last MoE layer's logits = R(x) + W_g G(previous MoE layer)
    if residual:
        moe_idx = [i for i, m in enumerate(moe_layers) if m]
        last, prev = moe_idx[-1], moe_idx[-2]
        la, fa = aux["layers"][last], aux["layers"][prev]
        lw = moe_weights(w, last)
        expect = router_logits(la["router_input"], lw, None, cfg) + fa["logits"] @ lw["gate.gate_map.weight"].T
        torch.testing.assert_close(la["logits"], expect)


def test_model_vanilla_and_capacity():
    cfg = RefConfig(vanilla=True, capacity_factor=1.0, **MODEL_KW)
    w, _, logits, aux, loss = _run_model(cfg)
    assert torch.isfinite(loss) and "model.layers.0.mlp.moe.gate.gate_map.weight" not in w
    assert w["model.layers.0.mlp.moe.gate.wg.weight"].shape == (4, 16)
    cfg = RefConfig(capacity_factor=1.1, routing="release", **MODEL_KW)
    _, _, _, aux, loss = _run_model(cfg)
    assert torch.isfinite(loss)
    cap_ffn, cap_zc = capacities(24, cfg)
    for la in aux["layers"]:
        counts = la["kept_mask"].sum(0)
        assert (counts[:4] <= cap_ffn).all() and (counts[4:] <= cap_zc).all()


def test_model_is_causal():
    cfg = RefConfig(**MODEL_KW)
    w = init_weights(cfg, 1)
    ids = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    ids2 = ids.clone()
    ids2[0, -1] = (ids[0, -1] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, _ = model_forward(ids, w, cfg)
        b, _ = model_forward(ids2, w, cfg)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_lm_loss_uniform_logits():
    logits = torch.zeros(1, 3, 10)
    torch.testing.assert_close(lm_loss(logits, torch.tensor([[1, 2, 3]])), torch.tensor(math.log(10)))
