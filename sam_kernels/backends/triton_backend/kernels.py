"""Triton kernels over tiled tensor lists (docs/DESIGN.md §2–§3, §6).

Every kernel takes a *tile table*: program ``i`` works on ``BLOCK`` elements
of tensor ``tile_tensor[i]`` starting at element ``tile_start[i]`` (a multiple
of ``BLOCK``, int64). Per-tensor metadata is indexed by that slot:

* ``w_ptrs``, ``g_ptrs``, ``s_ptrs``: int64 addresses of the weight, gradient
  and saved copy (all contiguous, of the bucket's dtypes); the fused second
  step's ``m_ptrs``, ``v_ptrs``, ``vmax_ptrs``: optimizer state of the weight's
  dtype (or a placeholder that is never addressed where the tensor has no such state);
* ``numels``: elements of the tensor (int64);
* ``fsizes``: elements per filter (``numel / size(0)`` for ndim ≥ 2, 0 for
  ndim ≤ 1, whose elements are their own groups);
* ``fnorm_offs``: where the tensor's filter norms start in ``fnorms``.

Reductions write one partial per tile (fixed slots) that the host side sums
in a fixed order, so results are bit-reproducible. Arithmetic is in ``ACC``
(float32, or float64 for float64 tensors).

Modes of the ASAM scale t: 0 = SAM (t ≡ 1), 1 = element-wise |w| + η,
2 = filter-wise ‖f_i‖ + η (element-wise for ndim ≤ 1 tensors).
"""

import triton
import triton.language as tl

MODE_SAM = 0
MODE_ELEMENT = 1
MODE_FILTER = 2

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
TWO_PI_F32 = tl.constexpr(6.2831854820251465)  # float32(2π)
NOISE_SCALARS = ["key0", "key1", "step"]  # never specialised: any value, one compiled kernel


@triton.jit
def _tile(tile_tensor, tile_start, numels, BLOCK: tl.constexpr):
    """This program's tile: (pid, slot of its tensor, first element (int64), whether all BLOCK elements
    are in the tensor, how many are (int32, ≤ BLOCK))."""
    pid = tl.program_id(0)
    slot = tl.load(tile_tensor + pid)
    start = tl.multiple_of(tl.load(tile_start + pid), BLOCK)
    remaining = tl.load(numels + slot) - start
    return pid, slot, start, remaining >= BLOCK, tl.minimum(remaining, BLOCK).to(tl.int32)


@triton.jit
def _tile_ptr(ptrs, slot, start, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """Address of element ``start`` of tensor ``slot`` (a scalar pointer: per-element offsets stay int32).

    ALIGNED: every address of the table is a multiple of 16 bytes (the host checks), so full tiles
    compile to 16-byte vector loads and stores.
    """
    base = tl.load(ptrs + slot).to(tl.pointer_type(dtype))
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    return base + start


@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr):
    """Masked loads (zeros outside) for a partial tile; plain loads, which vectorise, for a full one."""
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _store(ptrs, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, x, mask=mask)
    else:
        tl.store(ptrs, x)


@triton.jit
def _filter_value(w, lanes, mask, start, slot, fsizes, fnorm_offs, fnorms, MASKED: tl.constexpr):
    """‖f_i‖ of each element's filter (ndim ≥ 2) or |w| (ndim ≤ 1), in w's dtype.

    Element start + l lies in filter start // fsize + (start % fsize + l) // fsize: one int64
    division per tile, one 32-bit division per element (the host routes filters of more than
    2³¹ − 2¹⁶ elements to foreach, so start % fsize + l < 2³¹).
    """
    fsize = tl.maximum(tl.load(fsizes + slot), 1)
    has_filters = tl.load(fsizes + slot) > 0
    first = start // fsize
    within = (start - first * fsize).to(tl.uint32)
    local = (within + lanes.to(tl.uint32)) // fsize.to(tl.uint32)
    row_norms = fnorms + tl.load(fnorm_offs + slot) + first
    if MASKED:
        norm = tl.load(row_norms + local, mask=mask & has_filters, other=0.0)
    else:
        norm = tl.load(row_norms + local, mask=has_filters & (lanes >= 0), other=0.0)
    return tl.where(has_filters, norm.to(w.dtype), tl.abs(w))


@triton.jit
def _asam_scale(w, lanes, mask, start, slot, etas, fsizes, fnorm_offs, fnorms, MODE: tl.constexpr,
                MASKED: tl.constexpr):
    if MODE == 0:
        t = tl.full(w.shape, 1.0, w.dtype)
    elif MODE == 1:
        t = tl.abs(w) + tl.load(etas + slot).to(w.dtype)
    else:
        t = _filter_value(w, lanes, mask, start, slot, fsizes, fnorm_offs, fnorms, MASKED) \
            + tl.load(etas + slot).to(w.dtype)
    return t


