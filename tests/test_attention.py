"""orthrus_jax.attention: every backend that runs here equals the dense two-source attention."""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthrus_jax.attention import attention, select_backend

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    """fp32 means fp32 on a GPU too (its default matmul precision is TF32: ~1e-3 off)."""
    with jax.default_matmul_precision("highest"):
        yield


def dense_reference(q, prefix_k, prefix_v, prefix_len, block_k, block_v, causal, block_mask=None):
    """The dense path the model used before orthrus_jax.attention: full fp32 scores, one softmax."""
    b, n, t, h, d = q.shape
    kv = block_k.shape[3]
    qg = q.reshape(b, n, t, kv, h // kv, d) * d ** -0.5
    neg = jnp.finfo(jnp.float32).min
    if block_mask is None:
        block_mask = jnp.tril(jnp.ones((t, t), bool)) if causal else jnp.ones((t, t), bool)
    block_mask = jnp.broadcast_to(block_mask, (b, n, t, t))[:, :, None, None]
    s_blk = jnp.where(block_mask, jnp.einsum("bntkgd,bnskd->bnkgts", qg, block_k), neg)
    parts, values = [s_blk], [("bnkgts,bnskd->bntkgd", block_v)]
    if prefix_k is not None:
        vis = jnp.arange(prefix_k.shape[1])[None, None, :] < prefix_len[:, :, None]
        s_pre = jnp.where(vis[:, :, None, None, None, :],
                          jnp.einsum("bntkgd,bskd->bnkgts", qg, prefix_k), neg)
        parts, values = [s_pre] + parts, [("bnkgts,bskd->bntkgd", prefix_v)] + values
    probs = jax.nn.softmax(jnp.concatenate(parts, -1), -1)
    out, start = 0.0, 0
    for p_scores, (eq, v) in zip(parts, values):
        width = p_scores.shape[-1]
        out = out + jnp.einsum(eq, probs[..., start:start + width], v)
        start += width
    return out.reshape(b, n, t, h, d)


def _seed(name: str) -> int:
    """A fixed seed per case name (str hash() changes with each process's hash seed)."""
    return zlib.crc32(name.encode()) % 1000


def _inputs(seed, b, n, t, s, h, kv, d=16):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (b, n, t, h, d))
    bk = jax.random.normal(ks[1], (b, n, t, kv, d))
    bv = jax.random.normal(ks[2], (b, n, t, kv, d))
    pk = jax.random.normal(ks[3], (b, s, kv, d)) if s else None
    pv = jax.random.normal(ks[4], (b, s, kv, d)) if s else None
    return q, bk, bv, pk, pv


CASES = {
    # name: (b, n, t, s, h, kv, prefix_len, causal)
    "ar-decode-ragged": (3, 1, 5, 70, 4, 2, [[0], [33], [70]], True),
    "ar-verify-ragged": (2, 1, 5, 70, 4, 2, [[37], [70]], True),
    "ar-prefill-chunk": (2, 1, 40, 90, 2, 1, [[40], [40]], True),
    # more than FEW_QUERIES queries: the live loop's unmasked whole-chunk prefix, ragged rows
    "ar-prefill-ragged": (2, 1, 72, 90, 2, 1, [[37], [90]], True),
    "ar-no-prefix-long": (2, 1, 45, 0, 4, 1, None, True),
    "diffusion-draft-ragged": (2, 1, 8, 50, 4, 4, [[13], [49]], False),
    "diffusion-training-blocks": (2, 3, 8, 40, 4, 2, [[1, 9, 20], [5, 17, 32]], False),
}


def _run_case(name, backend, **kw):
    b, n, t, s, h, kv, plen, causal = CASES[name]
    q, bk, bv, pk, pv = _inputs(_seed(name), b, n, t, s, h, kv)
    plen = None if plen is None else jnp.asarray(plen, jnp.int32)
    fn = jax.jit(lambda *a: attention(a[0], a[1], a[2], prefix_k=a[3], prefix_v=a[4],
                                      prefix_len=a[5], causal=causal, backend=backend, **kw))
    ours = fn(q, bk, bv, pk, pv, plen)
    ref = dense_reference(q, pk, pv, plen, bk, bv, causal)
    return np.asarray(ours), np.asarray(ref)


