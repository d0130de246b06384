"""Every op, called through torch.ops.gmod directly, rejects bad inputs with a Python exception
(TypeError for dtypes, ValueError for shapes and values, RuntimeError for devices) whose message
names the op and the argument, and leaves every input untouched (kv_cache_append: the cache too).
Also: an empty batch (B = 0) works for every op, and good calls do not modify their inputs."""
from __future__ import annotations

import math
import re

import pytest
import torch

from conftest import assert_unchanged, snapshot

GMOD_OPS = ("router_logits", "router_logits_backward", "route", "gather_rows", "gather_rows_backward",
            "scatter_merge", "scatter_merge_backward", "attention", "attention_backward", "kv_cache_append")

I32 = torch.int32


def i32(v, dev):
    return torch.tensor(v, dtype=I32, device=dev)


# ------------------------------------------------------------------ good arguments, in schema order
def router_args(dev, B=2):
    return dict(x=torch.randn(B, 5, 8, device=dev), weight=torch.randn(8, device=dev),
                norm_weight=torch.rand(8, device=dev) + 0.5, eps=1e-6)


def router_bwd_args(dev, B=2):
    a = router_args(dev, B)
    return dict(grad=torch.randn(B, 5, device=dev), **a)


def route_args(dev, B=2):
    mask = torch.zeros(B, 6, dtype=torch.int8, device=dev)
    if B:
        mask[0, 1] = 1
        mask[-1, 5] = 2
    return dict(scores=torch.randn(B, 6, device=dev), mask=mask,
                num_routed=torch.full((B,), 2, dtype=I32, device=dev), capacity=4, threshold=None)


def _idx(dev, B):
    rows = [[0, 2, 5, -1], [1, 3, -1, -1]]
    counts = [3, 2]
    return (i32([rows[b % 2] for b in range(B)], dev).view(B, 4),
            i32([counts[b % 2] for b in range(B)], dev))


def gather_args(dev, B=2):
    idx, count = _idx(dev, B)
    return dict(x=torch.randn(B, 6, 4, device=dev), idx=idx, count=count)


def gather_bwd_args(dev, B=2):
    idx, count = _idx(dev, B)
    return dict(grad=torch.randn(B, 4, 4, device=dev), idx=idx, count=count, seq_len=6)


def merge_args(dev, B=2):
    idx, count = _idx(dev, B)
    return dict(x=torch.randn(B, 6, 4, device=dev), base=torch.randn(B, 4, 4, device=dev),
                delta=torch.randn(B, 4, 4, device=dev), gate=torch.rand(B, 4, device=dev), idx=idx, count=count,
                skip_scale=torch.rand(B, 6, device=dev))


def merge_bwd_args(dev, B=2):
    return dict(grad=torch.randn(B, 6, 4, device=dev), **merge_args(dev, B))


def attn_args(dev, B=2):
    # d = 32: the smallest head dim the CUDA kernels take, so that on the GPU the error under test (not
    # "head dim not supported") is the one raised
    ql, kl = [4, 2], [6, 3]
    return dict(q=torch.randn(B, 4, 4, 32, device=dev), k=torch.randn(B, 6, 2, 32, device=dev),
                v=torch.randn(B, 6, 2, 32, device=dev), q_len=i32([ql[b % 2] for b in range(B)], dev),
                k_len=i32([kl[b % 2] for b in range(B)], dev), scale=0.35)


def attn_bwd_args(dev, B=2):
    a = attn_args(dev, B)
    o, lse = torch.ops.gmod.attention(*a.values())
    return dict(grad_o=torch.randn_like(a["q"]), q=a["q"], k=a["k"], v=a["v"], o=o, lse=lse, q_len=a["q_len"],
                k_len=a["k_len"], scale=a["scale"])


def kv_args(dev, B=2):
    cl, nl = [1, 4], [2, 1]
    return dict(k_cache=torch.randn(B, 6, 2, 8, device=dev), v_cache=torch.randn(B, 6, 2, 8, device=dev),
                cache_len=i32([cl[b % 2] for b in range(B)], dev), k_new=torch.randn(B, 3, 2, 8, device=dev),
                v_new=torch.randn(B, 3, 2, 8, device=dev), new_len=i32([nl[b % 2] for b in range(B)], dev))


