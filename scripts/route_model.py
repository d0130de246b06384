#!/usr/bin/env python
"""Python model of the CUDA kernel of gmod.route (csrc/cuda/route.cu), checked against the CPU op.

The CUDA kernel cannot run on a machine without a GPU, so this script runs its algorithm instead:
the same per-thread steps, written with numpy over the 512 threads of a block, one row at a time:

  * token codes: forced -> ~0, candidate -> order-preserving key (-0.0 -> +0.0, NaN -> 0), else ~1;
  * positions = token + pad, pad from the row's mask / scores addresses (groups of 4 tokens start on
    aligned tokens; rows that cannot be aligned use pad 0); out-of-row positions read as mask 2;
  * step 1: striped loop over groups (4 groups per thread in flight for float32, 2 for float64),
    invalid-mask error reports, forced counts, the top-byte histogram built with warp-aggregated adds
    (one add per distinct bin per warp, as __match_any_sync does), codes stored to the shared-memory
    cache when the row fits (the same 16-byte unit layout);
  * quota; digit selection as warp 0 does it (lane l owns bins 255-8l .. 248-8l, shuffle scan);
    radix passes 8 bits at a time with the early stop (need == bin count), reading the cache by
    16-byte units (4 per thread per iteration) or re-reading the row by groups;
  * compaction: tiles of 8192 positions, 16 consecutive positions per thread (cached reads rotated
    per thread), forced / tied / above bit masks, ONE exclusive scan of the three counts packed in
    64 bits (21 bits each), the keep mask (above | lowest cap-F forced | lowest need-E tied bits)
    written to consecutive slots from min(F, cap) + min(E, need) + G, the early stop once `count`
    tokens are placed; sentinels -1 in slots [count, C); unwritten slots keep a poison value.

It then compares idx and count with torch.ops.gmod.route on CPU (the reference), bit for bit, over
random cases: B 1..8, S 1..40000 (tile edges included), capacity 0..S+, top-k and threshold modes,
ties, NaN, +-0.0, +-inf, forced tokens over capacity, padding, num_routed 0 and above the number of
candidates, float32 and float64, aligned and misaligned rows, cached and uncached rows.

--plant BUG changes one detail of the model (see --help for the list) to show that the comparison
catches it: the run must then report mismatches (exit status 1 means "caught").

Needs torch with gmod_ext installed (CPU is enough). Examples:
    python scripts/route_model.py --cases 500
    python scripts/route_model.py --cases 200 --plant tie-rank     # expected: mismatches found
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch

T = 512            # threads per block
WARP = 32
GROUP = 4          # tokens per group (one 16-byte load of float32 scores)
TILE_GROUPS = 4    # compaction: groups per thread -> 16 positions per thread, 8192 per tile
SCAN_UNROLL = 4    # cached radix passes: 16-byte units per thread per iteration
FIELD = (1 << 21) - 1
H100_SMEM_OPTIN = 232448   # cudaDevAttrMaxSharedMemoryPerBlockOptin on H100 (227 KB)
STATIC_SMEM = 2400         # ptxas: the kernel's static shared memory
POISON = 0x5EADBEEF        # at::empty is uninitialised: a slot nobody writes keeps this

BUGS = {
    "tie-rank": "a tied token is kept while its tie rank <= need (off by one)",
    "negzero": "-0.0 keeps its own key (below +0.0) instead of sharing +0.0's",
    "room": "quota ignores the room forced tokens take (min(num_routed, capacity, ncand))",
    "carry": "the tie count is not carried from one compaction tile to the next",
    "pad": "pad = h instead of (4 - h) % 4 (groups start on unaligned tokens)",
    "early-stop": "the radix select stops after a pass whenever need <= bin count",
    "nan": "NaN keys map to the top (above +inf) instead of 0",
}


_POPC16 = np.array([bin(i).count("1") for i in range(1 << 16)], dtype=np.uint64)


def lowest_bits(m, r):
    """lowest_bits for every thread: the r lowest set bits of m (r <= 0: none; r >= popcount: all)."""
    m = np.asarray(m, dtype=np.int64).copy()
    r = np.asarray(r, dtype=np.int64)
    low = np.zeros_like(m)
    for _ in range(TILE_GROUPS * GROUP):           # at most 16 set bits
        take = (r > 0) & (m != 0)
        lsb = m & -m
        low[take] |= lsb[take]
        m[take] &= m[take] - 1
        r = r - take
    return low


def popcount16(x):
    """__popc of the per-thread bit masks (16 positions per thread)."""
    return _POPC16[np.asarray(x, dtype=np.int64)]


class KernelModel:
    def __init__(self, dtype, bug=None):
        self.dt = np.dtype(dtype)
        self.bits = self.dt.itemsize * 8
        self.utype = np.uint32 if self.bits == 32 else np.uint64
        self.forced = self.utype(~np.uint64(0) >> np.uint64(64 - self.bits))
        self.none = self.utype(int(self.forced) - 1)
        self.top_shift = self.bits - 8
        self.per_unit = 16 // self.dt.itemsize            # codes per 16-byte shared-memory unit
        self.units_per_group = GROUP // self.per_unit      # 1 or 2
        self.thread_units = TILE_GROUPS * self.units_per_group
        self.rot_shift = 1 if self.thread_units == 4 else 0
        self.load_unroll = 4 if self.bits == 32 else 2
        self.bug = bug
        self.cov = {"select": 0, "passes": 0, "early_stop": 0, "multi_tile": 0, "tile_break": 0, "vec": 0}

    # ---------------------------------------------------------------- codes
    def order_key(self, s):
        u = s.view(self.utype).copy()
        sign = self.utype(1 << (self.bits - 1))
        if self.bug != "negzero":
            u[u == sign] = 0                                   # -0.0 -> +0.0
        key = np.where((u & sign) != 0, ~u, u | sign).astype(self.utype)
        nan = np.isnan(s)
        key[nan] = self.utype(int(self.none) - 1) if self.bug == "nan" else 0
        return key

    def token_code(self, m, s, thr):
        """m int8 codes, s scores (scalar dtype), thr None or a value of the scalar dtype."""
        cand = m == 0
        if thr is not None:
            cand &= s > thr
        code = np.full(m.shape, self.none, dtype=self.utype)
        code[cand] = self.order_key(s[cand])
        code[m == 1] = self.forced
        return code

    # ---------------------------------------------------------------- global reads
    def load_groups(self, row, g):
        """RowIn::load for an array of group indices: scores [n, 4] and mask bytes [n, 4] (int8).
        The vector path and the per-token path read the same values; outside the row: mask 2."""
        j = g[:, None] * GROUP + np.arange(GROUP)[None, :] - row["pad"]
        inside = (j >= 0) & (j < row["S"])
        if row["vec"]:  # the vector path (whole group inside the row) must be aligned, or the GPU faults
            full = inside.all(axis=1)
            j0 = j[full, 0]
            assert ((row["s_addr"] + j0 * self.dt.itemsize) % 16 == 0).all(), "misaligned 16-byte score load"
            assert ((row["m_addr"] + j0) % 4 == 0).all(), "misaligned 4-byte mask load"
        jc = np.clip(j, 0, max(row["S"] - 1, 0))
        s = np.zeros(j.shape, dtype=self.dt)
        m = np.full(j.shape, 2, dtype=np.int8)
        if row["S"] > 0:
            s[inside] = row["s"][jc[inside]]
            m[inside] = row["m"][jc[inside]]
        return s, m, j

    # ---------------------------------------------------------------- histogram helpers
    @staticmethod
    def hist_add(hist, counted, digit):
        """hist_add for all 512 threads: per warp, the lowest lane of each group of equal digits adds
        the group's size (match.any + popc)."""
        c = counted.reshape(-1, WARP)
        d = digit.reshape(-1, WARP)
        same = (d[:, :, None] == d[:, None, :]) & c[:, :, None] & c[:, None, :]
        peers = same.sum(axis=2)
        lower = np.tril(np.ones((WARP, WARP), dtype=bool), k=-1)   # [i, j]: j < i
        leader = c & ~(same & lower[None]).any(axis=2)
        np.add.at(hist, d[leader], peers[leader])

    @staticmethod
    def hist_scan(hist):
        lanes = np.arange(WARP)
        local = np.stack([hist[255 - (lanes * 8 + i)] for i in range(8)], axis=1)  # [32, 8]
        sums = local.sum(axis=1)
        incl = np.cumsum(sums)
        return local, incl - sums, incl

    @staticmethod
    def hist_find(local, excl, incl, k):
        mine = np.nonzero((excl < k) & (k <= incl))[0]
        assert len(mine) == 1, "exactly one lane holds the k-th key"
        lane = int(mine[0])
        run = int(excl[lane])
        for i in range(8):
            if run + int(local[lane, i]) >= k:
                return 255 - (lane * 8 + i), k - run, int(local[lane, i])
            run += int(local[lane, i])
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- one block (row)
    def run_row(self, s, m, nr, C, thr, b, s_addr, m_addr, cached, out, err):
        S = len(s)
        tid = np.arange(T)
        es = self.dt.itemsize
        h = (4 - (m_addr & 3)) & 3
        vec = ((s_addr + h * es) & 15) == 0
        pad = ((GROUP - h) & (GROUP - 1)) if vec else 0
        if self.bug == "pad" and vec:
            pad = h
        ngroups = (S + pad + GROUP - 1) // GROUP
        row = {"s": s, "m": m, "S": S, "pad": pad, "vec": vec, "s_addr": s_addr, "m_addr": m_addr}
        cache = np.full(ngroups * GROUP, 0xAB, dtype=self.utype) if cached else None  # uninitialised

        # ---- 1. counts, errors, top-byte histogram, cache
        hist0 = np.zeros(256, dtype=np.int64)
        nf = 0
        U = self.load_unroll
        for g0 in range(0, ngroups, T * U):
            for u in range(U):
                g = g0 + u * T + tid
                sv, mv, j = self.load_groups(row, g)
                codes = np.empty(sv.shape, dtype=self.utype)
                for k in range(GROUP):
                    mk = mv[:, k].view(np.uint8)
                    bad = mk > 2
                    for loc in (b * S + j[bad, k]).tolist():
                        err.append((loc << 8) | 2)
                    c = self.token_code(mv[:, k], sv[:, k], thr)
                    codes[:, k] = c
                    nf += int((c == self.forced).sum())
                    self.hist_add(hist0, c < self.none, (c >> self.utype(self.top_shift)).astype(np.int64))
                if cached:
                    ok = g < ngroups
                    cache.reshape(-1, GROUP)[g[ok]] = codes[ok]

        # ---- quota and the first digit
        local, excl, incl = self.hist_scan(hist0)
        ncand = int(incl[-1])
        forced_kept = min(nf, C)
        room = C - forced_kept if self.bug != "room" else C
        q = 0 if nr < 0 else nr
        q = min(q, room, ncand)
        quota = int(q)
        if nr < 0:
            err.append((b << 8) | 1)
        prefix, pmask, need, done = 0, 0, quota, True
        if 0 < quota < ncand:
            digit, rank, cnt = self.hist_find(local, excl, incl, quota)
            prefix = digit << self.top_shift
            pmask = 0xFF << self.top_shift
            need = rank
            done = rank == cnt if self.bug != "early-stop" else rank <= cnt
            self.cov["select"] += 1
        n = forced_kept + quota
        self.cov["vec"] += int(vec)

        # ---- 2. remaining radix passes
        shift = self.top_shift - 8
        while shift >= 0 and not done:
            hist = np.zeros(256, dtype=np.int64)
            pre_u, pm_u = self.utype(prefix), self.utype(pmask)
            if cached:
                nunits = ngroups * self.units_per_group
                units = cache.reshape(-1, self.per_unit)
                for u0 in range(0, nunits, T * SCAN_UNROLL):
                    for r in range(SCAN_UNROLL):
                        u = u0 + r * T + tid
                        ok = u < nunits
                        cu = np.full((T, self.per_unit), self.none, dtype=self.utype)
                        cu[ok] = units[u[ok]]
                        for k in range(self.per_unit):
                            c = cu[:, k]
                            self.hist_add(hist, (c < self.none) & ((c & pm_u) == pre_u),
                                          ((c >> self.utype(shift)) & self.utype(0xFF)).astype(np.int64))
            else:
                for g0 in range(0, ngroups, T * U):
                    for u in range(U):
                        sv, mv, _ = self.load_groups(row, g0 + u * T + tid)
                        for k in range(GROUP):
                            c = self.token_code(mv[:, k], sv[:, k], thr)
                            self.hist_add(hist, (c < self.none) & ((c & pm_u) == pre_u),
                                          ((c >> self.utype(shift)) & self.utype(0xFF)).astype(np.int64))
            local, excl, incl = self.hist_scan(hist)
            digit, rank, cnt = self.hist_find(local, excl, incl, need)
            prefix |= digit << shift
            pmask |= 0xFF << shift
            need = rank
            done = (rank == cnt if self.bug != "early-stop" else rank <= cnt) or shift == 0
            self.cov["passes"] += 1
            self.cov["early_stop"] += int(done and shift > 0)
            shift -= 8

        # ---- 4. sentinels, written before the compaction (disjoint slots)
        if C > n:
            out[n:C] = -1

        # ---- 3. compaction
        pre_u, pm_u = self.utype(prefix), self.utype(pmask)
        cap = min(C, S)
        rot = (tid >> self.rot_shift) & (self.thread_units - 1)
        carry_f = carry_e = carry_g = 0
        t0 = 0
        while t0 < ngroups and min(carry_f, cap) + min(carry_e, need) + carry_g < n:
            gfirst = t0 + tid * TILE_GROUPS
            fm = np.zeros(T, dtype=np.int64)
            em = np.zeros(T, dtype=np.int64)
            gm = np.zeros(T, dtype=np.int64)

            def classify(c, q):
                bit = np.int64(1) << q.astype(np.int64)
                f = c == self.forced
                cand = (c < self.none) & ~f
                mk = c & pm_u
                fm[f] |= bit[f]
                gsel = cand & (mk > pre_u)
                esel = cand & (mk == pre_u)
                gm[gsel] |= bit[gsel]
                em[esel] |= bit[esel]

            if cached:
                nunits = ngroups * self.units_per_group
                units = cache.reshape(-1, self.per_unit)
                for i in range(self.thread_units):
                    ui = (i + rot) & (self.thread_units - 1)
                    u = gfirst * self.units_per_group + ui
                    ok = u < nunits
                    cu = np.full((T, self.per_unit), self.none, dtype=self.utype)
                    cu[ok] = units[u[ok]]
                    for k in range(self.per_unit):
                        classify(cu[:, k], ui * self.per_unit + k)
            else:
                for i in range(TILE_GROUPS):
                    sv, mv, _ = self.load_groups(row, gfirst + i)
                    for k in range(GROUP):
                        classify(self.token_code(mv[:, k], sv[:, k], thr), np.full(T, i * GROUP + k))

            popc = popcount16
            mine = popc(fm) | (popc(em) << np.uint64(21)) | (popc(gm) << np.uint64(42))
            incl_scan = np.cumsum(mine, dtype=np.uint64)
            pre = incl_scan - mine
            tot = int(incl_scan[-1])
            f0 = carry_f + (pre & np.uint64(FIELD)).astype(np.int64)
            e0 = carry_e + ((pre >> np.uint64(21)) & np.uint64(FIELD)).astype(np.int64)
            g0v = carry_g + (pre >> np.uint64(42)).astype(np.int64)
            # keep = gm | lowest_bits(fm, cap - f0) | lowest_bits(em, need - e0); kept tokens of a thread
            # take consecutive slots from min(f0, cap) + min(e0, need) + g0
            tie_room = need - e0 + (1 if self.bug == "tie-rank" else 0)
            keep = gm | lowest_bits(fm, cap - f0) | lowest_bits(em, tie_room)
            slot = np.minimum(f0, cap) + np.minimum(e0, need) + g0v
            tok0 = gfirst * GROUP - pad
            for qb in range(TILE_GROUPS * GROUP):          # the while loop over kept bits, in order
                kb = (keep >> qb) & 1 == 1
                w = kb & (slot < C)
                out[slot[w]] = (tok0 + qb)[w]
                slot = slot + kb
            carry_f += tot & FIELD
            if self.bug != "carry":
                carry_e += (tot >> 21) & FIELD
            carry_g += tot >> 42
            t0 += T * TILE_GROUPS
        self.cov["multi_tile"] += int(t0 > T * TILE_GROUPS)
        self.cov["tile_break"] += int(t0 < ngroups)
        return n

    def route(self, scores, mask, num_routed, C, thr, s_base=0, m_base=0, cache_limit=None, force_cached=None):
        """scores [B, S] numpy (float32/float64), mask [B, S] int8, num_routed [B] int32.
        s_base / m_base: byte address of the first element of scores / mask (mod 16 matters).
        Returns idx [B, C] int32 (poison where nothing wrote), count [B], error list."""
        B, S = scores.shape
        es = self.dt.itemsize
        thr_s = None if thr is None else self.dt.type(thr)   # static_cast<scalar_t>(threshold)
        cache_bytes = (S + 2 * (GROUP - 1)) // GROUP * GROUP * es
        limit = (H100_SMEM_OPTIN - STATIC_SMEM) if cache_limit is None else cache_limit
        cached = S > 0 and cache_bytes <= limit
        if force_cached is not None:
            cached = force_cached and S > 0
        idx = np.full((B, C), POISON, dtype=np.int64)
        count = np.full(B, POISON, dtype=np.int64)
        err = []
        for b in range(B):
            count[b] = self.run_row(scores[b], mask[b], int(num_routed[b]), C, thr_s, b,
                                    s_base + b * S * es, m_base + b * S, cached, idx[b], err)
        return idx, count, err, cached