@pytest.mark.parametrize("dynamic_skip", [False, True], ids=["scan", "live-loop"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_xla_chunked_equals_dense(name, dynamic_skip):
    """Small chunks (8 queries x 16 keys, causal diagonal tiles split into 4-query sub-blocks) so
    that several query and key chunks, a partial last chunk, skipped chunks, prefix chunks every
    row sees whole (unmasked) and split diagonals are all exercised; both views' masks, ragged
    prefix lengths; the differentiable scan and the decoding loop over live chunks."""
    ours, ref = _run_case(name, "xla", q_chunk=8, k_chunk=16, diagonal_split=4,
                          dynamic_skip=dynamic_skip)
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_dot_product_attention_path_equals_dense(name):
    """The cuDNN backend's code path (two jax.nn.dot_product_attention calls merged by their
    log-sum-exp) run with jax's XLA implementation, the only one this CPU has."""
    from orthrus_jax import attention as A

    b, n, t, s, h, kv, plen, causal = CASES[name]
    q, bk, bv, pk, pv = _inputs(_seed(name), b, n, t, s, h, kv)
    plen = None if plen is None else jnp.asarray(plen, jnp.int32)
    ours = jax.jit(lambda *a: A._dpa(*a, causal, None, "xla"))(q, bk, bv, pk, pv, plen)
    ref = dense_reference(q, pk, pv, plen, bk, bv, causal)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=ATOL, rtol=0)


BF16_TOL = 2e-2   # bf16 inputs and output: a few units in the last place of outputs of order one


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
@pytest.mark.parametrize("name", sorted(CASES))
def test_cudnn_equals_dense_bf16_on_gpu(name):
    """The cuDNN backend itself (GPU, bf16, head_dim 128 as in Qwen3) against the dense fp32
    reference on the same bf16-rounded inputs; both views' masks, ragged prefix lengths."""
    b, n, t, s, h, kv, plen, causal = CASES[name]
    args = [None if x is None else x.astype(jnp.bfloat16)
            for x in _inputs(_seed(name), b, n, t, s, h, kv, d=128)]
    q, bk, bv, pk, pv = args
    plen = None if plen is None else jnp.asarray(plen, jnp.int32)
    fn = jax.jit(lambda *a: attention(a[0], a[1], a[2], prefix_k=a[3], prefix_v=a[4],
                                      prefix_len=a[5], causal=causal, backend="cudnn"))
    ours = np.asarray(fn(q, bk, bv, pk, pv, plen).astype(jnp.float32))
    f32 = [None if x is None else x.astype(jnp.float32) for x in args]
    ref = np.asarray(dense_reference(f32[0], f32[3], f32[4], plen, f32[1], f32[2], causal))
    np.testing.assert_allclose(ours, ref, atol=BF16_TOL, rtol=BF16_TOL)


@pytest.mark.parametrize("backend", ["xla", "dpa"])
def test_explicit_block_mask_equals_dense(backend):
    """An explicit block mask (a tree: each query sees itself and its ancestors) replaces the
    causal rule; the prefix part is unchanged."""
    from orthrus_jax import attention as A

    b, n, t, s, h, kv = 2, 1, 6, 30, 4, 2
    q, bk, bv, pk, pv = _inputs(5, b, n, t, s, h, kv)
    parent = [-1, 0, 0, 1, 2, 2]
    tree = np.eye(t, dtype=bool)
    for i in range(t):
        j = parent[i]
        while j >= 0:
            tree[i, j] = True
            j = parent[j]
    plen = jnp.asarray([[11], [30]], jnp.int32)
    mask = jnp.asarray(tree)
    if backend == "xla":
        ours = attention(q, bk, bv, prefix_k=pk, prefix_v=pv, prefix_len=plen, causal=True,
                         block_mask=mask, backend="xla", q_chunk=4, k_chunk=8)
    else:
        ours = A._dpa(q, bk, bv, pk, pv, plen, True, mask, "xla")
    ref = dense_reference(q, pk, pv, plen, bk, bv, True, block_mask=mask)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=ATOL, rtol=0)


def test_xla_chunked_gradient_equals_dense():
    """Reverse mode through the chunk scans (with skipped chunks) equals the dense gradient."""
    b, n, t, s, h, kv, plen, causal = CASES["diffusion-training-blocks"]
    q, bk, bv, pk, pv = _inputs(9, b, n, t, s, h, kv)
    plen = jnp.asarray(plen, jnp.int32)
    w = jax.random.normal(jax.random.PRNGKey(1), q.shape)

    def loss(fn, q, pk):
        return jnp.sum(fn(q, pk) * w)

    ours = jax.grad(lambda q, pk: loss(lambda q, pk: attention(
        q, bk, bv, prefix_k=pk, prefix_v=pv, prefix_len=plen, causal=False, backend="xla",
        q_chunk=4, k_chunk=8), q, pk), argnums=(0, 1))(q, pk)
    ref = jax.grad(lambda q, pk: loss(lambda q, pk: dense_reference(
        q, pk, pv, plen, bk, bv, False), q, pk), argnums=(0, 1))(q, pk)
    for a, r in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=ATOL, rtol=0)


def test_causal_split_diagonal_gradient_equals_dense():
    """Reverse mode through a causal pass with no prefix (the training teacher): whole key chunks
    before the diagonal (no mask), split diagonal tiles, a padded last chunk."""
    b, n, t, s, h, kv, _, _ = CASES["ar-no-prefix-long"]
    q, bk, bv, _, _ = _inputs(11, b, n, t, 0, h, kv)
    w = jax.random.normal(jax.random.PRNGKey(2), q.shape)
    ours = jax.grad(lambda q, k: jnp.sum(w * attention(
        q, k, bv, causal=True, backend="xla", q_chunk=8, diagonal_split=4)), argnums=(0, 1))(q, bk)
    ref = jax.grad(lambda q, k: jnp.sum(w * dense_reference(
        q, None, None, None, k, bv, True)), argnums=(0, 1))(q, bk)
    for a, r in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=ATOL, rtol=0)