BUILDERS = {
    "router_logits": router_args,
    "router_logits_backward": router_bwd_args,
    "route": route_args,
    "gather_rows": gather_args,
    "gather_rows_backward": gather_bwd_args,
    "scatter_merge": merge_args,
    "scatter_merge_backward": merge_bwd_args,
    "attention": attn_args,
    "attention_backward": attn_bwd_args,
    "kv_cache_append": kv_args,
}


# ------------------------------------------------------------------ mutations
def noncontig(t):
    """Same shape and values, not contiguous."""
    out = torch.empty(*t.shape, 2, dtype=t.dtype, device=t.device)[..., 0]
    return out.copy_(t)


def set_(key, fn):
    def mutate(a, other):
        a[key] = fn(a[key], other)

    return mutate


def setidx(key, pos, value):
    def mutate(a, other):
        t = a[key].clone()
        t[pos] = value
        a[key] = t

    return mutate


def dtype_(key, dt):
    return set_(key, lambda t, o: t.to(dt))


def device_(key):
    return set_(key, lambda t, o: t.to(o))


def drop_dim(key):
    return set_(key, lambda t, o: t[0])


def add_dim(key):
    return set_(key, lambda t, o: t.unsqueeze(0))


def nc_(key):
    return set_(key, lambda t, o: noncontig(t))


def narrow_(key, dim, n=1):
    return set_(key, lambda t, o: t.narrow(dim, 0, t.shape[dim] - n).contiguous())


T, V, R = TypeError, ValueError, RuntimeError

