"""The one attention function of both views: block queries over a shared prefix and their own block.

    out = attention(q, block_k, block_v, prefix_k=..., prefix_v=..., prefix_len=...,
                    causal=True | False, block_mask=None, backend="auto")

Every mask the model uses is built here from position information:
- prefix part: block n of row b sees prefix keys j < prefix_len[b, n] (the KV cache up to each
  row's length, or a training row's AR keys before each block's anchor);
- block part: causal (AR view: query i sees block keys j <= i), all-to-all (diffusion view), or an
  explicit boolean `block_mask` broadcastable to [B, N, T, T] (tree verification).
Both parts share one softmax. GQA: H = KV * G, query head h uses KV head h // G.

Backends (`select_backend`):
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (flash attention) on GPU for
  bf16/fp16; the prefix and block parts are two calls merged by their log-sum-exp.
- "splash": the Pallas splash attention kernel that ships with JAX, on TPU, for the case its
  static masks express: a plain causal pass with no prefix (the training teacher, a first prefill
  chunk) at lengths that are multiples of its 128-token blocks.
- "xla": everywhere else. Online softmax over key chunks (and a scan over query chunks): never
  more than one [query chunk x key chunk] tile of scores per head group exists (many small
  blocks, as in training, go in groups of q_chunk / T blocks). Cost follows the live context,
  not the cache size: when decoding (`dynamic_skip`), a loop runs over the live prefix key chunks
  only (in prefill, those every row sees whole with no mask); under differentiation, key chunks
  past the longest visible prefix of a group (and, when causal, past the query chunk) are
  skipped with a `lax.cond` inside a static-trip-count scan (reverse-mode works; each chunk is
  rematerialised in the backward). A causal diagonal tile is
  split into query sub-blocks that score only the keys up to their own end, and the key chunks
  before it need no mask.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
BACKENDS = ("auto", "xla", "cudnn", "splash")
Q_CHUNK = 512
K_CHUNK = 512
DECODE_K_CHUNK = 128   # few queries (draft/verify/AR step): finer skipping of dead cache chunks
FEW_QUERIES = 64       # at most this many queries per block: a decoding pass (draft/verify/step)
DIAGONAL_SPLIT = 128   # a causal diagonal tile is computed as query sub-blocks of this size
SPLASH_BLOCK = 128
_NEG = -1e30


def select_backend(platform: str, dtype, head_dim: int, *, has_prefix: bool, causal: bool,
                   has_block_mask: bool, q_len: int) -> str:
    """The backend for one attention call (static: platform, dtype and shapes only)."""
    dtype = jnp.dtype(dtype)
    if platform == "gpu" and dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 \
            and head_dim <= 128:
        return "cudnn"
    if platform == "tpu" and not has_prefix and causal and not has_block_mask \
            and q_len % SPLASH_BLOCK == 0:
        return "splash"
    return "xla"


def attention(q: Array, block_k: Array, block_v: Array, *, prefix_k: Array | None = None,
              prefix_v: Array | None = None, prefix_len: Array | None = None,
              causal: bool, block_mask: Array | None = None, backend: str = "auto",
              layer: Array | None = None, q_chunk: int = Q_CHUNK, k_chunk: int | None = None,
              dynamic_skip: bool = False, interpret: bool = False,
              diagonal_split: int = DIAGONAL_SPLIT) -> Array:
    """Attention of N blocks of T queries per row over a shared prefix and over their own block.

    q: [B, N, T, H, hd]; block_k/v: [B, N, T, KV, hd] (the block's own keys).
    prefix_k/v: [B, S, KV, hd] or None (no prefix); prefix_len: int [B, N], visible prefix keys
      per block (j < prefix_len). causal: the block part is causal (AR view) or all-to-all.
    block_mask: optional bool, broadcastable to [B, N, T, T]; replaces the causal/all rule.
    layer: optional int index; then prefix_k/v are the whole cache [layers, B, S, KV, hd] and the
      XLA path reads this layer's key chunks straight from it (no per-layer copy of the cache).
    backend: "auto" (by platform, dtype and shape; see select_backend) or one of BACKENDS.
    dynamic_skip (XLA path): loop over the live prefix key chunks only (a loop with a traced
      trip count: cheapest for decoding, not reverse-differentiable); otherwise a static-trip
      scan that skips dead chunks with lax.cond (differentiable).
    diagonal_split (XLA path, causal): query sub-block size of a diagonal tile.
    Returns [B, N, T, H, hd] in q's dtype. Every query must see at least one key.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if diagonal_split < 1:
        raise ValueError(f"attention diagonal_split must be >= 1, got {diagonal_split}")
    has_prefix = prefix_k is not None
    if has_prefix and prefix_len is None:
        raise ValueError("prefix_len is required with prefix_k/prefix_v")
    if backend == "auto":
        backend = select_backend(jax.default_backend(), q.dtype, q.shape[-1],
                                 has_prefix=has_prefix, causal=causal,
                                 has_block_mask=block_mask is not None, q_len=q.shape[2])
    if layer is not None and backend != "xla":
        prefix_k, prefix_v = prefix_k[layer], prefix_v[layer]
        layer = None
    if backend == "cudnn":
        return _dpa(q, block_k, block_v, prefix_k, prefix_v, prefix_len, causal, block_mask,
                    "cudnn")
    if backend == "splash":
        if has_prefix or not causal or block_mask is not None:
            raise ValueError("the splash backend serves causal attention without a prefix only")
        return _splash_causal(q, block_k, block_v, interpret)
    if k_chunk is None:
        k_chunk = DECODE_K_CHUNK if q.shape[2] <= FEW_QUERIES else K_CHUNK
    b, n, t = q.shape[:3]
    group = max(1, q_chunk // t)
    if has_prefix and n > group and block_mask is None:
        return _xla_block_groups(q, block_k, block_v, prefix_k, prefix_v, prefix_len, causal,
                                 group, q_chunk, k_chunk, dynamic_skip, layer)
    return _xla_chunked(q, block_k, block_v, prefix_k, prefix_v, prefix_len, causal, block_mask,
                        q_chunk, k_chunk, dynamic_skip, layer, diagonal_split)


# ---------------------------------------------------------------------------------------------
# XLA: online softmax over key chunks


def _update(state, s, vis, v, pv_dot):
    """One online-softmax step: scores s [..., M, kc] (fp32), visibility vis, values v.

    Invisible scores become -inf; the running max starts finite (_NEG), so exp of an invisible
    score is exactly 0 with no second mask, even in a row that has seen no visible key yet.
    vis None: every score is visible (no select pass over the tile).
    pv_dot(p, v) is the probabilities-times-values matmul into the accumulator's layout."""
    m, l, acc = state
    if vis is not None:
        s = jnp.where(vis, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    l = l * corr + jnp.sum(p, axis=-1)
    return m_new, l, acc * corr[..., None] + pv_dot(p.astype(v.dtype), v)


def _bdot(x, y, contract, batch):
    """dot_general with fp32 accumulation, batch dims leading in both operands and the output
    (written out rather than einsum: einsum's output transpose, even over size-1 axes, makes
    XLA:CPU lay the product out transposed and copy every score tile back)."""
    return jax.lax.dot_general(x, y, ((contract[0], contract[1]), (batch, batch)),
                               preferred_element_type=jnp.float32)


def _xla_block_groups(q, bk, bv, pk, pv, plen, causal, group, q_chunk, k_chunk, dynamic, layer):
    """Many blocks per row (training): a scan over groups of `group` blocks, each skipping the
    prefix key chunks past its own longest prefix (sorted anchors: early groups stop early)."""
    b, n, t, h, d = q.shape
    ng = -(-n // group)
    pad = ng * group - n

    def split(x):  # [B, N, ...] -> [G, B, group, ...]; padded blocks see no prefix
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, ng, group, *x.shape[2:]), 1, 0)

    def one(_, xs):
        qq, kk, vv, ll = xs
        return None, _xla_chunked(qq, kk, vv, pk, pv, ll, causal, None, q_chunk, k_chunk,
                                  dynamic, layer)

    _, out = jax.lax.scan(one, None, (split(q), split(bk), split(bv), split(plen)))
    return jnp.moveaxis(out, 0, 1).reshape(b, ng * group, t, h, d)[:, :n]


def _xla_chunked(q, bk, bv, pk, pv, plen, causal, bmask, q_chunk, k_chunk, dynamic=False,
                 layer=None, sub=DIAGONAL_SPLIT):
    """Queries in chunks of qc; a chunk's G query heads per KV head are M = qc * G rows (row r is
    query r // G), and the N blocks' rows stack for the shared prefix: every score tile
    [B, KV, N, M, kc] is one batched matmul laid out as the softmax reduces it (no transposes
    of scores, probabilities or values inside the key loop)."""
    b, n, t, h, d = q.shape
    kv = bk.shape[3]
    g = h // kv
    qc = min(q_chunk, t)
    nq = -(-t // qc)
    tp = nq * qc
    rows = qc * g
    qg = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, n, t, kv, g, d)
    if tp != t:  # pad queries and block keys to whole chunks; padded keys are invisible
        pad = [(0, 0), (0, 0), (0, tp - t), (0, 0), (0, 0)]
        qg = jnp.pad(qg, pad + [(0, 0)])
        bk, bv = jnp.pad(bk, pad), jnp.pad(bv, pad)
    if bmask is not None:
        bmask = jnp.broadcast_to(bmask, (b, n, t, t))
        if tp != t:
            bmask = jnp.pad(bmask, [(0, 0), (0, 0), (0, tp - t), (0, tp - t)])
    # [nq, B, KV, N, M, d]: each query chunk's rows per KV head; block keys [B, KV, N, tp, d]
    q_rows = jnp.transpose(qg.reshape(b, n, nq, qc, kv, g, d), (2, 0, 4, 1, 3, 5, 6))
    q_rows = q_rows.reshape(nq, b, kv, n, rows, d)
    bk, bv = jnp.transpose(bk, (0, 3, 1, 2, 4)), jnp.transpose(bv, (0, 3, 1, 2, 4))
    row_query = jnp.arange(rows, dtype=jnp.int32) // g      # query index (in the chunk) of a row

    if pk is not None:
        s_len = pk.shape[1 if layer is None else 2]
        kc = min(k_chunk, s_len)

        def read(cache, start):  # [B, KV, kc, d] of this layer
            if layer is None:
                x = jax.lax.dynamic_slice_in_dim(cache, start, kc, axis=1)
            else:
                size = (1, *cache.shape[1:2], kc, *cache.shape[3:])
                x = jax.lax.dynamic_slice(cache, (layer, 0, start, 0, 0), size)[0]
            return jnp.transpose(x, (0, 2, 1, 3))

        nk = -(-s_len // kc)
        plen = plen.astype(jnp.int32)
        max_plen = jnp.max(plen)

        def prefix_pv(p, v):     # [B, KV, N, M, kc] x [B, KV, kc, d]
            out = _bdot(p.reshape(b, kv, n * rows, kc), v, ((3,), (2,)), (0, 1))
            return out.reshape(b, kv, n, rows, d)

    def block_pv(p, v):          # [B, KV, N, M, qc] x [B, KV, N, qc, d]
        return _bdot(p, v, ((4,), (3,)), (0, 1, 2))

    def one_query_chunk(qi, qblk):
        state = (jnp.full((b, kv, n, rows), _NEG, jnp.float32),
                 jnp.zeros((b, kv, n, rows), jnp.float32),
                 jnp.zeros((b, kv, n, rows, d), jnp.float32))
        if pk is not None:
            q_flat = qblk.reshape(b, kv, n * rows, d)

            def prefix_step(state, c, masked=True):
                start = jnp.minimum(c * kc, s_len - kc)   # the last chunk may overlap: mask it
                k, v = read(pk, start), read(pv, start)
                s = _bdot(q_flat, k, ((3,), (3,)), (0, 1)).reshape(b, kv, n, rows, kc)
                if not masked:    # a chunk every row and block sees whole
                    return _update(state, s, None, v, prefix_pv)
                idx = start + jnp.arange(kc, dtype=jnp.int32)
                vis = (idx >= c * kc)[None, None, :] & (idx[None, None, :] < plen[:, :, None])
                return _update(state, s, vis[:, None, :, None, :], v, prefix_pv)

            n_live = jnp.minimum((max_plen + kc - 1) // kc, nk)   # chunks any row sees
            if dynamic and t <= FEW_QUERIES:   # only the live chunks: a traced trip count
                step = jax.checkpoint(prefix_step)
                state = jax.lax.fori_loop(0, n_live, lambda c, st: step(st, c), state)
            elif dynamic:  # many queries (prefill): the chunks every row sees whole, unmasked
                n_whole = jnp.minimum(jnp.min(plen) // kc, n_live)
                whole = jax.checkpoint(functools.partial(prefix_step, masked=False))
                part = jax.checkpoint(prefix_step)
                state = jax.lax.fori_loop(0, n_whole, lambda c, st: whole(st, c), state)
                state = jax.lax.fori_loop(n_whole, n_live, lambda c, st: part(st, c), state)
            else:         # every chunk, dead ones skipped: reverse-differentiable
                step = jax.checkpoint(prefix_step)

                def prefix_body(state, c):
                    return jax.lax.cond(c < n_live, step, lambda s, _: s, state, c), None

                state, _ = jax.lax.scan(prefix_body, state, jnp.arange(nk, dtype=jnp.int32))

        q_idx = qi * qc + row_query                                  # [M] query of each row

        def block_step(state, c, masked=True):
            k = jax.lax.dynamic_slice_in_dim(bk, c * qc, qc, axis=3)
            v = jax.lax.dynamic_slice_in_dim(bv, c * qc, qc, axis=3)
            k_idx = c * qc + jnp.arange(qc, dtype=jnp.int32)
            if not masked:
                vis = None
            elif bmask is not None:
                vis = jax.lax.dynamic_slice(bmask, (0, 0, qi * qc, c * qc), (b, n, qc, qc))
                vis = jnp.broadcast_to(vis[:, :, :, None], (b, n, qc, g, qc))
                vis = vis.reshape(b, 1, n, rows, qc)
            else:
                vis = k_idx[None, :] < t
                if causal:
                    vis = vis & (k_idx[None, :] <= q_idx[:, None])
            s = _bdot(qblk, k, ((4,), (4,)), (0, 1, 2))              # [B, KV, N, M, qc]
            return _update(state, s, vis, v, block_pv)

        split_diagonal = causal and bmask is None and qc > sub

        @jax.checkpoint
        def diagonal_step(state, c):
            """The causal tile c == qi as query sub-blocks of `sub` queries (the last one shorter
            when sub does not divide qc), each scored against the keys up to its own end only
            (keys past it are invisible): ~5/8 of the whole tile at 4 sub-blocks."""
            parts = []
            for j in range(-(-qc // sub)):
                width = min((j + 1) * sub, qc)
                r0, r1 = j * sub * g, width * g
                k = jax.lax.dynamic_slice_in_dim(bk, c * qc, width, axis=3)
                v = jax.lax.dynamic_slice_in_dim(bv, c * qc, width, axis=3)
                k_idx = c * qc + jnp.arange(width, dtype=jnp.int32)
                vis = (k_idx[None, :] < t) & (k_idx[None, :] <= q_idx[r0:r1, None])
                s = _bdot(qblk[:, :, :, r0:r1], k, ((4,), (4,)), (0, 1, 2))
                parts.append(_update(tuple(x[:, :, :, r0:r1] for x in state), s, vis, v,
                                     block_pv))
            return tuple(jnp.concatenate(xs, axis=3) for xs in zip(*parts))

        masked_block = jax.checkpoint(block_step)
        whole_block = jax.checkpoint(functools.partial(block_step, masked=False))

        def block_body(state, c):
            if not causal or bmask is not None:
                return masked_block(state, c), None
            if not split_diagonal:
                return jax.lax.cond(c <= qi, masked_block, lambda s, _: s, state, c), None
            # c < qi: every key of chunk c precedes every query (no mask); c > qi: skipped
            branch = jnp.clip(c - qi + 1, 0, 2)
            return jax.lax.switch(branch, [whole_block, diagonal_step, lambda s, _: s],
                                  state, c), None

        if nq == 1 and split_diagonal:
            state = diagonal_step(state, jnp.int32(0))
        else:
            state, _ = jax.lax.scan(block_body, state, jnp.arange(nq, dtype=jnp.int32))
        m, l, acc = state
        out = acc / jnp.maximum(l, 1e-30)[..., None]               # [B, KV, N, M, d]
        out = out.reshape(b, kv, n, qc, g, d)
        return jnp.transpose(out, (0, 2, 3, 1, 4, 5)).astype(q.dtype)  # [B, N, qc, KV, G, d]

    if nq == 1:
        out = one_query_chunk(jnp.int32(0), q_rows[0])
    else:
        _, outs = jax.lax.scan(lambda c, x: (c, one_query_chunk(*x)), None,
                               (jnp.arange(nq, dtype=jnp.int32), q_rows))
        out = jnp.moveaxis(outs, 0, 2).reshape(b, n, tp, kv, g, d)
    return out[:, :, :t].reshape(b, n, t, h, d)


# ---------------------------------------------------------------------------------------------
# jax.nn.dot_product_attention (cuDNN flash attention on GPU)


def _dpa(q, bk, bv, pk, pv, plen, causal, bmask, implementation):
    """Prefix and block parts as two dot_product_attention calls, merged by log-sum-exp."""
    b, n, t, h, d = q.shape
    kv = bk.shape[3]
    out_b, lse_b = jax.nn.dot_product_attention(
        q.reshape(b * n, t, h, d), bk.reshape(b * n, t, kv, d), bv.reshape(b * n, t, kv, d),
        mask=(None if bmask is None
              else jnp.broadcast_to(bmask, (b, n, t, t)).reshape(b * n, 1, t, t)),
        is_causal=causal and bmask is None, implementation=implementation,
        return_residual=True)
    out_b, lse_b = out_b.reshape(b, n, t, h, d), lse_b.reshape(b, n, t, h)
    if pk is None:
        return out_b
    plen = plen.astype(jnp.int32)
    if n == 1:   # one block per row: the prefix is a padded sequence of prefix_len keys
        out_p, lse_p = jax.nn.dot_product_attention(
            q[:, 0], pk, pv, key_value_seq_lengths=jnp.maximum(plen[:, 0], 1),
            implementation=implementation, return_residual=True)
    else:        # training: all blocks of a row in one sequence, per-block prefix lengths
        s_len = pk.shape[1]
        vis = jnp.arange(s_len)[None, None, :] < plen[:, :, None]            # [B, N, S]
        mask = jnp.broadcast_to(vis[:, :, None, :], (b, n, t, s_len)).reshape(b, 1, n * t, s_len)
        out_p, lse_p = jax.nn.dot_product_attention(
            q.reshape(b, n * t, h, d), pk, pv, mask=mask, implementation=implementation,
            return_residual=True)
    out_p, lse_p = out_p.reshape(b, n, t, h, d), lse_p.reshape(b, n, t, h).astype(jnp.float32)
    lse_p = jnp.where((plen > 0)[:, :, None, None], lse_p, -jnp.inf)
    lse_b = lse_b.astype(jnp.float32)
    lse = jnp.logaddexp(lse_p, lse_b)
    w_p = jnp.exp(lse_p - lse)[..., None]
    w_b = jnp.exp(lse_b - lse)[..., None]
    out = out_p.astype(jnp.float32) * w_p + out_b.astype(jnp.float32) * w_b
    return out.astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# Pallas splash attention (TPU; interpret mode elsewhere)


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, length: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(heads)])
    block = min(SPLASH_BLOCK * 4, length)
    sizes = sk.BlockSizes(block_q=block, block_kv_compute=block, block_kv=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash_causal(q, bk, bv, interpret):
    """Causal self-attention of each block (no prefix): kernel layout [heads, T, hd] per block."""
    b, n, t, h, d = q.shape
    kv = bk.shape[3]
    g = h // kv
    kernel = _splash_kernel(h, t, interpret)
    qh = jnp.moveaxis(q.reshape(b * n, t, h, d), 1, 2) * jnp.asarray(d ** -0.5, q.dtype)
    # MHA kernel: repeat each KV head for its G query heads (GQA)
    kh = jnp.repeat(jnp.moveaxis(bk.reshape(b * n, t, kv, d), 1, 2), g, axis=1)
    vh = jnp.repeat(jnp.moveaxis(bv.reshape(b * n, t, kv, d), 1, 2), g, axis=1)
    out = jax.vmap(kernel)(qh, kh, vh)                                  # [B*N, H, T, hd]
    return jnp.moveaxis(out, 1, 2).reshape(b, n, t, h, d).astype(q.dtype)