# ------------------------------------------------------------------------------ random cases
SPECIAL_S = [1, 2, 3, 4, 5, 7, 8, 31, 33, 511, 512, 513, 2047, 2048, 2049, 4095, 4096, 4097, 8191, 8192,
             8193, 8195, 16383, 16384, 16387, 24575, 24577, 32767, 32768, 32771, 40000, 39997]


def make_case(rng):
    dtype = np.float32 if rng.random() < 0.7 else np.float64
    S = int(rng.choice(SPECIAL_S)) if rng.random() < 0.35 else int(np.exp(rng.uniform(0, math.log(40000))))
    S = max(1, min(S, 40000))
    B = int(rng.integers(1, 9)) if S <= 12000 else int(rng.integers(1, 4))
    kind = rng.choice(["randn", "ties", "few", "special", "prob", "const", "nan_heavy", "tiny"])
    if kind == "randn":
        s = rng.standard_normal((B, S))
    elif kind == "ties":
        s = rng.integers(-50, 50, (B, S)) / 8.0
    elif kind == "few":
        s = rng.integers(-2, 3, (B, S)) * 0.5
    elif kind == "special":
        vals = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 0.5, 5e-324])
        s = vals[rng.integers(0, len(vals), (B, S))]
    elif kind == "prob":   # the benchmark's distinct probabilities in (0, 1)
        s = np.stack([(rng.permutation(S) + 0.5) / S for _ in range(B)])
    elif kind == "const":
        s = np.full((B, S), rng.choice([0.25, -0.0, 0.0, np.nan, -np.inf]))
    elif kind == "nan_heavy":
        s = rng.standard_normal((B, S))
        s[rng.random((B, S)) < 0.5] = np.nan
        s[rng.random((B, S)) < 0.1] = -0.0
        s[rng.random((B, S)) < 0.1] = 0.0
    else:   # tiny: subnormals and signed zeros of the dtype
        s = rng.integers(-3, 4, (B, S)) * np.finfo(dtype).smallest_subnormal
    s = s.astype(dtype)
    mkind = rng.choice(["none", "random", "forced_heavy", "padding_tail", "all_forced", "all_padding"],
                       p=[0.25, 0.3, 0.15, 0.2, 0.05, 0.05])
    m = np.zeros((B, S), dtype=np.int8)
    r = rng.random((B, S))
    if mkind == "random":
        m[r < 0.2] = 1
        m[r > 0.85] = 2
    elif mkind == "forced_heavy":
        m[r < 0.7] = 1
        m[r > 0.95] = 2
    elif mkind == "padding_tail":
        for b in range(B):
            m[b, : S // 5] = 1
            m[b, S - int(rng.integers(0, S + 1)):] = 2
    elif mkind == "all_forced":
        m[:] = 1
    elif mkind == "all_padding":
        m[:] = 2
    cap_kind = rng.choice(["rand", "rand", "small", "S", "more", "zero"])
    C = {"rand": int(rng.integers(1, S + 1)), "small": int(rng.integers(1, min(S, 64) + 1)), "S": S,
         "more": S + int(rng.integers(1, 9)), "zero": 0}[cap_kind]
    nr = rng.integers(0, S + 8, B).astype(np.int32)
    for b in range(B):
        v = rng.random()
        if v < 0.1:
            nr[b] = 0
        elif v < 0.2:
            nr[b] = 2**31 - 1
        elif v < 0.3:
            nr[b] = S
    thr = None
    if rng.random() < 0.4:
        finite = s[np.isfinite(s)]
        opts = [-math.inf, math.inf, 0.0, -0.0, float(rng.standard_normal())]
        if finite.size:
            opts += [float(finite[rng.integers(0, finite.size)])] * 3
        thr = float(opts[rng.integers(0, len(opts))])
    # addresses: mostly aligned allocations; sometimes views with element offsets
    es = np.dtype(dtype).itemsize
    s_base = 0 if rng.random() < 0.7 else int(rng.integers(0, 4)) * es
    m_base = 0 if rng.random() < 0.7 else int(rng.integers(0, 4))
    force_cached = None if rng.random() < 0.6 else bool(rng.random() < 0.5)
    return dict(scores=s, mask=m, nr=nr, C=C, thr=thr, s_base=s_base, m_base=m_base, force_cached=force_cached,
                desc=f"B={B} S={S} {np.dtype(dtype).name} {kind}/{mkind} C={C} thr={thr} "
                     f"s_base={s_base} m_base={m_base} cached={force_cached}")


def gpu_test_cases(rng):
    """The data of python_tests/test_cuda_build.py's route tests (which run on a GPU later): its
    large-rows test in full (B = 64 rows of S = 32768, many ties, constant / NaN / all-forced /
    all-padding rows, 5 calls) and the benchmark's rows (distinct probabilities, forced prefix,
    padded tail) at B=8, S=4096 and B=1, S=32768."""
    B, S = 64, 32768
    s = (rng.integers(-50, 50, (B, S)) / 8).astype(np.float32)
    s[1] = 0.5
    s[2] = np.nan
    s[3, ::7] = np.nan
    s[4] = rng.standard_normal(S)
    r = rng.random((B, S))
    m = np.zeros((B, S), dtype=np.int8)
    m[r < 0.2] = 1
    m[r > 0.85] = 2
    m[5] = 1
    m[6] = 2
    nr = rng.integers(0, S, B).astype(np.int32)
    nr[7] = S
    out = []
    for C, thr, dt in [(S // 2, None, np.float32), (S // 8, None, np.float32), (S, None, np.float32),
                       (S // 2, 1.0, np.float32), (S // 3, None, np.float64)]:
        out.append(dict(scores=s.astype(dt), mask=m, nr=nr, C=C, thr=thr, s_base=0, m_base=0, force_cached=None,
                        desc=f"large rows B={B} S={S} C={C} thr={thr} {np.dtype(dt).name}"))
    for B, S in [(8, 4096), (1, 32768)]:
        s = np.stack([(rng.permutation(S) + 0.5) / S for _ in range(B)]).astype(np.float32)
        m = np.zeros((B, S), dtype=np.int8)
        for b in range(B):
            m[b, : S // 8] = 1
            m[b, S - int(rng.integers(0, S // 4)):] = 2
        routable = (m == 0).sum(1)
        nr = np.round(routable * 0.5).astype(np.int32)
        C = int(((m == 1).sum(1) + nr).max())
        out.append(dict(scores=s, mask=m, nr=nr, C=C, thr=None, s_base=0, m_base=0, force_cached=None,
                        desc=f"benchmark-like B={B} S={S} C={C}"))
    return out


def cpu_route(case):
    import gmod_ext  # noqa: F401  (registers torch.ops.gmod)
    idx, count = torch.ops.gmod.route(torch.from_numpy(case["scores"]), torch.from_numpy(case["mask"]),
                                      torch.from_numpy(case["nr"]), case["C"], case["thr"])
    return idx.numpy().astype(np.int64), count.numpy().astype(np.int64)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=450, help="number of random cases (default 450)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plant", choices=sorted(BUGS), default=None,
                    help="model a bug on purpose; the comparison must then fail. "
                         + "; ".join(f"{k}: {v}" for k, v in BUGS.items()).replace("%", "%%"))
    ap.add_argument("--stop-after", type=int, default=3, help="stop after this many mismatching cases")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case")
    ap.add_argument("--gpu-test-data", action="store_true",
                    help="after the random cases, also run the GPU tests' large-row data and benchmark-like rows")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    t_start = time.time()
    cases = [make_case(rng) for _ in range(args.cases)]
    if args.gpu_test_data:
        cases += gpu_test_cases(rng)
    bad = 0
    cov = {}
    stats = {"cached": 0, "uncached": 0, "threshold": 0, "topk": 0, "misaligned": 0, "rows": 0}
    for i, case in enumerate(cases):
        model = KernelModel(case["scores"].dtype, bug=args.plant)
        ref_idx, ref_count = cpu_route(case)
        try:
            idx, count, err, cached = model.route(case["scores"], case["mask"], case["nr"], case["C"], case["thr"],
                                                  case["s_base"], case["m_base"], force_cached=case["force_cached"])
        except AssertionError as e:  # the model's own invariants (alignment, one lane per pick)
            print(f"[{i}] MODEL ASSERTION {e}: {case['desc']}")
            bad += 1
            if bad >= args.stop_after:
                break
            continue
        for k, v in model.cov.items():
            cov[k] = cov.get(k, 0) + v
        assert not err, "valid inputs must report no device error"
        stats["cached" if cached else "uncached"] += 1
        stats["topk" if case["thr"] is None else "threshold"] += 1
        stats["misaligned"] += int(case["s_base"] % 16 != 0 or case["m_base"] % 4 != 0)
        stats["rows"] += case["scores"].shape[0]
        ok = np.array_equal(idx, ref_idx) and np.array_equal(count, ref_count)
        if args.verbose or not ok:
            print(f"[{i}] {'ok ' if ok else 'MISMATCH'} {case['desc']}")
        if not ok:
            bad += 1
            rows = np.nonzero((idx != ref_idx).any(axis=1) | (count != ref_count))[0]
            b = int(rows[0])
            diff = np.nonzero(idx[b] != ref_idx[b])[0]
            print(f"    row {b}: count model {count[b]} cpu {ref_count[b]}; first idx diffs at slots "
                  f"{diff[:5].tolist()}: model {idx[b, diff[:5]].tolist()} cpu {ref_idx[b, diff[:5]].tolist()}")
            if bad >= args.stop_after:
                break

    # invalid values: the model must report a device error wherever the CPU op raises
    rng2 = np.random.default_rng(args.seed + 1)
    n_err = 0
    for _ in range(20):
        S = int(rng2.integers(1, 3000))
        B = int(rng2.integers(1, 4))
        s = rng2.standard_normal((B, S)).astype(np.float32)
        m = rng2.integers(0, 3, (B, S)).astype(np.int8)
        nr = rng2.integers(0, S, B).astype(np.int32)
        if rng2.random() < 0.5:
            m[rng2.integers(0, B), rng2.integers(0, S)] = int(rng2.choice([3, -1, 127, -128]))
        else:
            nr[rng2.integers(0, B)] = -1
        _, _, err, _ = KernelModel(np.float32).route(s, m, nr, S // 2, None)
        try:
            torch.ops.gmod.route(torch.from_numpy(s), torch.from_numpy(m), torch.from_numpy(nr), S // 2, None)
            raised = False
        except ValueError:
            raised = True
        n_err += int(bool(err) == raised)
    print(f"error reporting: {n_err}/20 invalid-input cases flagged exactly where the CPU op raises")

    done = i + 1
    print(f"{done} cases ({stats['rows']} rows; {stats['topk']} top-k, {stats['threshold']} threshold; "
          f"{stats['cached']} cached, {stats['uncached']} uncached; {stats['misaligned']} misaligned)"
          f" in {time.time() - t_start:.0f} s" + (f", planted bug '{args.plant}'" if args.plant else ""))
    print("rows by path: " + ", ".join(f"{k} {v}" for k, v in cov.items())
          + "  (select: 0 < quota < candidates; passes: radix passes after the first; early_stop: select"
            " ended before the last byte; multi_tile / tile_break: compaction ran > 1 tile / stopped early;"
            " vec: vector loads)")
    if bad or n_err != 20:
        print(f"FAIL: {bad} case(s) differ from torch.ops.gmod.route (CPU)")
        return 1
    print("OK: the model of the CUDA kernel is bit-identical to torch.ops.gmod.route (CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