# (op, case id, mutation, exception, argument named in the message, optional extra regex)
CASES = [
    # router_logits
    ("router_logits", "x_int", dtype_("x", torch.int32), T, "x"),
    ("router_logits", "x_rank2", drop_dim("x"), V, "x"),
    ("router_logits", "x_noncontig", nc_("x"), V, "x"),
    ("router_logits", "weight_short", narrow_("weight", 0), V, "weight"),
    ("router_logits", "weight_rank2", add_dim("weight"), V, "weight"),
    ("router_logits", "weight_fp16", dtype_("weight", torch.float16), T, "weight"),
    ("router_logits", "weight_noncontig", nc_("weight"), V, "weight"),
    ("router_logits", "weight_device", device_("weight"), R, "weight"),
    ("router_logits", "norm_weight_fp64", dtype_("norm_weight", torch.float64), T, "norm_weight"),
    ("router_logits", "norm_weight_short", narrow_("norm_weight", 0), V, "norm_weight"),
    ("router_logits", "norm_weight_device", device_("norm_weight"), R, "norm_weight"),
    ("router_logits", "norm_weight_noncontig", nc_("norm_weight"), V, "norm_weight"),
    ("router_logits", "norm_weight_rank2", add_dim("norm_weight"), V, "norm_weight"),
    ("router_logits", "eps_negative", set_("eps", lambda e, o: -1e-6), V, "eps"),
    ("router_logits", "eps_nan", set_("eps", lambda e, o: math.nan), V, "eps"),
    # router_logits_backward
    ("router_logits_backward", "grad_fp16", dtype_("grad", torch.float16), T, "grad"),
    ("router_logits_backward", "grad_shape", narrow_("grad", 1), V, "grad"),
    ("router_logits_backward", "grad_rank3", add_dim("grad"), V, "grad"),
    ("router_logits_backward", "grad_noncontig", nc_("grad"), V, "grad"),
    ("router_logits_backward", "grad_device", device_("grad"), R, "grad"),
    ("router_logits_backward", "x_bool", dtype_("x", torch.bool), T, "x"),
    ("router_logits_backward", "eps_inf", set_("eps", lambda e, o: math.inf), V, "eps"),
    # route
    ("route", "scores_fp16", dtype_("scores", torch.float16), T, "scores"),
    ("route", "scores_bf16", dtype_("scores", torch.bfloat16), T, "scores"),
    ("route", "scores_rank3", add_dim("scores"), V, "scores"),
    ("route", "scores_noncontig", nc_("scores"), V, "scores"),
    ("route", "mask_uint8", dtype_("mask", torch.uint8), T, "mask"),
    ("route", "mask_bool", dtype_("mask", torch.bool), T, "mask"),
    ("route", "mask_shape", narrow_("mask", 1), V, "mask"),
    ("route", "mask_code_3", setidx("mask", (1, 2), 3), V, "mask"),
    ("route", "mask_code_neg", setidx("mask", (0, 0), -1), V, "mask"),
    ("route", "mask_noncontig", nc_("mask"), V, "mask"),
    ("route", "mask_device", device_("mask"), R, "mask"),
    ("route", "num_routed_negative", setidx("num_routed", 1, -1), V, "num_routed"),
    ("route", "num_routed_int64", dtype_("num_routed", torch.int64), T, "num_routed"),
    ("route", "num_routed_shape", narrow_("num_routed", 0), V, "num_routed"),
    ("route", "num_routed_device", device_("num_routed"), R, "num_routed"),
    ("route", "capacity_negative", set_("capacity", lambda c, o: -1), V, "capacity"),
    ("route", "threshold_nan", set_("threshold", lambda c, o: math.nan), V, "threshold"),
    # gather_rows
    ("gather_rows", "x_int", dtype_("x", torch.int64), T, "x"),
    ("gather_rows", "x_rank2", drop_dim("x"), V, "x"),
    ("gather_rows", "x_noncontig", nc_("x"), V, "x"),
    ("gather_rows", "idx_int64", dtype_("idx", torch.int64), T, "idx"),
    ("gather_rows", "idx_rank1", drop_dim("idx"), V, "idx"),
    ("gather_rows", "idx_batch", narrow_("idx", 0), V, "idx"),
    ("gather_rows", "idx_noncontig", nc_("idx"), V, "idx"),
    ("gather_rows", "idx_device", device_("idx"), R, "idx"),
    ("gather_rows", "idx_out_of_range", setidx("idx", (0, 2), 6), V, "idx"),
    ("gather_rows", "idx_negative", setidx("idx", (1, 0), -1), V, "idx"),
    ("gather_rows", "idx_unsorted", setidx("idx", (0, 0), 3), V, "idx"),
    ("gather_rows", "idx_duplicate", setidx("idx", (1, 1), 1), V, "idx"),
    ("gather_rows", "count_negative", setidx("count", 0, -1), V, "count"),
    ("gather_rows", "count_over_capacity", setidx("count", 1, 5), V, "count"),
    ("gather_rows", "count_int64", dtype_("count", torch.int64), T, "count"),
    ("gather_rows", "count_shape", narrow_("count", 0), V, "count"),
    ("gather_rows", "count_device", device_("count"), R, "count"),
    # gather_rows_backward
    ("gather_rows_backward", "grad_int", dtype_("grad", torch.int32), T, "grad"),
    ("gather_rows_backward", "grad_noncontig", nc_("grad"), V, "grad"),
    ("gather_rows_backward", "seq_len_negative", set_("seq_len", lambda s, o: -1), V, "seq_len"),
    ("gather_rows_backward", "idx_past_seq_len", set_("seq_len", lambda s, o: 5), V, "idx"),
    ("gather_rows_backward", "idx_capacity", narrow_("idx", 1), V, "idx"),
    ("gather_rows_backward", "idx_duplicate", setidx("idx", (0, 1), 0), V, "idx"),
    ("gather_rows_backward", "count_over_capacity", setidx("count", 0, 9), V, "count"),
    ("gather_rows_backward", "idx_device", device_("idx"), R, "idx"),
    ("gather_rows_backward", "grad_rank2", drop_dim("grad"), V, "grad"),
    ("gather_rows_backward", "count_negative", setidx("count", 0, -1), V, "count"),
    ("gather_rows_backward", "idx_int64", dtype_("idx", torch.int64), T, "idx"),
    ("gather_rows_backward", "count_int64", dtype_("count", torch.int64), T, "count"),
    # scatter_merge
    ("scatter_merge", "x_int", dtype_("x", torch.int32), T, "x"),
    ("scatter_merge", "x_noncontig", nc_("x"), V, "x"),
    ("scatter_merge", "base_dtype", dtype_("base", torch.float16), T, "base"),
    ("scatter_merge", "base_hidden", narrow_("base", 2), V, "base"),
    ("scatter_merge", "base_batch", narrow_("base", 0), V, "base"),
    ("scatter_merge", "base_rank2", drop_dim("base"), V, "base"),
    ("scatter_merge", "base_noncontig", nc_("base"), V, "base"),
    ("scatter_merge", "base_device", device_("base"), R, "base"),
    ("scatter_merge", "delta_shape", narrow_("delta", 1), V, "delta"),
    ("scatter_merge", "delta_dtype", dtype_("delta", torch.float64), T, "delta"),
    ("scatter_merge", "delta_noncontig", nc_("delta"), V, "delta"),
    ("scatter_merge", "delta_device", device_("delta"), R, "delta"),
    ("scatter_merge", "gate_shape", narrow_("gate", 1), V, "gate"),
    ("scatter_merge", "gate_fp64", dtype_("gate", torch.float64), T, "gate"),
    ("scatter_merge", "gate_noncontig", nc_("gate"), V, "gate"),
    ("scatter_merge", "gate_device", device_("gate"), R, "gate"),
    ("scatter_merge", "skip_scale_shape", narrow_("skip_scale", 1), V, "skip_scale"),
    ("scatter_merge", "skip_scale_bf16", dtype_("skip_scale", torch.bfloat16), T, "skip_scale"),
    ("scatter_merge", "skip_scale_device", device_("skip_scale"), R, "skip_scale"),
    ("scatter_merge", "idx_capacity", narrow_("idx", 1), V, "idx"),
    ("scatter_merge", "idx_out_of_range", setidx("idx", (1, 1), 60), V, "idx"),
    ("scatter_merge", "idx_unsorted", setidx("idx", (0, 1), 0), V, "idx"),
    ("scatter_merge", "idx_duplicate", setidx("idx", (0, 2), 2), V, "idx"),
    ("scatter_merge", "count_negative", setidx("count", 1, -3), V, "count"),
    ("scatter_merge", "count_over_capacity", setidx("count", 0, 5), V, "count"),
    ("scatter_merge", "idx_device", device_("idx"), R, "idx"),
    ("scatter_merge", "count_device", device_("count"), R, "count"),
    ("scatter_merge", "x_rank2", drop_dim("x"), V, "x"),
    ("scatter_merge", "skip_scale_noncontig", nc_("skip_scale"), V, "skip_scale"),
    ("scatter_merge", "idx_negative", setidx("idx", (1, 0), -1), V, "idx"),
    ("scatter_merge", "idx_int64", dtype_("idx", torch.int64), T, "idx"),
    ("scatter_merge", "count_int64", dtype_("count", torch.int64), T, "count"),
    # scatter_merge_backward
    ("scatter_merge_backward", "grad_shape", narrow_("grad", 1), V, "grad"),
    ("scatter_merge_backward", "grad_dtype", dtype_("grad", torch.bfloat16), T, "grad"),
    ("scatter_merge_backward", "grad_noncontig", nc_("grad"), V, "grad"),
    ("scatter_merge_backward", "grad_device", device_("grad"), R, "grad"),
    ("scatter_merge_backward", "idx_unsorted", setidx("idx", (1, 0), 4), V, "idx"),
    ("scatter_merge_backward", "count_over_capacity", setidx("count", 1, 7), V, "count"),
    # attention
    ("attention", "q_int", dtype_("q", torch.int32), T, "q"),
    ("attention", "q_rank3", drop_dim("q"), V, "q"),
    ("attention", "q_noncontig", set_("q", lambda t, o: t.transpose(1, 2).contiguous().transpose(1, 2)), V, "q"),
    ("attention", "k_dtype", dtype_("k", torch.float16), T, "k"),
    ("attention", "v_dtype", dtype_("v", torch.float64), T, "v"),
    ("attention", "k_rank5", add_dim("k"), V, "k"),
    ("attention", "k_batch", narrow_("k", 0), V, "k"),
    ("attention", "k_head_dim", narrow_("k", 3), V, "k"),
    ("attention", "k_noncontig", nc_("k"), V, "k"),
    ("attention", "v_shape", narrow_("v", 1), V, "v"),
    ("attention", "gqa_not_multiple", narrow_("q", 2, 1), V, "q"),
    ("attention", "k_device", device_("k"), R, "k"),
    ("attention", "v_device", device_("v"), R, "v"),
    ("attention", "q_len_int64", dtype_("q_len", torch.int64), T, "q_len"),
    ("attention", "q_len_shape", narrow_("q_len", 0), V, "q_len"),
    ("attention", "q_len_over", setidx("q_len", 1, 5), V, "q_len"),
    ("attention", "q_len_negative", setidx("q_len", 0, -1), V, "q_len"),
    ("attention", "k_len_over", setidx("k_len", 0, 7), V, "k_len"),
    ("attention", "k_len_negative", setidx("k_len", 1, -2), V, "k_len"),
    ("attention", "q_len_device", device_("q_len"), R, "q_len"),
    ("attention", "k_len_device", device_("k_len"), R, "k_len"),
    ("attention", "v_noncontig", nc_("v"), V, "v"),
    ("attention", "scale_nan", set_("scale", lambda c, o: math.nan), V, "scale"),
    ("attention", "scale_inf", set_("scale", lambda c, o: -math.inf), V, "scale"),
    # attention_backward
    ("attention_backward", "grad_o_shape", narrow_("grad_o", 1), V, "grad_o"),
    ("attention_backward", "grad_o_dtype", dtype_("grad_o", torch.float16), T, "grad_o"),
    ("attention_backward", "grad_o_device", device_("grad_o"), R, "grad_o"),
    ("attention_backward", "o_shape", narrow_("o", 3), V, "o"),
    ("attention_backward", "lse_dtype", dtype_("lse", torch.bfloat16), T, "lse"),
    ("attention_backward", "lse_shape", narrow_("lse", 2), V, "lse"),
    ("attention_backward", "lse_device", device_("lse"), R, "lse"),
    ("attention_backward", "k_len_over", setidx("k_len", 0, 9), V, "k_len"),
    ("attention_backward", "grad_o_noncontig", nc_("grad_o"), V, "grad_o"),
    ("attention_backward", "o_dtype", dtype_("o", torch.float16), T, "o"),
    ("attention_backward", "o_noncontig", nc_("o"), V, "o"),
    ("attention_backward", "o_device", device_("o"), R, "o"),
    ("attention_backward", "lse_noncontig", nc_("lse"), V, "lse"),
    ("attention_backward", "scale_nan", set_("scale", lambda c, o: math.nan), V, "scale"),
    # kv_cache_append
    ("kv_cache_append", "k_cache_int", dtype_("k_cache", torch.int32), T, "k_cache"),
    ("kv_cache_append", "k_cache_rank3", drop_dim("k_cache"), V, "k_cache"),
    ("kv_cache_append", "k_cache_noncontig", nc_("k_cache"), V, "k_cache"),
    ("kv_cache_append", "v_cache_dtype", dtype_("v_cache", torch.float16), T, "v_cache"),
    ("kv_cache_append", "v_cache_shape", narrow_("v_cache", 1), V, "v_cache"),
    ("kv_cache_append", "v_cache_device", device_("v_cache"), R, "v_cache"),
    ("kv_cache_append", "k_new_dtype", dtype_("k_new", torch.float64), T, "k_new"),
    ("kv_cache_append", "k_new_heads", narrow_("k_new", 2), V, "k_new"),
    ("kv_cache_append", "k_new_batch", narrow_("k_new", 0), V, "k_new"),
    ("kv_cache_append", "k_new_noncontig", nc_("k_new"), V, "k_new"),
    ("kv_cache_append", "k_new_device", device_("k_new"), R, "k_new"),
    ("kv_cache_append", "v_new_shape", narrow_("v_new", 1), V, "v_new"),
    ("kv_cache_append", "v_new_dtype", dtype_("v_new", torch.float64), T, "v_new"),
    ("kv_cache_append", "v_new_noncontig", nc_("v_new"), V, "v_new"),
    ("kv_cache_append", "v_new_device", device_("v_new"), R, "v_new"),
    ("kv_cache_append", "v_cache_noncontig", nc_("v_cache"), V, "v_cache"),
    ("kv_cache_append", "cache_len_shape", narrow_("cache_len", 0), V, "cache_len"),
    ("kv_cache_append", "new_len_int64", dtype_("new_len", torch.int64), T, "new_len"),
    ("kv_cache_append", "new_len_device", device_("new_len"), R, "new_len"),
    ("kv_cache_append", "cache_len_int64", dtype_("cache_len", torch.int64), T, "cache_len"),
    ("kv_cache_append", "cache_len_negative", setidx("cache_len", 0, -1), V, "cache_len"),
    ("kv_cache_append", "cache_len_over_capacity", setidx("cache_len", 0, 7), V, "cache_len"),
    ("kv_cache_append", "cache_len_device", device_("cache_len"), R, "cache_len"),
    ("kv_cache_append", "new_len_negative", setidx("new_len", 1, -1), V, "new_len"),
    ("kv_cache_append", "new_len_over_T", setidx("new_len", 0, 4), V, "new_len"),
    ("kv_cache_append", "new_len_shape", narrow_("new_len", 0), V, "new_len"),
    ("kv_cache_append", "overflow", setidx("new_len", 1, 3), V, "cache_len"),
]


