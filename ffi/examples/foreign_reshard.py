#!/usr/bin/env python3
"""foreign_reshard.py: run pat's switch plans on another engine's tensors (numpy arrays here).

    python3 ffi/examples/foreign_reshard.py LIBPAT_FFI_SO [MODEL_DIR]

Stands in for an engine (SGLang, vLLM, VeRL workers) that keeps its own weights and KV pools and
wants only pat's mechanism, through ctypes:

1. Weights: for several layout changes (tp growing, shrinking, nested or not) it asks
   pat_weight_plan_new for per-rank programs and executes them on numpy arrays holding each
   rank's shards of the old layout (sends and receives through in-memory FIFO queues, moves and
   zero fills in the documented order), then checks every rebuilt array bitwise against the shard
   pat itself loads for the new layout (pat_model_load_shard).
2. KV: it fills paged KV pools [layer][K/V][block, local head, block_size, head_dim] of the old
   layout with a distinct value per (sequence, head, layer, K/V, token, element), allocates new
   block tables, asks pat_kv_plan_new for the migration, executes every rank's program, and checks
   that each head slice of each sequence arrived bitwise where the new layout keeps it.

Prints one summary line per plan and exits non-zero on the first mismatch or failed call.
"""

import ctypes as C
import sys
from collections import defaultdict, deque

import numpy as np

u32, u64, f64, sz = C.c_uint32, C.c_uint64, C.c_double, C.c_size_t
P = C.POINTER


