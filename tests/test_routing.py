"""expert_routing vs transformers' own router logits; load statistics; the plot."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

import mixtral_jax as mj
from mixtral_jax import convert, routing, testing
from mixtral_jax.model import Mixtral


def test_expert_routing_matches_transformers_router():
    hf = testing.hf_model(seed=2, num_local_experts=6, num_experts_per_tok=2)
    cfg = testing.config_of(hf)
    model = Mixtral(cfg, jax.tree.map(jnp.asarray, convert.params_from_state_dict(testing.state_dict_numpy(hf), cfg)))
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 9))
    r = mj.expert_routing(model, tokens)
    assert r.experts.shape == r.weights.shape == (cfg.num_hidden_layers, 2, 9, 2)
    with torch.no_grad():
        out = hf(torch.tensor(tokens), output_router_logits=True)
    for layer, logits in enumerate(out.router_logits):  # [B*T, E] each
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_e = torch.topk(probs, 2, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        np.testing.assert_array_equal(r.experts[layer].reshape(-1, 2), top_e.numpy())
        np.testing.assert_allclose(r.weights[layer].reshape(-1, 2), top_w.numpy(), rtol=1e-5, atol=1e-6)
    one = mj.expert_routing(model, tokens[1].tolist())  # one list of ids: a batch of one
    np.testing.assert_array_equal(one.experts[:, 0], r.experts[:, 1])


def test_expert_load_and_plot(tmp_path):
    r = routing.Routing(experts=np.array([[[[0, 1], [0, 2], [3, 0]]]]), weights=np.full((1, 1, 3, 2), 0.5))
    np.testing.assert_allclose(routing.expert_load(r, 4), [[3 / 6, 1 / 6, 1 / 6, 1 / 6]])
    # The plot needs only a Routing (a model's comes from the test above): 4 layers, 5 tokens, top-2 of 8.
    experts = np.random.RandomState(0).randint(0, 8, (4, 1, 5, 2))
    rr = routing.Routing(experts=experts, weights=np.full(experts.shape, 0.5))
    fig = mj.plot_routing(rr, 8, token_labels=list("abcde"), path=tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 5000 and len(fig.axes) >= 2