@pytest.mark.parametrize("split", [8, 10], ids=["divides", "shorter-last"])
def test_one_query_chunk_split_diagonal_equals_dense(split):
    """One query chunk (q_chunk >= T, the default prefill shape) with its diagonal tile split
    (sub-blocks of 8, or of 10 with a shorter last one), over ragged prefixes through the live
    loop; and reverse mode through the split diagonal with no prefix."""
    b, n, t, s, h, kv, plen, _ = CASES["ar-prefill-ragged"]
    q, bk, bv, pk, pv = _inputs(13, b, n, t, s, h, kv)
    plen = jnp.asarray(plen, jnp.int32)
    ours = jax.jit(lambda q: attention(q, bk, bv, prefix_k=pk, prefix_v=pv, prefix_len=plen,
                                       causal=True, backend="xla", q_chunk=128, k_chunk=16,
                                       diagonal_split=split, dynamic_skip=True))(q)
    ref = dense_reference(q, pk, pv, plen, bk, bv, True)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=ATOL, rtol=0)
    w = jax.random.normal(jax.random.PRNGKey(3), q.shape)
    grads = jax.grad(lambda q, k: jnp.sum(w * attention(
        q, k, bv, causal=True, backend="xla", q_chunk=128, diagonal_split=split)),
        argnums=(0, 1))(q, bk)
    ref_grads = jax.grad(lambda q, k: jnp.sum(w * dense_reference(
        q, None, None, None, k, bv, True)), argnums=(0, 1))(q, bk)
    for a, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=ATOL, rtol=0)


def test_diagonal_split_below_one_is_an_error():
    q = jnp.zeros((1, 1, 2, 2, 8))
    k = jnp.zeros((1, 1, 2, 1, 8))
    with pytest.raises(ValueError, match="diagonal_split"):
        attention(q, k, k, causal=True, backend="xla", diagonal_split=0)


def test_splash_interpret_equals_dense():
    """The Pallas splash kernel (TPU), run in interpret mode on the CPU: causal, no prefix."""
    b, n, t, h, kv = 1, 1, 256, 2, 1
    q, bk, bv, _, _ = _inputs(3, b, n, t, 0, h, kv, d=128)
    ours = jax.jit(lambda q, k, v: attention(q, k, v, causal=True, backend="splash",
                                             interpret=True))(q, bk, bv)
    ref = dense_reference(q, None, None, None, bk, bv, True)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=ATOL, rtol=0)


def test_select_backend():
    kw = dict(has_prefix=True, causal=True, has_block_mask=False, q_len=32)
    assert select_backend("gpu", jnp.bfloat16, 128, **kw) == "cudnn"
    assert select_backend("gpu", jnp.float16, 64, **kw) == "cudnn"
    assert select_backend("gpu", jnp.float32, 128, **kw) == "xla"     # cuDNN rejects fp32
    assert select_backend("gpu", jnp.bfloat16, 256, **kw) == "xla"    # head_dim too large
    assert select_backend("cpu", jnp.bfloat16, 128, **kw) == "xla"
    assert select_backend("tpu", jnp.bfloat16, 128, **kw) == "xla"    # per-row prefix lengths
    no_prefix = dict(kw, has_prefix=False, q_len=2048)
    assert select_backend("tpu", jnp.bfloat16, 128, **no_prefix) == "splash"
    assert select_backend("tpu", jnp.float32, 128, **no_prefix) == "splash"
    assert select_backend("tpu", jnp.bfloat16, 128, **dict(no_prefix, q_len=100)) == "xla"
    assert select_backend("tpu", jnp.bfloat16, 128, **dict(no_prefix, causal=False)) == "xla"
    assert select_backend("tpu", jnp.bfloat16, 128,
                          **dict(no_prefix, has_block_mask=True)) == "xla"


def test_bad_backend_is_an_error():
    q = jnp.zeros((1, 1, 2, 2, 8))
    k = jnp.zeros((1, 1, 2, 1, 8))
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, k, causal=True, backend="flash")


def test_xla_block_groups_equal_dense():
    """Many blocks per row go in groups (here 2 blocks of 8 queries, a padded last group), each
    group skipping the prefix chunks past its own anchors."""
    b, n, t, s, h, kv = 2, 5, 8, 64, 4, 2
    q, bk, bv, pk, pv = _inputs(11, b, n, t, s, h, kv)
    plen = jnp.asarray([[1, 9, 20, 40, 56], [3, 4, 30, 31, 60]], jnp.int32)
    ours = jax.jit(lambda q, pk: attention(q, bk, bv, prefix_k=pk, prefix_v=pv, prefix_len=plen,
                                           causal=False, backend="xla", q_chunk=16,
                                           k_chunk=16))(q, pk)
    ref = dense_reference(q, pk, pv, plen, bk, bv, False)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=ATOL, rtol=0)