class Dims(C.Structure):
    _fields_ = [(n, u32) for n in ("struct_size", "arch", "num_layers", "hidden_size",
                                   "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                                   "vocab_size", "tie_word_embeddings")]


class Layout(C.Structure):
    _fields_ = [("world", u32), ("tp", u32), ("placement", P(u32))]


class WeightPlanInfo(C.Structure):
    _fields_ = [(n, u32) for n in ("world", "old_tp", "new_tp", "hidden_size", "n_roles",
                                   "reserved")] + \
               [(n, u64) for n in ("elem_bytes", "bytes_cross_rank", "bytes_in_place",
                                   "bytes_zeroed", "min_cross_rank_bytes", "peak_extra_bytes")]


class WeightRole(C.Structure):
    _fields_ = [("role", u32), ("repeats", u32), ("old_rows", u64), ("new_rows", u64),
                ("first_step", u64), ("n_steps", u64), ("in_place", C.c_bool)]


class WeightStep(C.Structure):
    _fields_ = [("role", u32), ("kind", u32), ("peer", u32), ("reserved", u32),
                ("src_row", u64), ("dst_row", u64), ("rows", u64)]


class SeqKv(C.Structure):
    _fields_ = [("old_replica", u32), ("new_replica", u32), ("len", u64),
                ("old_table", P(u32)), ("old_table_len", sz),
                ("new_table", P(u32)), ("new_table_len", sz)]


class KvStep(C.Structure):
    _fields_ = [(n, u32) for n in ("kind", "peer", "seq", "src_head", "dst_head", "reserved")]


class KvPlanInfo(C.Structure):
    _fields_ = [(n, u32) for n in ("world", "old_tp", "new_tp", "num_layers", "num_kv_heads",
                                   "head_dim", "block_size", "n_seqs")] + \
               [(n, u64) for n in ("n_pieces", "elem_bytes", "bytes_cross_rank",
                                   "bytes_in_place", "peak_staging_bytes")]


# Constants of pat.h (ctypes cannot read #defines).
PAT_OK, PAT_BUFFER_TOO_SMALL, PAT_ERR_INVALID_ARGUMENT = 0, 2, -1
SEND, RECV, MOVE, ZERO = 0, 1, 2, 3
KV_SEND, KV_LOCAL, KV_RECV = 0, 1, 2
ROLE_NAMES = ["qkv", "o", "gate_up", "down", "embed", "lm_head"]


def load(path):
    lib = C.CDLL(path)
    sig = {
        "pat_abi_version": (u32, []),
        "pat_status_name": (C.c_char_p, [C.c_int32]),
        "pat_last_error_message": (sz, [C.c_char_p, sz]),
        "pat_model_open": (C.c_int32, [C.c_char_p, P(C.c_void_p)]),
        "pat_model_free": (None, [C.c_void_p]),
        "pat_model_get_dims": (C.c_int32, [C.c_void_p, P(Dims)]),
        "pat_model_load_shard": (C.c_int32, [C.c_void_p, u32, u32, u32, u32, P(C.c_float), sz,
                                             P(sz)]),
        "pat_layout_nested": (C.c_int32, [P(Layout), u32, P(u32), sz, P(sz)]),
        "pat_weight_plan_new": (C.c_int32, [P(Dims), P(Layout), P(Layout), u32,
                                            P(C.c_void_p)]),
        "pat_weight_plan_free": (None, [C.c_void_p]),
        "pat_weight_plan_get_info": (C.c_int32, [C.c_void_p, P(WeightPlanInfo)]),
        "pat_weight_plan_roles": (C.c_int32, [C.c_void_p, u32, P(WeightRole), sz, P(sz)]),
        "pat_weight_plan_steps": (C.c_int32, [C.c_void_p, u32, P(WeightStep), sz, P(sz)]),
        "pat_kv_plan_new": (C.c_int32, [P(Dims), P(Layout), P(Layout), u32, P(SeqKv), sz, u32,
                                        P(C.c_void_p)]),
        "pat_kv_plan_free": (None, [C.c_void_p]),
        "pat_kv_plan_get_info": (C.c_int32, [C.c_void_p, P(KvPlanInfo)]),
        "pat_kv_plan_steps": (C.c_int32, [C.c_void_p, u32, P(KvStep), sz, P(sz)]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def message(lib):
    need = lib.pat_last_error_message(None, 0)
    buf = C.create_string_buffer(need + 1)
    lib.pat_last_error_message(buf, need + 1)
    return buf.value.decode()


def check(lib, st, what):
    if st != PAT_OK:
        sys.exit(f"foreign_reshard: {what}: {lib.pat_status_name(st).decode()}: {message(lib)}")


def fetch(lib, fn, ctype, *args):
    """Calls a (buf, cap, n) function twice: once for the count, once for the entries."""
    n = sz(0)
    st = fn(*args, None, 0, C.byref(n))
    if st not in (PAT_OK, PAT_BUFFER_TOO_SMALL):
        check(lib, st, fn.__name__)
    buf = (ctype * max(n.value, 1))()
    check(lib, fn(*args, buf, n.value, C.byref(n)), fn.__name__)
    return buf[:n.value]


def layout(world, tp, placement=None):
    p = list(range(world)) if placement is None else list(placement)
    arr = (u32 * world)(*p)
    return Layout(world, tp, arr), p


def position(placement, tp, rank):
    i = placement.index(rank)
    return i // tp, i % tp


def shard(lib, model, role, layer, tp, tp_rank, hidden):
    n = sz(0)
    st = lib.pat_model_load_shard(model, role, layer, tp, tp_rank, None, 0, C.byref(n))
    if st != PAT_BUFFER_TOO_SMALL:
        check(lib, st, "pat_model_load_shard")
    out = np.empty(n.value, dtype=np.float32)
    ptr = out.ctypes.data_as(P(C.c_float))
    check(lib, lib.pat_model_load_shard(model, role, layer, tp, tp_rank, ptr, n, C.byref(n)),
          "pat_model_load_shard")
    return out.reshape(-1, hidden)


def reshard_weights(lib, model, dims, world, old_tp, new_tp, nested=True):
    old, old_p = layout(world, old_tp)
    if nested:
        new_p = fetch(lib, lib.pat_layout_nested, u32, C.byref(old), new_tp)
        new, new_p = layout(world, new_tp, new_p)
    else:
        new, new_p = layout(world, new_tp)
    plan = C.c_void_p()
    check(lib, lib.pat_weight_plan_new(C.byref(dims), C.byref(old), C.byref(new), 4,
                                       C.byref(plan)), "pat_weight_plan_new")
    info = WeightPlanInfo()
    check(lib, lib.pat_weight_plan_get_info(plan, C.byref(info)), "pat_weight_plan_get_info")
    roles = [fetch(lib, lib.pat_weight_plan_roles, WeightRole, plan, r) for r in range(world)]
    steps = [fetch(lib, lib.pat_weight_plan_steps, WeightStep, plan, r) for r in range(world)]
    h = dims.hidden_size
    moved = 0
    for ri in range(info.n_roles):
        role = roles[0][ri].role
        for layer in range(roles[0][ri].repeats):
            # The foreign engine's tensors: each rank's shard of the old layout.
            bufs = [shard(lib, model, role, layer, old_tp, position(old_p, old_tp, r)[1], h)
                    for r in range(world)]
            mine = [steps[r][roles[r][ri].first_step:][:roles[r][ri].n_steps]
                    for r in range(world)]
            wire = defaultdict(deque)
            # Phase 1: every rank's sends, then its receives into staging (FIFO per pair).
            for r in range(world):
                for s in mine[r]:
                    if s.kind == SEND:
                        wire[(r, s.peer)].append(bufs[r][s.src_row:s.src_row + s.rows].copy())
            staged = [[] for _ in range(world)]
            for r in range(world):
                for s in mine[r]:
                    if s.kind == RECV:
                        rows = wire[(s.peer, r)].popleft()
                        assert rows.shape[0] == s.rows
                        staged[r].append((s.dst_row, rows))
                        moved += rows.nbytes
            assert all(not q for q in wire.values()), "every message received"
            # Phase 2, once every rank exchanged: moves in order, then received rows and zeros.
            for r in range(world):
                info_r = roles[r][ri]
                if info_r.in_place:
                    buf = bufs[r]
                    for s in mine[r]:
                        if s.kind == MOVE:
                            assert s.dst_row <= s.src_row, "in-place moves go down"
                            buf[s.dst_row:s.dst_row + s.rows] = \
                                buf[s.src_row:s.src_row + s.rows].copy()
                else:
                    buf = np.full((info_r.new_rows, h), np.nan, dtype=np.float32)
                    for s in mine[r]:
                        if s.kind == MOVE:
                            buf[s.dst_row:s.dst_row + s.rows] = bufs[r][s.src_row:s.src_row + s.rows]
                for dst, rows in staged[r]:
                    buf[dst:dst + rows.shape[0]] = rows
                for s in mine[r]:
                    if s.kind == ZERO:
                        buf[s.dst_row:s.dst_row + s.rows] = 0.0
                buf = buf[:info_r.new_rows]
                want = shard(lib, model, role, layer, new_tp, position(new_p, new_tp, r)[1], h)
                if buf.shape != want.shape or not np.array_equal(buf.view(np.uint32),
                                                                 want.view(np.uint32)):
                    sys.exit(f"foreign_reshard: weights {world}: tp {old_tp} -> {new_tp}: "
                             f"{ROLE_NAMES[role]} layer {layer} rank {r} differs from pat's shard")
    assert moved == info.bytes_cross_rank, (moved, info.bytes_cross_rank)
    lib.pat_weight_plan_free(plan)
    kind = "nested" if nested else "contiguous"
    print(f"weights world {world}: tp {old_tp} -> {new_tp} ({kind}): bitwise equal to pat's "
          f"shards; {info.bytes_cross_rank} B cross-rank (minimum {info.min_cross_rank_bytes}), "
          f"{info.bytes_in_place} B in place, peak extra {info.peak_extra_bytes} B per rank")
    return info


def migrate_kv(lib, dims, world, old_tp, new_tp, rng):
    L_, H, D, BS, BLOCKS = dims.num_layers, dims.num_kv_heads, dims.head_dim, 4, 32
    old, old_p = layout(world, old_tp)
    new_p = fetch(lib, lib.pat_layout_nested, u32, C.byref(old), new_tp)
    new, new_p = layout(world, new_tp, new_p)
    old_dp, new_dp = world // old_tp, world // new_tp
    # Live sequences: random lengths, random old blocks; new blocks from a per-replica free list.
    free_old = [list(rng.permutation(BLOCKS)) for _ in range(old_dp)]
    free_new = [list(rng.permutation(BLOCKS)) for _ in range(new_dp)]
    seqs = []
    for i in range(6):
        n = int(rng.integers(1, 15))
        nb = -(-n // BS)
        o, d = i % old_dp, int(rng.integers(0, new_dp))
        ot = [int(free_old[o].pop()) for _ in range(nb)]
        nt = [int(free_new[d].pop()) for _ in range(nb)]
        seqs.append((o, d, n, ot, nt))
    keep = []
    c_seqs = (SeqKv * len(seqs))()
    for i, (o, d, n, ot, nt) in enumerate(seqs):
        a, b = (u32 * len(ot))(*ot), (u32 * len(nt))(*nt)
        keep += [a, b]
        c_seqs[i] = SeqKv(o, d, n, a, len(ot), b, len(nt))
    # Old pools, filled with a distinct 32-bit pattern per element of every live sequence.
    def value(s, h, layer, kv, t):
        base = (((s * 64 + h) * 64 + layer) * 2 + kv) * 4096 + t * D
        return (np.arange(D, dtype=np.uint64) + base) * np.uint64(2654435761) % np.uint64(2**31)

    pools_old = [np.zeros((L_, 2, BLOCKS, H // old_tp, BS, D), np.uint32) for _ in range(world)]
    pools_new = [np.zeros((L_, 2, BLOCKS, H // new_tp, BS, D), np.uint32) for _ in range(world)]
    for s, (o, _, n, ot, _) in enumerate(seqs):
        for h in range(H):
            per = H // old_tp
            rank = old_p[o * old_tp + h // per]
            for layer in range(L_):
                for kv in range(2):
                    for t in range(n):
                        pools_old[rank][layer, kv, ot[t // BS], h % per, t % BS] = \
                            value(s, h, layer, kv, t)
    plan = C.c_void_p()
    check(lib, lib.pat_kv_plan_new(C.byref(dims), C.byref(old), C.byref(new), BS, c_seqs,
                                   len(seqs), 2, C.byref(plan)), "pat_kv_plan_new")
    info = KvPlanInfo()
    check(lib, lib.pat_kv_plan_get_info(plan, C.byref(info)), "pat_kv_plan_get_info")

    def gather(pool, s, head):  # every layer, K then V, tokens along the old table
        _, _, n, ot, _ = seqs[s]
        t = np.arange(n)
        return np.concatenate([pool[layer, kv, np.array(ot)[t // BS], head, t % BS]
                               for layer in range(L_) for kv in range(2)])

    def scatter(pool, s, head, data):
        _, _, n, _, nt = seqs[s]
        t = np.arange(n)
        for i, (layer, kv) in enumerate((la, k) for la in range(L_) for k in range(2)):
            pool[layer, kv, np.array(nt)[t // BS], head, t % BS] = data[i * n:(i + 1) * n]

    progs = [fetch(lib, lib.pat_kv_plan_steps, KvStep, plan, r) for r in range(world)]
    wire = defaultdict(deque)
    for r in range(world):  # sends first, then locals, then receives (the documented order)
        for st in progs[r]:
            if st.kind == KV_SEND:
                wire[(r, st.peer)].append(gather(pools_old[r], st.seq, st.src_head))
    for r in range(world):
        for st in progs[r]:
            if st.kind == KV_LOCAL:
                scatter(pools_new[r], st.seq, st.dst_head, gather(pools_old[r], st.seq, st.src_head))
            elif st.kind == KV_RECV:
                scatter(pools_new[r], st.seq, st.dst_head, wire[(st.peer, r)].popleft())
    assert all(not q for q in wire.values()), "every piece received"
    for s, (_, d, n, _, nt) in enumerate(seqs):
        for h in range(H):
            per = H // new_tp
            rank = new_p[d * new_tp + h // per]
            for layer in range(L_):
                for kv in range(2):
                    for t in range(n):
                        got = pools_new[rank][layer, kv, nt[t // BS], h % per, t % BS]
                        if not np.array_equal(got, value(s, h, layer, kv, t)):
                            sys.exit(f"foreign_reshard: KV tp {old_tp} -> {new_tp}: sequence {s} "
                                     f"head {h} layer {layer} token {t} is wrong")
    lib.pat_kv_plan_free(plan)
    print(f"kv world {world}: tp {old_tp} -> {new_tp}: {len(seqs)} sequences, {info.n_pieces} "
          f"pieces bitwise in place; {info.bytes_cross_rank} B cross-rank, "
          f"{info.bytes_in_place} B on their rank (bf16)")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    lib = load(sys.argv[1])
    model_dir = sys.argv[2] if len(sys.argv) > 2 else "tests/data/golden/llama"
    if lib.pat_abi_version() != 3:
        sys.exit(f"foreign_reshard: written for ABI 3, the library has {lib.pat_abi_version()}")
    model = C.c_void_p()
    check(lib, lib.pat_model_open(model_dir.encode(), C.byref(model)), "pat_model_open")
    dims = Dims()
    check(lib, lib.pat_model_get_dims(model, C.byref(dims)), "pat_model_get_dims")
    grow = reshard_weights(lib, model, dims, 2, 1, 2)
    assert grow.bytes_cross_rank == 0, "growing tp with nested shards moves no weight bytes"
    reshard_weights(lib, model, dims, 4, 4, 2)
    reshard_weights(lib, model, dims, 4, 1, 4)
    reshard_weights(lib, model, dims, 4, 2, 4, nested=False)
    rng = np.random.default_rng(0)
    migrate_kv(lib, dims, 4, 2, 4, rng)
    migrate_kv(lib, dims, 4, 4, 1, rng)
    # A bad call: the model's 4 kv heads do not split 8 ways.
    eight, _ = layout(8, 8)
    one, _ = layout(8, 1)
    plan = C.c_void_p()
    st = lib.pat_weight_plan_new(C.byref(dims), C.byref(one), C.byref(eight), 4, C.byref(plan))
    assert st == PAT_ERR_INVALID_ARGUMENT and not plan.value, st
    print(f"bad call: {lib.pat_status_name(st).decode()}: {message(lib)}")
    lib.pat_model_free(model)
    print("foreign_reshard: OK")


if __name__ == "__main__":
    main()