def other_device(device):
    return "meta" if device == "cpu" else "cpu"


@pytest.mark.parametrize("op,mutate,exc,name", [pytest.param(c[0], c[2], c[3], c[4], id=f"{c[0]}-{c[1]}")
                                                for c in CASES])
def test_rejects(device, op, mutate, exc, name):
    args = BUILDERS[op](device)
    mutate(args, other_device(device))
    tensors = [v for v in args.values() if isinstance(v, torch.Tensor)]
    real = [t for t in tensors if t.device.type != "meta"]
    before = snapshot(*real)
    fn = getattr(torch.ops.gmod, op)
    # the message names the op and then the argument, e.g. "gmod.route: mask[1, 2] = 3 is not ..."
    pattern = rf"gmod\.{op}: (.*\b)?{re.escape(name)}\b"
    with pytest.raises(exc, match=pattern):
        fn(*args.values())
    # nothing was written: inputs (for kv_cache_append: the cache and its lengths) are untouched
    assert_unchanged(before, real)


def test_kv_overflow_message(device):
    args = kv_args(device)
    args["new_len"] = i32([2, 3], device)  # row 1: 4 + 3 > 6
    before = snapshot(*args.values())
    with pytest.raises(ValueError, match=r"gmod\.kv_cache_append: row 1 overflows the cache: cache_len 4 \+ new_len 3"):
        torch.ops.gmod.kv_cache_append(*args.values())
    assert_unchanged(before, list(args.values()), list(args))


