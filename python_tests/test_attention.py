"""gmod.attention (causal, bottom-right aligned, per-row lengths, GQA) and its backward.

Tolerances follow the flash-attention tests: the kernel's max error against a float64 reference
(explicit mask + softmax) must be at most twice the error of the same math done in the input
dtype (plain PyTorch), plus a few roundings of the output dtype."""
import math

import pytest
import torch
from torch.library import opcheck

from conftest import DTYPES, assert_unchanged, poison_heap, skip_unsupported, snapshot
from gmod_ext import ops
from references import acc_dtype, assert_close_lowp, attention_mask_ref, attention_ref

GMOD_OPS = ("attention", "attention_backward")

# name: (B, Cq, Ck, q_len, k_len)
LAYOUTS = {
    "train_full": (2, 12, 12, [12, 12], [12, 12]),
    "train_ragged": (3, 12, 12, [12, 7, 0], [12, 7, 0]),  # q_len == k_len, one empty row
    "chunked_prefill": (3, 5, 17, [5, 3, 0], [17, 9, 4]),  # q_len < k_len, a q_len 0 row
    "decode": (4, 1, 20, [1, 1, 0, 1], [20, 1, 7, 13]),  # Cq = 1
    "q_longer_than_k": (2, 8, 8, [8, 6], [3, 6]),  # early queries see no key (lse = -inf)
}
GQA = [(2, 2), (4, 2), (8, 2)]  # (Hq, Hk): ratios 1, 2, 4


def make_qkv(B, Cq, Ck, Hq, Hk, d, dtype, device, requires_grad=False):
    def t(*shape):
        x = torch.randn(*shape).to(dtype).to(device)
        return x.requires_grad_(requires_grad)

    return t(B, Cq, Hq, d), t(B, Ck, Hk, d), t(B, Ck, Hk, d)


def lens(v, device):
    return torch.tensor(v, dtype=torch.int32, device=device)


def _cpu(*ts):
    return [t.detach().cpu() for t in ts]


def run_case(device, layout, Hq, Hk, d, dtype, scale=None):
    B, Cq, Ck, ql, kl = LAYOUTS[layout]
    q, k, v = make_qkv(B, Cq, Ck, Hq, Hk, d, dtype, device, requires_grad=True)
    q_len, k_len = lens(ql, device), lens(kl, device)
    before = snapshot(q, k, v, q_len, k_len)
    poison_heap(device, B * Cq * Hq * d * 4)
    o, lse = ops.attention(q, k, v, q_len, k_len, scale)
    assert_unchanged(before, (q, k, v, q_len, k_len), ["q", "k", "v", "q_len", "k_len"])
    assert o.shape == q.shape and o.dtype == dtype
    assert lse.shape == (B, Hq, Cq) and lse.dtype == acc_dtype(dtype)
    assert not o.requires_grad or o.grad_fn is not None

    qc, kc, vc = _cpu(q, k, v)
    ref_o, ref_lse = attention_ref(qc, kc, vc, q_len.cpu(), k_len.cpu(), scale)
    pt_o, _ = attention_ref(qc, kc, vc, q_len.cpu(), k_len.cpu(), scale, compute_dtype=None)
    _, pt_lse = attention_ref(qc, kc, vc, q_len.cpu(), k_len.cpu(), scale, compute_dtype=acc_dtype(dtype))
    assert_close_lowp(o, ref_o, pt_o, "o")
    # lse is computed in the accumulation dtype: compare with the same math in that dtype
    assert_close_lowp(lse, ref_lse, pt_lse, "lse")

    # exact structure: queries that see no key (rows past q_len included) give o = 0, lse = -inf
    no_key = ~attention_mask_ref(Cq, Ck, q_len.cpu(), k_len.cpu()).any(-1)  # [B, Cq]
    assert bool((o.detach().cpu()[no_key] == 0).all()), "rows without keys must be exactly zero"
    assert bool((lse.cpu().transpose(1, 2)[no_key] == -math.inf).all()), "lse must be -inf without keys"
    assert bool(torch.isfinite(lse.cpu().transpose(1, 2)[~no_key]).all())

    # backward
    g = torch.randn(o.shape).to(dtype).to(device)
    poison_heap(device, B * Ck * Hk * d * 4)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), g)
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    grads = {}
    for mode in ("ref", "pt"):
        leaves = [t.requires_grad_() for t in (qc.clone(), kc.clone(), vc.clone())]
        cd = torch.float64 if mode == "ref" else None
        out, _ = attention_ref(*leaves, q_len.cpu(), k_len.cpu(), scale, compute_dtype=cd)
        grads[mode] = torch.autograd.grad(out, leaves, g.cpu().to(out.dtype), allow_unused=True,
                                          materialize_grads=True)
    for name, got, ref, pt in zip(["dq", "dk", "dv"], (dq, dk, dv), grads["ref"], grads["pt"]):
        assert_close_lowp(got, ref, pt, name)
    # exact zeros: queries without keys get dq = 0; keys no query sees get dk = dv = 0
    assert bool((dq.cpu()[no_key] == 0).all())
    allowed = attention_mask_ref(Cq, Ck, q_len.cpu(), k_len.cpu())
    unseen = ~allowed.any(1)  # [B, Ck]
    assert bool((dk.cpu()[unseen] == 0).all()) and bool((dv.cpu()[unseen] == 0).all())


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"Hq{h[0]}-Hk{h[1]}")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_values(device, layout, heads, d, dtype):
    skip_unsupported(device, dtype)
    run_case(device, layout, heads[0], heads[1], d, dtype)


