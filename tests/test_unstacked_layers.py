"""Per-layer (unstacked) weights: the same model, run as an unrolled loop over layers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import decoder
from orthrus_jax.checkpoint import load_model
from orthrus_jax.model import causal_forward
from orthrus_jax.params import iter_leaves, unstack_layers
from tests.conftest import REPO


@pytest.fixture(scope="module")
def demo():
    return load_model(str(REPO / "checkpoints" / "demo"), jnp.float32)


def test_unstack_layers_splits_every_stacked_leaf(demo):
    cfg, params = demo
    per_layer = unstack_layers(params)
    assert isinstance(per_layer["layers"], tuple) and len(per_layer["layers"]) == cfg.num_layers
    for name, arr in iter_leaves(params):
        if name.startswith("layers/"):
            key = name[len("layers/"):]
            for i, lp in enumerate(per_layer["layers"]):
                np.testing.assert_array_equal(np.asarray(lp[key]), np.asarray(arr[i]), err_msg=name)
        else:
            assert per_layer[name] is arr
    with pytest.raises(ValueError, match="layer count"):
        unstack_layers({"layers": {"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 3))}})


def test_unstacked_forward_and_generation_equal_stacked(demo):
    """The AR forward (hidden states and per-layer K/V) agrees to fp32 rounding, and greedy
    generation gives the same tokens in AR and Orthrus mode, over ragged prompts."""
    cfg, params = demo
    per_layer = unstack_layers(params)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 40), 2, cfg.vocab_size)
    for a, b in zip(causal_forward(params, cfg, tokens), causal_forward(per_layer, cfg, tokens)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    prompts = [np.asarray(tokens[0, :23]).tolist(), np.asarray(tokens[1]).tolist()]
    for mode in ("ar", "orthrus"):
        kw = dict(mode=mode, max_new_tokens=24, batch_size=2, eos_token_ids=())
        stacked = [r.token_ids for r in decoder.generate(params, cfg, prompts, **kw)]
        unrolled = [r.token_ids for r in decoder.generate(per_layer, cfg, prompts, **kw)]
        assert stacked == unrolled, mode
