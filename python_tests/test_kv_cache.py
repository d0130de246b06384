"""gmod.kv_cache_append: in-place append of compact rows to a MoD layer's KV cache."""
import pytest
import torch
from torch.library import opcheck

from conftest import DTYPES, assert_unchanged, poison_, skip_unsupported, snapshot
from gmod_ext import ops
from references import kv_cache_append_ref

GMOD_OPS = ("kv_cache_append",)


def make_cache(B, cap, Hk, d, cache_len, dtype, device):
    """A cache whose used part holds random data and whose unused part is poisoned with NaN."""
    kc = torch.randn(B, cap, Hk, d).to(dtype)
    vc = torch.randn(B, cap, Hk, d).to(dtype)
    for b, n in enumerate(cache_len):
        poison_(kc[b, n:])
        poison_(vc[b, n:])
    return kc.to(device), vc.to(device), torch.tensor(cache_len, dtype=torch.int32, device=device)


def check_append(kc, vc, cl, kn, vn, nl):
    ref_k, ref_v, ref_l = kv_cache_append_ref(*(t.cpu() for t in (kc, vc, cl, kn, vn, nl)))
    before = snapshot(kn, vn, nl)
    ops.kv_cache_append(kc, vc, cl, kn, vn, nl)
    assert_unchanged(before, (kn, vn, nl), ["k_new", "v_new", "new_len"])
    assert torch.equal(cl.cpu(), ref_l), f"cache_len {cl.tolist()} != {ref_l.tolist()}"
    # bitwise, NaN-safe: the appended rows are exact copies, the rest (used part and the poisoned
    # unused part) is untouched
    for got, ref, name in [(kc, ref_k, "k_cache"), (vc, ref_v, "v_cache")]:
        got = got.cpu()
        same = (got == ref) | (got.isnan() & ref.isnan())
        assert bool(same.all()), f"{name} differs from the reference at {same.logical_not().nonzero()[:4].tolist()}"
    for b in range(kc.shape[0]):
        assert bool(kc[b, int(cl[b]):].isnan().all()), "the unused part of the cache was written"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hk,d", [(2, 64), (1, 33), (4, 128)])
@pytest.mark.parametrize(
    "cache_len,new_len,T",
    [
        ([0, 3, 9], [4, 1, 1], 4),  # ragged
        ([5, 0, 10], [5, 0, 0], 5),  # fills a row exactly to capacity; a full row appends nothing
        ([2, 7, 1], [1, 1, 0], 1),  # decode: T = 1
        ([0, 0, 0], [0, 0, 0], 3),  # nothing
        ([4, 4, 4], [0, 0, 0], 0),  # T = 0
    ],
)
def test_append_values(device, dtype, Hk, d, cache_len, new_len, T):
    skip_unsupported(device, dtype)
    B, cap = 3, 10
    kc, vc, cl = make_cache(B, cap, Hk, d, cache_len, dtype, device)
    kn = torch.randn(B, T, Hk, d).to(dtype).to(device)
    vn = torch.randn(B, T, Hk, d).to(dtype).to(device)
    check_append(kc, vc, cl, kn, vn, torch.tensor(new_len, dtype=torch.int32, device=device))


def test_successive_steps(device):
    """Prefill then several decode steps, some rows skipping (new_len 0), as a MoD layer does."""
    B, cap, Hk, d = 3, 16, 2, 64
    kc, vc, cl = make_cache(B, cap, Hk, d, [0, 0, 0], torch.float16, device)
    kn = torch.randn(B, 6, Hk, d, dtype=torch.float16, device=device)
    check_append(kc, vc, cl, kn, torch.randn_like(kn), torch.tensor([6, 2, 0], dtype=torch.int32, device=device))
    for step in range(5):
        kn = torch.randn(B, 1, Hk, d, dtype=torch.float16, device=device)
        nl = torch.randint(0, 2, (B,), dtype=torch.int32, device=device)
        check_append(kc, vc, cl, kn, torch.randn_like(kn), nl)


def test_overflow_leaves_cache_untouched(device):
    B, cap, Hk, d = 2, 6, 2, 8
    kc, vc, cl = make_cache(B, cap, Hk, d, [1, 4], torch.float32, device)
    before = snapshot(kc, vc, cl)
    kn = torch.randn(B, 3, Hk, d, device=device)
    # row 0 fits, row 1 overflows (4 + 3 > 6): nothing may be written, not even row 0
    with pytest.raises(ValueError, match=r"kv_cache_append.*overflow"):
        ops.kv_cache_append(kc, vc, cl, kn, torch.randn_like(kn), torch.tensor([2, 3], dtype=torch.int32,
                                                                               device=device))
    assert_unchanged(before, (kc, vc, cl), ["k_cache", "v_cache", "cache_len"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    B, cap, Hk, d = 3, 12, 2, 16
    kc, vc, cl = make_cache(B, cap, Hk, d, [0, 5, 9], dtype, device)
    kn = torch.randn(B, 3, Hk, d).to(dtype).to(device)
    vn = torch.randn(B, 3, Hk, d).to(dtype).to(device)
    nl = torch.tensor([3, 2, 1], dtype=torch.int32, device=device)
    opcheck(torch.ops.gmod.kv_cache_append.default, (kc, vc, cl, kn, vn, nl))


def test_empty_batch(device):
    kc, vc, cl = make_cache(0, 4, 2, 8, [], torch.float32, device)
    kn = torch.randn(0, 2, 2, 8, device=device)
    ops.kv_cache_append(kc, vc, cl, kn, kn.clone(), torch.zeros(0, dtype=torch.int32, device=device))
    assert cl.shape == (0,)