@pytest.mark.parametrize("layout", ["chunked_prefill", "decode"])
@pytest.mark.parametrize("d", [33, 127, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_head_dim(device, layout, d, dtype):
    if device != "cpu":
        pytest.skip("the contract guarantees d in {64, 128} on every device; other d are checked on CPU")
    run_case(device, layout, 4, 2, d, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_custom_scale(device, dtype):
    skip_unsupported(device, dtype)
    run_case(device, "chunked_prefill", 4, 1, 64, dtype, scale=0.37)


@pytest.mark.parametrize(
    "case",
    [
        # B, Cq, Ck, Hq, Hk, q_len, k_len
        (2, 4, 6, 4, 2, [4, 0], [6, 3]),  # GQA 2, q_len < k_len, a q_len-0 row
        (2, 4, 4, 2, 2, [4, 3], [4, 3]),  # training
        (2, 4, 6, 4, 1, [4, 1], [2, 6]),  # GQA 4, q_len > k_len (queries without keys) and decode-like
    ],
)
def test_gradcheck(case):
    B, Cq, Ck, Hq, Hk, ql, kl = case
    q, k, v = make_qkv(B, Cq, Ck, Hq, Hk, 3, torch.float64, "cpu", requires_grad=True)
    q_len, k_len = lens(ql, "cpu"), lens(kl, "cpu")
    torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, q_len, k_len)[0], (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["train_ragged", "chunked_prefill"])
def test_opcheck(device, dtype, layout):
    skip_unsupported(device, dtype)
    B, Cq, Ck, ql, kl = LAYOUTS[layout]
    q, k, v = make_qkv(B, Cq, Ck, 4, 2, 64, dtype, device, requires_grad=True)
    q_len, k_len = lens(ql, device), lens(kl, device)
    scale = 1 / 8
    opcheck(torch.ops.gmod.attention.default, (q, k, v, q_len, k_len, scale))
    o, lse = torch.ops.gmod.attention(q.detach(), k.detach(), v.detach(), q_len, k_len, scale)
    g = torch.randn_like(o)
    opcheck(torch.ops.gmod.attention_backward.default,
            (g, q.detach(), k.detach(), v.detach(), o, lse, q_len, k_len, scale))


def test_lse_has_no_gradient(device):
    q, k, v = make_qkv(1, 3, 3, 2, 2, 64, torch.float32, device, requires_grad=True)
    o, lse = ops.attention(q, k, v, lens([3], device), lens([3], device))
    assert not lse.requires_grad


def test_empty(device):
    # (B, Cq, Ck, q_len, k_len)
    for B, Cq, Ck, ql, kl in [(0, 4, 4, [], []), (2, 0, 4, [0, 0], [3, 4]), (2, 3, 0, [3, 2], [0, 0]),
                              (2, 3, 5, [0, 0], [5, 0])]:
        q, k, v = make_qkv(B, Cq, Ck, 4, 2, 64, torch.float32, device, requires_grad=True)
        o, lse = ops.attention(q, k, v, lens(ql, device), lens(kl, device))
        assert o.shape == q.shape and lse.shape == (B, 4, Cq)
        assert bool((o == 0).all()) and bool((lse == -math.inf).all())
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
        assert bool((dq == 0).all()) and bool((dk == 0).all()) and bool((dv == 0).all())


def test_gpu_test_files_run_on_cpu_kernels():
    """test_attention_cuda.py and test_cuda_build.py with GMOD_TEST_DEVICE_UNDER_TEST=cpu: the GPU tests'
    own logic (references, tolerances, shapes, flag handling) against the CPU kernels, so that a broken
    GPU test shows up here and not in a GPU session's few minutes. Skipped where a GPU runs them."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the GPU test files run on it")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, GMOD_TEST_DEVICE_UNDER_TEST="cpu")
    for name, least in (("test_attention_cuda.py", 300), ("test_cuda_build.py", 600)):
        res = subprocess.run([sys.executable, "-m", "pytest", os.path.join(here, name), "-q", "-x",
                              "-p", "no:cacheprovider"], cwd=here, env=env, capture_output=True, text=True,
                             timeout=1500)
        assert res.returncode == 0, (name, res.stdout[-3000:] + res.stderr[-1000:])
        summary = res.stdout.strip().splitlines()[-1]
        # hundreds of cases run; only those of CUDA-only behaviour are skipped
        passed = int(summary.split(" passed")[0].split()[-1])
        assert passed >= least and " failed" not in summary, (name, summary)


def test_python_knows_the_cuda_head_dims():
    """gmod_ext.ops.CUDA_HEAD_DIMS (where MoD layers fall back to SDPA for other head dims, such as MLA's 192)
    lists the head dims the CUDA kernels are instantiated for."""
    import pathlib
    import re

    from gmod_ext import ops

    header = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "include" / "gmod" / "attention_params.h"
    listed = re.search(r'#define GMOD_ATTN_HEADDIMS_STR "\{([0-9, ]+)\}"', header.read_text()).group(1)
    assert tuple(int(x) for x in listed.split(",")) == ops.CUDA_HEAD_DIMS
    assert ops.attention_supports(torch.randn(1, 1, 1, 192))  # the CPU kernels take any head dim