def test_messages_format_numbers_shapes_and_devices(device):
    """Exact text of messages that format integers, shapes and dtypes (csrc/include/gmod/message.h builds
    them without iostream; an ostream-formatted integer crashed one GPU build)."""
    args = route_args(device)
    args["num_routed"] = i32([2, -1], device)
    with pytest.raises(ValueError, match=r"^gmod\.route: num_routed\[1\] = -1 must be >= 0"):
        torch.ops.gmod.route(*args.values())
    args = router_args(device)
    args["x"] = torch.randn(2, 5, device=device)
    with pytest.raises(ValueError, match=r"^gmod\.router_logits: x must be 3-D .*, got shape \[2, 5\]"):
        torch.ops.gmod.router_logits(*args.values())
    args = router_args(device)
    args["x"] = args["x"].to(torch.int32)
    with pytest.raises(TypeError, match=r"^gmod\.router_logits: x must have dtype in \{.*\}, got Int"):
        torch.ops.gmod.router_logits(*args.values())
    args = router_args(device)
    args["weight"] = torch.randn(8, device=other_device(device))
    with pytest.raises(RuntimeError, match=rf"^gmod\.router_logits: weight is on {other_device(device)}"):
        torch.ops.gmod.router_logits(*args.values())


def test_every_op_has_bad_input_cases():
    assert {c[0] for c in CASES} == set(BUILDERS) == set(GMOD_OPS)


@pytest.mark.parametrize("op", list(BUILDERS))
def test_good_call_does_not_mutate_inputs(device, op):
    args = BUILDERS[op](device)
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor)]
    if op == "kv_cache_append":  # mutates k_cache, v_cache, cache_len by contract; the rest must stay
        names = ["k_new", "v_new", "new_len"]
    before = snapshot(*(args[n] for n in names))
    getattr(torch.ops.gmod, op)(*args.values())
    assert_unchanged(before, [args[n] for n in names], names)


@pytest.mark.parametrize("op", list(BUILDERS))
def test_empty_batch(device, op):
    """B = 0 works for every op and returns empty outputs."""
    args = BUILDERS[op](device, B=0)
    out = getattr(torch.ops.gmod, op)(*args.values())
    outs = list(out) if isinstance(out, (tuple, list)) else ([] if out is None else [out])
    if op == "router_logits_backward":  # dweight, dnorm_weight have weight's shape: zero sums
        for t in outs[1:]:
            assert t.shape == (8,) and bool((t == 0).all())
        outs = outs[:1]
    for t in outs:
        assert t.numel() == 0 and t.shape[0] == 0
        assert t.device.type == device
    if op == "kv_cache_append":
        assert args["cache_len"].shape == (0,)