@triton.jit
def filter_norm_kernel(
    ftile_tensor, ftile_row, w_ptrs, fsizes, n_filters, fnorm_offs, fnorms,
    W_DTYPE: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """fnorms[off + r] = ‖w[r]‖₂ for ROWS filters of one tensor per program (fixed-order loop)."""
    pid = tl.program_id(0)
    slot = tl.load(ftile_tensor + pid)
    rows = tl.load(ftile_row + pid) + tl.arange(0, ROWS).to(tl.int64)
    fsize = tl.load(fsizes + slot)
    row_mask = rows < tl.load(n_filters + slot)
    w = tl.load(w_ptrs + slot).to(tl.pointer_type(W_DTYPE))
    acc = tl.zeros([ROWS, COLS], tl.float64)  # squares in float64: right over the dtype's whole range
    cols = tl.arange(0, COLS).to(tl.int64)
    for col in range(0, fsize, COLS):
        c = col + cols
        m = row_mask[:, None] & (c < fsize)[None, :]
        x = tl.load(w + rows[:, None] * fsize + c[None, :], mask=m, other=0.0).to(ACC).to(tl.float64)
        acc += x * x
    norm = tl.sqrt(tl.sum(acc, axis=1)).to(ACC)
    tl.store(fnorms + tl.load(fnorm_offs + slot) + rows, norm, mask=row_mask)


@triton.jit
def _scaled_grad_sq_sum_tile(
    pid, slot, start, remaining, w_ptrs, g_ptrs, etas, fsizes, fnorm_offs, fnorms, partials,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr, MASKED: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    mask = lanes < remaining
    g = _load(_tile_ptr(g_ptrs, slot, start, G_DTYPE, ALIGNED) + lanes, mask, MASKED).to(ACC)
    if MODE == 0:
        tg = g
    else:
        w = _load(_tile_ptr(w_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes, mask, MASKED).to(ACC)
        tg = _asam_scale(w, lanes, mask, start, slot, etas, fsizes, fnorm_offs, fnorms, MODE, MASKED) * g
    tl.store(partials + pid, tl.sum(tg * tg, axis=0))


@triton.jit
def scaled_grad_sq_sum_kernel(
    tile_tensor, tile_start, w_ptrs, g_ptrs, numels, etas, fsizes, fnorm_offs, fnorms, partials,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """partials[tile] = Σ (t·g)² over the tile."""
    pid, slot, start, full, remaining = _tile(tile_tensor, tile_start, numels, BLOCK)
    if full:
        _scaled_grad_sq_sum_tile(pid, slot, start, remaining, w_ptrs, g_ptrs, etas, fsizes, fnorm_offs, fnorms,
                                 partials, W_DTYPE, G_DTYPE, ACC, MODE, BLOCK, ALIGNED, False)
    else:
        _scaled_grad_sq_sum_tile(pid, slot, start, remaining, w_ptrs, g_ptrs, etas, fsizes, fnorm_offs, fnorms,
                                 partials, W_DTYPE, G_DTYPE, ACC, MODE, BLOCK, ALIGNED, True)


@triton.jit
def _perturb_tile(
    slot, start, remaining, w_ptrs, g_ptrs, s_ptrs, etas, fsizes, fnorm_offs, fnorms, scale_slots, scales,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr, MODE: tl.constexpr,
    P_INF: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    mask = lanes < remaining
    w_ptr = _tile_ptr(w_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes
    w_raw = _load(w_ptr, mask, MASKED)
    _store(_tile_ptr(s_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes, w_raw, mask, MASKED)
    w = w_raw.to(ACC)
    g = _load(_tile_ptr(g_ptrs, slot, start, G_DTYPE, ALIGNED) + lanes, mask, MASKED).to(ACC)
    scale = tl.load(scales + tl.load(scale_slots + slot)).to(ACC)
    t = _asam_scale(w, lanes, mask, start, slot, etas, fsizes, fnorm_offs, fnorms, MODE, MASKED)
    if P_INF:
        direction = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0)).to(ACC)
        eps = scale * t * direction
    else:
        eps = (scale * t) * (t * g)  # not t·t first: t² overflows where ε does not
    eps = tl.where(eps - eps == 0, eps, 0.0)  # x − x is 0 exactly when x is finite
    _store(w_ptr, (w + eps).to(W_DTYPE), mask, MASKED)


@triton.jit
def perturb_kernel(
    tile_tensor, tile_start, w_ptrs, g_ptrs, s_ptrs, numels, etas, fsizes, fnorm_offs, fnorms,
    scale_slots, scales,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr, MODE: tl.constexpr,
    P_INF: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """saved ← w; w ← w + ε, ε = s·t²·g (p = 2) or s·t·sign(g) (p = ∞); non-finite ε → 0."""
    pid, slot, start, full, remaining = _tile(tile_tensor, tile_start, numels, BLOCK)
    if full:
        _perturb_tile(slot, start, remaining, w_ptrs, g_ptrs, s_ptrs, etas, fsizes, fnorm_offs, fnorms, scale_slots,
                      scales, W_DTYPE, G_DTYPE, ACC, MODE, P_INF, BLOCK, ALIGNED, False)
    else:
        _perturb_tile(slot, start, remaining, w_ptrs, g_ptrs, s_ptrs, etas, fsizes, fnorm_offs, fnorms, scale_slots,
                      scales, W_DTYPE, G_DTYPE, ACC, MODE, P_INF, BLOCK, ALIGNED, True)


@triton.jit
def restore_kernel(tile_tensor, tile_start, w_ptrs, s_ptrs, numels, W_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                   ALIGNED: tl.constexpr):
    """w ← saved (bit-exact copy)."""
    pid, slot, start, full, remaining = _tile(tile_tensor, tile_start, numels, BLOCK)
    lanes = tl.arange(0, BLOCK)
    source = _tile_ptr(s_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes
    target = _tile_ptr(w_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes
    if full:
        tl.store(target, tl.load(source))
    else:
        mask = lanes < remaining
        tl.store(target, tl.load(source, mask=mask), mask=mask)


# --------------------------------------------------------------------- noise
@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors: 10 rounds, key bumped by (W0, W1) between rounds."""
    for _ in tl.static_range(10):
        m0 = tl.full(c0.shape, PHILOX_M0, tl.uint32)
        m1 = tl.full(c2.shape, PHILOX_M1, tl.uint32)
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _unit_float(x):
    """((x >> 9) + 0.5) · 2⁻²³ in float32: exact, inside (0, 1)."""
    return ((x >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def _standard_normal(start, j, key0, key1, step, BLOCK: tl.constexpr):
    """z for elements start … start + BLOCK − 1 of tensor j (start a multiple of BLOCK), float32.

    Block counters start // 4 + i: BLOCK // 4 divides 2³² and start // 4 is a multiple of it, so
    the low word never wraps inside a tile: c0 = lo + i in 32 bits, c1 = hi for the whole tile.
    """
    first_block = start // 4
    c0 = (first_block & 0xFFFFFFFF).to(tl.uint32) + tl.arange(0, BLOCK // 4).to(tl.uint32)
    c1 = tl.full(c0.shape, 0, tl.uint32) + (first_block >> 32).to(tl.uint32)
    c2 = tl.full(c0.shape, 0, tl.uint32) + j.to(tl.uint32)
    c3 = tl.full(c0.shape, 0, tl.uint32) + step.to(tl.uint32)
    k0 = key0.to(tl.uint32)
    k1 = key1.to(tl.uint32)
    x0, x1, x2, x3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
    r01 = tl.sqrt(-2.0 * tl.log(_unit_float(x0)))
    r23 = tl.sqrt(-2.0 * tl.log(_unit_float(x2)))
    theta1 = TWO_PI_F32 * _unit_float(x1)
    theta3 = TWO_PI_F32 * _unit_float(x3)
    z0 = r01 * tl.cos(theta1)
    z1 = r01 * tl.sin(theta1)
    z2 = r23 * tl.cos(theta3)
    z3 = r23 * tl.sin(theta3)
    # Element 4c + k takes z_k: [c][m][n] with (m, n) = (0,0) z0, (0,1) z1, (1,0) z2, (1,1) z3.
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [BLOCK])


@triton.jit
def _initial_noise(saved, lanes, mask, start, slot, fsizes, fnorm_offs, fnorms, gammas, tensor_indices,
                   key0, key1, step, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """δ₀ = σ · z, σ = γ‖w_i‖/√n_i (ndim ≥ 2) or γ|w| (ndim ≤ 1), from the saved weights."""
    z = _standard_normal(start, tl.load(tensor_indices + slot), key0, key1, step, BLOCK).to(saved.dtype)
    fsize = tl.load(fsizes + slot)
    inv_sqrt_n = tl.where(fsize > 0, 1.0 / tl.sqrt(tl.maximum(fsize, 1).to(tl.float32)), 1.0).to(saved.dtype)
    sigma = tl.load(gammas + slot).to(saved.dtype) \
        * _filter_value(saved, lanes, mask, start, slot, fsizes, fnorm_offs, fnorms, MASKED) * inv_sqrt_n
    return sigma * z


@triton.jit
def _add_noise_tile(
    slot, start, remaining, w_ptrs, s_ptrs, fsizes, fnorm_offs, fnorms, gammas, tensor_indices, key0, key1, step,
    W_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    mask = lanes < remaining
    w_ptr = _tile_ptr(w_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes
    w_raw = _load(w_ptr, mask, MASKED)
    _store(_tile_ptr(s_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes, w_raw, mask, MASKED)
    w = w_raw.to(ACC)
    delta = _initial_noise(w, lanes, mask, start, slot, fsizes, fnorm_offs, fnorms, gammas, tensor_indices,
                           key0, key1, step, BLOCK, MASKED)
    _store(w_ptr, (w + delta).to(W_DTYPE), mask, MASKED)


@triton.jit(do_not_specialize=NOISE_SCALARS)
def add_noise_kernel(
    tile_tensor, tile_start, w_ptrs, s_ptrs, numels, fsizes, fnorm_offs, fnorms, gammas, tensor_indices,
    key0, key1, step,
    W_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """saved ← w; w ← w + δ₀."""
    pid, slot, start, full, remaining = _tile(tile_tensor, tile_start, numels, BLOCK)
    if full:
        _add_noise_tile(slot, start, remaining, w_ptrs, s_ptrs, fsizes, fnorm_offs, fnorms, gammas, tensor_indices,
                        key0, key1, step, W_DTYPE, ACC, BLOCK, ALIGNED, False)
    else:
        _add_noise_tile(slot, start, remaining, w_ptrs, s_ptrs, fsizes, fnorm_offs, fnorms, gammas, tensor_indices,
                        key0, key1, step, W_DTYPE, ACC, BLOCK, ALIGNED, True)


@triton.jit
def _noise_grad_sums_tile(
    pid, slot, start, remaining, g_ptrs, s_ptrs, fsizes, fnorm_offs, fnorms, gammas, lams, tensor_indices,
    key0, key1, step, partials,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    MASKED: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    mask = lanes < remaining
    saved = _load(_tile_ptr(s_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes, mask, MASKED).to(ACC)
    g = _load(_tile_ptr(g_ptrs, slot, start, G_DTYPE, ALIGNED) + lanes, mask, MASKED).to(ACC)
    delta = _initial_noise(saved, lanes, mask, start, slot, fsizes, fnorm_offs, fnorms, gammas, tensor_indices,
                           key0, key1, step, BLOCK, MASKED)
    if MASKED:
        delta = tl.where(mask, delta, 0.0)
    lam = tl.load(lams + slot).to(ACC)
    grad_sq = tl.sum(g * g, axis=0)
    tl.store(partials + 4 * pid, tl.sum(delta * delta, axis=0))
    tl.store(partials + 4 * pid + 1, grad_sq)
    tl.store(partials + 4 * pid + 2, lam * tl.sum(delta * g, axis=0))
    tl.store(partials + 4 * pid + 3, lam * lam * grad_sq)


@triton.jit(do_not_specialize=NOISE_SCALARS)
def noise_grad_sums_kernel(
    tile_tensor, tile_start, g_ptrs, s_ptrs, numels, fsizes, fnorm_offs, fnorms, gammas, lams, tensor_indices,
    key0, key1, step, partials,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """partials[tile] = (Σδ₀², Σg², λΣδ₀g, λ²Σg²)."""
    pid, slot, start, full, remaining = _tile(tile_tensor, tile_start, numels, BLOCK)
    if full:
        _noise_grad_sums_tile(pid, slot, start, remaining, g_ptrs, s_ptrs, fsizes, fnorm_offs, fnorms, gammas, lams,
                              tensor_indices, key0, key1, step, partials, W_DTYPE, G_DTYPE, ACC, BLOCK, ALIGNED, False)
    else:
        _noise_grad_sums_tile(pid, slot, start, remaining, g_ptrs, s_ptrs, fsizes, fnorm_offs, fnorms, gammas, lams,
                              tensor_indices, key0, key1, step, partials, W_DTYPE, G_DTYPE, ACC, BLOCK, ALIGNED, True)


@triton.jit
def _mix_perturb_tile(
    slot, start, remaining, w_ptrs, g_ptrs, s_ptrs, fsizes, fnorm_offs, fnorms, gammas, tensor_indices,
    key0, key1, step, coef_slots, noise_coefs, grad_coefs,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    MASKED: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    mask = lanes < remaining
    saved = _load(_tile_ptr(s_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes, mask, MASKED).to(ACC)
    g = _load(_tile_ptr(g_ptrs, slot, start, G_DTYPE, ALIGNED) + lanes, mask, MASKED).to(ACC)
    delta = _initial_noise(saved, lanes, mask, start, slot, fsizes, fnorm_offs, fnorms, gammas, tensor_indices,
                           key0, key1, step, BLOCK, MASKED)
    coef_slot = tl.load(coef_slots + slot)
    eps = tl.load(noise_coefs + coef_slot).to(ACC) * delta + tl.load(grad_coefs + coef_slot).to(ACC) * g
    eps = tl.where(eps - eps == 0, eps, 0.0)  # x − x is 0 exactly when x is finite
    _store(_tile_ptr(w_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes, (saved + eps).to(W_DTYPE), mask, MASKED)


@triton.jit(do_not_specialize=NOISE_SCALARS)
def mix_perturb_kernel(
    tile_tensor, tile_start, w_ptrs, g_ptrs, s_ptrs, numels, fsizes, fnorm_offs, fnorms, gammas, tensor_indices,
    key0, key1, step, coef_slots, noise_coefs, grad_coefs,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """w ← saved + a·δ₀ + b·g; non-finite ε → 0."""
    pid, slot, start, full, remaining = _tile(tile_tensor, tile_start, numels, BLOCK)
    if full:
        _mix_perturb_tile(slot, start, remaining, w_ptrs, g_ptrs, s_ptrs, fsizes, fnorm_offs, fnorms, gammas,
                          tensor_indices, key0, key1, step, coef_slots, noise_coefs, grad_coefs,
                          W_DTYPE, G_DTYPE, ACC, BLOCK, ALIGNED, False)
    else:
        _mix_perturb_tile(slot, start, remaining, w_ptrs, g_ptrs, s_ptrs, fsizes, fnorm_offs, fnorms, gammas,
                          tensor_indices, key0, key1, step, coef_slots, noise_coefs, grad_coefs,
                          W_DTYPE, G_DTYPE, ACC, BLOCK, ALIGNED, True)


# ------------------------------------------------------ the fused second step (docs/DESIGN.md §2.11)
# Per-tensor hyperparameters arrive as one row per tensor of a table in ACC (``hypers[slot, column]``),
# coefficient combinations (1 − τ, 1 − β, 1 − lr·λ) formed in float64 on the host before the one rounding
# to ACC, as csrc/sam_math.h's sgd_coefs/adam_coefs form them; flags are 0.0/1.0 columns. The on/off flags
# are uniform per program (a tile lies in one tensor), so they are scalar branches: a state a tensor does
# not use (momentum 0, no amsgrad; the caller passes a placeholder that may alias another list) is never
# addressed, and a skipped step (``skips[skip_slots[slot]]``, a 0-d bool) only copies saved → w.
SGD_LR = tl.constexpr(0)
SGD_WEIGHT_DECAY = tl.constexpr(1)
SGD_MOMENTUM = tl.constexpr(2)
SGD_ONE_MINUS_DAMPENING = tl.constexpr(3)
SGD_SIGN = tl.constexpr(4)  # −1 where maximize, else 1
SGD_DECAY_ON = tl.constexpr(5)
SGD_MOMENTUM_ON = tl.constexpr(6)
SGD_NESTEROV = tl.constexpr(7)
SGD_FRESH = tl.constexpr(8)
SGD_COLUMNS = tl.constexpr(9)

ADAM_DECAY = tl.constexpr(0)  # 1 − lr·λ (AdamW)
ADAM_WEIGHT_DECAY = tl.constexpr(1)
ADAM_ONE_MINUS_BETA1 = tl.constexpr(2)
ADAM_BETA2 = tl.constexpr(3)
ADAM_ONE_MINUS_BETA2 = tl.constexpr(4)
ADAM_EPS = tl.constexpr(5)
ADAM_STEP_SIZE = tl.constexpr(6)
ADAM_BIAS_CORRECTION2_SQRT = tl.constexpr(7)
ADAM_SIGN = tl.constexpr(8)
ADAM_DECOUPLED_ON = tl.constexpr(9)  # λ ≠ 0 and decoupled
ADAM_COUPLED_ON = tl.constexpr(10)  # λ ≠ 0 and not decoupled
ADAM_AMSGRAD = tl.constexpr(11)
ADAM_COLUMNS = tl.constexpr(12)


@triton.jit
def _sqrt_rn(x, ACC: tl.constexpr):
    """Correctly rounded √x (tl.sqrt is an approximation in float32; float64's is exact-rounded)."""
    if ACC == tl.float64:
        y = tl.sqrt(x)
    else:
        y = tl.sqrt_rn(x)
    return y


@triton.jit
def _div_rn(x, y, ACC: tl.constexpr):
    """Correctly rounded x / y (float32's ``/`` may be the approximate division)."""
    if ACC == tl.float64:
        q = x / y
    else:
        q = tl.div_rn(x, y)
    return q


@triton.jit
def _skip_of(slot, skip_slots, skips):
    return tl.load(skips + tl.load(skip_slots + slot)) != 0


@triton.jit
def _restore_sgd_tile(
    slot, start, remaining, w_ptrs, s_ptrs, g_ptrs, m_ptrs, hypers, skip_slots, skips,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    MASKED: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    mask = lanes < remaining
    w_ptr = _tile_ptr(w_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes
    saved = _load(_tile_ptr(s_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes, mask, MASKED)
    if _skip_of(slot, skip_slots, skips):
        _store(w_ptr, saved, mask, MASKED)  # the saved bits; the buffer untouched
    else:
        h = hypers + slot * SGD_COLUMNS
        w = saved.to(ACC)
        d = tl.load(h + SGD_SIGN) * _load(_tile_ptr(g_ptrs, slot, start, G_DTYPE, ALIGNED) + lanes, mask,
                                          MASKED).to(ACC)
        if tl.load(h + SGD_DECAY_ON) != 0:
            d = d + tl.load(h + SGD_WEIGHT_DECAY) * w
        if tl.load(h + SGD_MOMENTUM_ON) != 0:
            m_ptr = _tile_ptr(m_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes
            mu = tl.load(h + SGD_MOMENTUM)
            if tl.load(h + SGD_FRESH) != 0:  # a new buffer (torch.empty_like): not read
                m_new = d.to(W_DTYPE)
            else:
                m_new = (mu * _load(m_ptr, mask, MASKED).to(ACC) + tl.load(h + SGD_ONE_MINUS_DAMPENING) * d
                         ).to(W_DTYPE)
            _store(m_ptr, m_new, mask, MASKED)
            if tl.load(h + SGD_NESTEROV) != 0:
                d = d + mu * m_new.to(ACC)
            else:
                d = m_new.to(ACC)
        _store(w_ptr, (w - tl.load(h + SGD_LR) * d).to(W_DTYPE), mask, MASKED)


@triton.jit
def restore_sgd_kernel(
    tile_tensor, tile_start, w_ptrs, s_ptrs, g_ptrs, m_ptrs, numels, hypers, skip_slots, skips,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """w ← saved − lr·d, torch.optim.SGD's step from the saved weights (m ← d or μ·m + (1 − τ)·d where
    momentum is on, rounded before d reads it); where skip: w ← saved, m untouched."""
    pid, slot, start, full, remaining = _tile(tile_tensor, tile_start, numels, BLOCK)
    if full:
        _restore_sgd_tile(slot, start, remaining, w_ptrs, s_ptrs, g_ptrs, m_ptrs, hypers, skip_slots, skips,
                          W_DTYPE, G_DTYPE, ACC, BLOCK, ALIGNED, False)
    else:
        _restore_sgd_tile(slot, start, remaining, w_ptrs, s_ptrs, g_ptrs, m_ptrs, hypers, skip_slots, skips,
                          W_DTYPE, G_DTYPE, ACC, BLOCK, ALIGNED, True)


@triton.jit
def _restore_adam_tile(
    slot, start, remaining, w_ptrs, s_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, hypers, skip_slots, skips,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    MASKED: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    mask = lanes < remaining
    w_ptr = _tile_ptr(w_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes
    saved = _load(_tile_ptr(s_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes, mask, MASKED)
    if _skip_of(slot, skip_slots, skips):
        _store(w_ptr, saved, mask, MASKED)  # the saved bits; the moments untouched
    else:
        h = hypers + slot * ADAM_COLUMNS
        w = saved.to(ACC)
        d = tl.load(h + ADAM_SIGN) * _load(_tile_ptr(g_ptrs, slot, start, G_DTYPE, ALIGNED) + lanes, mask,
                                           MASKED).to(ACC)
        if tl.load(h + ADAM_DECOUPLED_ON) != 0:
            w = w * tl.load(h + ADAM_DECAY)
        if tl.load(h + ADAM_COUPLED_ON) != 0:
            d = d + tl.load(h + ADAM_WEIGHT_DECAY) * w
        m_ptr = _tile_ptr(m_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes
        m = _load(m_ptr, mask, MASKED).to(ACC)
        m_new = (m + tl.load(h + ADAM_ONE_MINUS_BETA1) * (d - m)).to(W_DTYPE)
        _store(m_ptr, m_new, mask, MASKED)
        v_ptr = _tile_ptr(v_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes
        v_new = (tl.load(h + ADAM_BETA2) * _load(v_ptr, mask, MASKED).to(ACC)
                 + tl.load(h + ADAM_ONE_MINUS_BETA2) * d * d).to(W_DTYPE)
        _store(v_ptr, v_new, mask, MASKED)
        second = v_new.to(ACC)
        if tl.load(h + ADAM_AMSGRAD) != 0:
            vmax_ptr = _tile_ptr(vmax_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes
            old = _load(vmax_ptr, mask, MASKED).to(ACC)
            second = tl.where((old > second) | (old != old), old, second)  # torch.maximum: a NaN wins
            _store(vmax_ptr, second.to(W_DTYPE), mask, MASKED)
        denom = _div_rn(_sqrt_rn(second, ACC), tl.load(h + ADAM_BIAS_CORRECTION2_SQRT), ACC) + tl.load(h + ADAM_EPS)
        update = _div_rn(tl.load(h + ADAM_STEP_SIZE) * m_new.to(ACC), denom, ACC)
        _store(w_ptr, (w - update).to(W_DTYPE), mask, MASKED)


@triton.jit
def restore_adam_kernel(
    tile_tensor, tile_start, w_ptrs, s_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, numels, hypers, skip_slots, skips,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """w ← saved − step_size·m/(√v/√(1−β₂ᵗ) + eps), torch.optim.Adam/AdamW's step from the saved weights
    (m, v and, with amsgrad, v̂ updated and rounded before the update reads them); where skip: w ← saved,
    the moments untouched."""
    pid, slot, start, full, remaining = _tile(tile_tensor, tile_start, numels, BLOCK)
    if full:
        _restore_adam_tile(slot, start, remaining, w_ptrs, s_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, hypers,
                           skip_slots, skips, W_DTYPE, G_DTYPE, ACC, BLOCK, ALIGNED, False)
    else:
        _restore_adam_tile(slot, start, remaining, w_ptrs, s_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, hypers,
                           skip_slots, skips, W_DTYPE, G_DTYPE, ACC, BLOCK, ALIGNED, True)


# ------------------------------------------------------ the SAM family (docs/DESIGN.md §2.5–§2.8, §2.10)
# copy_ is restore_kernel (a bit copy). The other lists of these kernels are of the first list's dtype
# (the host routes any other position to foreach), except the gradients of residual_* (G_DTYPE).
@triton.jit
def _pair_sums_tile(
    pid, slot, start, remaining, x_ptrs, y_ptrs, partials,
    W_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    mask = lanes < remaining
    x = _load(_tile_ptr(x_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes, mask, MASKED).to(ACC)
    y = _load(_tile_ptr(y_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes, mask, MASKED).to(ACC)
    tl.store(partials + 3 * pid, tl.sum(x * y, axis=0))
    tl.store(partials + 3 * pid + 1, tl.sum(x * x, axis=0))
    tl.store(partials + 3 * pid + 2, tl.sum(y * y, axis=0))


@triton.jit
def pair_sums_kernel(
    tile_tensor, tile_start, x_ptrs, y_ptrs, numels, partials,
    W_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """partials[tile] = (Σ x·y, Σ x², Σ y²) over the tile."""
    pid, slot, start, full, remaining = _tile(tile_tensor, tile_start, numels, BLOCK)
    if full:
        _pair_sums_tile(pid, slot, start, remaining, x_ptrs, y_ptrs, partials, W_DTYPE, ACC, BLOCK, ALIGNED, False)
    else:
        _pair_sums_tile(pid, slot, start, remaining, x_ptrs, y_ptrs, partials, W_DTYPE, ACC, BLOCK, ALIGNED, True)


@triton.jit
def _combine_tile(
    slot, start, remaining, x_ptrs, y_ptrs, coef_slots, target_coefs, other_coefs,
    W_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    mask = lanes < remaining
    coef_slot = tl.load(coef_slots + slot)
    a = tl.load(target_coefs + coef_slot).to(ACC)
    b = tl.load(other_coefs + coef_slot).to(ACC)
    x_ptr = _tile_ptr(x_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes
    x = _load(x_ptr, mask, MASKED).to(ACC)
    y = _load(_tile_ptr(y_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes, mask, MASKED).to(ACC)
    # A term whose coefficient is 0 counts 0 (not 0·Inf = NaN).
    ax = tl.where(a == 0, 0.0, a * x)
    by = tl.where(b == 0, 0.0, b * y)
    _store(x_ptr, (ax + by).to(W_DTYPE), mask, MASKED)


@triton.jit
def combine_kernel(
    tile_tensor, tile_start, x_ptrs, y_ptrs, numels, coef_slots, target_coefs, other_coefs,
    W_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """x ← a·x + b·y, a term with a zero coefficient counting exactly 0."""
    pid, slot, start, full, remaining = _tile(tile_tensor, tile_start, numels, BLOCK)
    if full:
        _combine_tile(slot, start, remaining, x_ptrs, y_ptrs, coef_slots, target_coefs, other_coefs,
                      W_DTYPE, ACC, BLOCK, ALIGNED, False)
    else:
        _combine_tile(slot, start, remaining, x_ptrs, y_ptrs, coef_slots, target_coefs, other_coefs,
                      W_DTYPE, ACC, BLOCK, ALIGNED, True)


@triton.jit
def _split_difference_tile(
    slot, start, remaining, g_ptrs, f_ptrs, skip_slots, skips,
    W_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    mask = lanes < remaining
    f_ptr = _tile_ptr(f_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes
    if _skip_of(slot, skip_slots, skips):
        _store(f_ptr, tl.zeros([BLOCK], W_DTYPE), mask, MASKED)  # no sharpness; .grad keeps g_sam
    else:
        g_ptr = _tile_ptr(g_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes
        first = _load(f_ptr, mask, MASKED)
        g_sam = _load(g_ptr, mask, MASKED)
        _store(f_ptr, (g_sam.to(ACC) - first.to(ACC)).to(W_DTYPE), mask, MASKED)
        _store(g_ptr, first, mask, MASKED)  # the kept g, bit for bit


@triton.jit
def split_difference_kernel(
    tile_tensor, tile_start, g_ptrs, f_ptrs, numels, skip_slots, skips,
    W_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """firsts ← grads − firsts, grads ← the old firsts; where skip: firsts ← 0, grads kept."""
    pid, slot, start, full, remaining = _tile(tile_tensor, tile_start, numels, BLOCK)
    if full:
        _split_difference_tile(slot, start, remaining, g_ptrs, f_ptrs, skip_slots, skips,
                               W_DTYPE, ACC, BLOCK, ALIGNED, False)
    else:
        _split_difference_tile(slot, start, remaining, g_ptrs, f_ptrs, skip_slots, skips,
                               W_DTYPE, ACC, BLOCK, ALIGNED, True)


# FriendlySAM's per-tensor table, in ACC: σ, λ, 1 − λ (formed in float64 on the host).
RES_SIGMA = tl.constexpr(0)
RES_LMBDA = tl.constexpr(1)
RES_ONE_MINUS_LMBDA = tl.constexpr(2)
RES_COLUMNS = tl.constexpr(3)


@triton.jit
def _residual_sq_sum_tile(
    pid, slot, start, remaining, g_ptrs, m_ptrs, hypers, partials,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    MASKED: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    mask = lanes < remaining
    g = _load(_tile_ptr(g_ptrs, slot, start, G_DTYPE, ALIGNED) + lanes, mask, MASKED).to(ACC)
    m = _load(_tile_ptr(m_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes, mask, MASKED).to(ACC)
    d = g - tl.load(hypers + slot * RES_COLUMNS + RES_SIGMA) * m
    tl.store(partials + pid, tl.sum(d * d, axis=0))


@triton.jit
def residual_sq_sum_kernel(
    tile_tensor, tile_start, g_ptrs, m_ptrs, numels, hypers, partials,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """partials[tile] = Σ (g − σ·m)² over the tile."""
    pid, slot, start, full, remaining = _tile(tile_tensor, tile_start, numels, BLOCK)
    if full:
        _residual_sq_sum_tile(pid, slot, start, remaining, g_ptrs, m_ptrs, hypers, partials,
                              W_DTYPE, G_DTYPE, ACC, BLOCK, ALIGNED, False)
    else:
        _residual_sq_sum_tile(pid, slot, start, remaining, g_ptrs, m_ptrs, hypers, partials,
                              W_DTYPE, G_DTYPE, ACC, BLOCK, ALIGNED, True)


@triton.jit
def _residual_perturb_tile(
    slot, start, remaining, w_ptrs, g_ptrs, m_ptrs, s_ptrs, hypers, scale_slots, scales,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    MASKED: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    mask = lanes < remaining
    w_ptr = _tile_ptr(w_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes
    w_raw = _load(w_ptr, mask, MASKED)
    _store(_tile_ptr(s_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes, w_raw, mask, MASKED)
    g = _load(_tile_ptr(g_ptrs, slot, start, G_DTYPE, ALIGNED) + lanes, mask, MASKED).to(ACC)
    m_ptr = _tile_ptr(m_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes
    m_raw = _load(m_ptr, mask, MASKED)
    m = m_raw.to(ACC)
    h = hypers + slot * RES_COLUMNS
    scale = tl.load(scales + tl.load(scale_slots + slot)).to(ACC)
    eps = scale * (g - tl.load(h + RES_SIGMA) * m)
    eps = tl.where(eps - eps == 0, eps, 0.0)  # x − x is 0 exactly when x is finite
    _store(w_ptr, (w_raw.to(ACC) + eps).to(W_DTYPE), mask, MASKED)
    m_new = tl.load(h + RES_LMBDA) * m + tl.load(h + RES_ONE_MINUS_LMBDA) * g
    _store(m_ptr, tl.where(m_new - m_new == 0, m_new.to(W_DTYPE), m_raw), mask, MASKED)  # non-finite: old m


@triton.jit
def residual_perturb_kernel(
    tile_tensor, tile_start, w_ptrs, g_ptrs, m_ptrs, s_ptrs, numels, hypers, scale_slots, scales,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """saved ← w; w ← w + finite_or_zero(s·(g − σ·m)); m ← λ·m + (1 − λ)·g where finite, else m kept."""
    pid, slot, start, full, remaining = _tile(tile_tensor, tile_start, numels, BLOCK)
    if full:
        _residual_perturb_tile(slot, start, remaining, w_ptrs, g_ptrs, m_ptrs, s_ptrs, hypers, scale_slots, scales,
                               W_DTYPE, G_DTYPE, ACC, BLOCK, ALIGNED, False)
    else:
        _residual_perturb_tile(slot, start, remaining, w_ptrs, g_ptrs, m_ptrs, s_ptrs, hypers, scale_slots, scales,
                               W_DTYPE, G_DTYPE, ACC, BLOCK, ALIGNED, True)


@triton.jit
def _msam_sgd_tile(
    pid, slot, start, remaining, w_ptrs, g_ptrs, m_ptrs, hypers, flag_slots, shifts, skips, partials,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    MASKED: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    mask = lanes < remaining
    h = hypers + slot * SGD_COLUMNS
    flag_slot = tl.load(flag_slots + slot)
    fresh = tl.load(h + SGD_FRESH) != 0
    w_ptr = _tile_ptr(w_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes
    m_ptr = _tile_ptr(m_ptrs, slot, start, W_DTYPE, ALIGNED) + lanes
    w = _load(w_ptr, mask, MASKED).to(ACC)
    m_raw = _load(m_ptr, mask, MASKED)  # read for the sum also where the step is skipped
    if fresh:
        w0 = w  # no momentum yet: nothing to undo, the buffer's contents unused
    else:
        w0 = w + tl.load(shifts + flag_slot).to(ACC) * m_raw.to(ACC)
    if tl.load(skips + flag_slot) != 0:
        if not fresh:
            _store(w_ptr, w0.to(W_DTYPE), mask, MASKED)  # only the undo; the momentum kept
        m_sum = m_raw.to(ACC)
    else:
        d = tl.load(h + SGD_SIGN) * _load(_tile_ptr(g_ptrs, slot, start, G_DTYPE, ALIGNED) + lanes, mask,
                                          MASKED).to(ACC)
        if tl.load(h + SGD_DECAY_ON) != 0:
            d = d + tl.load(h + SGD_WEIGHT_DECAY) * w0
        mu = tl.load(h + SGD_MOMENTUM)
        if fresh:
            m_new = d.to(W_DTYPE)
        else:
            m_new = (mu * m_raw.to(ACC) + tl.load(h + SGD_ONE_MINUS_DAMPENING) * d).to(W_DTYPE)
        _store(m_ptr, m_new, mask, MASKED)
        m_sum = m_new.to(ACC)
        if tl.load(h + SGD_NESTEROV) != 0:
            d = d + mu * m_sum
        else:
            d = m_sum
        _store(w_ptr, (w0 - tl.load(h + SGD_LR) * d).to(W_DTYPE), mask, MASKED)
    if MASKED:
        m_sum = tl.where(mask, m_sum, 0.0)
    tl.store(partials + pid, tl.sum(m_sum * m_sum, axis=0))


@triton.jit
def msam_sgd_kernel(
    tile_tensor, tile_start, w_ptrs, g_ptrs, m_ptrs, numels, hypers, flag_slots, shifts, skips, partials,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Momentum-SAM with SGD: w0 = w + c·m (fresh: w0 = w), then restore_sgd_'s update from w0 (momentum on);
    partials[tile] = Σ m_new² over the tile. Where skip: w ← w0 (fresh: untouched), m kept (still summed)."""
    pid, slot, start, full, remaining = _tile(tile_tensor, tile_start, numels, BLOCK)
    if full:
        _msam_sgd_tile(pid, slot, start, remaining, w_ptrs, g_ptrs, m_ptrs, hypers, flag_slots, shifts, skips,
                       partials, W_DTYPE, G_DTYPE, ACC, BLOCK, ALIGNED, False)
    else:
        _msam_sgd_tile(pid, slot, start, remaining, w_ptrs, g_ptrs, m_ptrs, hypers, flag_slots, shifts, skips,
                       partials, W_DTYPE, G_DTYPE, ACC, BLOCK, ALIGNED, True)
