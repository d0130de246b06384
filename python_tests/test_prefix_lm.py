"""PaliGemma's prefix-LM attention: ``token_type_ids`` 0 marks the prefix (the image and the prompt text),
whose tokens see each other in both directions; 1 marks the suffix (the answer), which attends causally.
MoD layers reproduce that (``RoutingInfo.blocks`` from :func:`gmod_ext.router.prefix_blocks`, and on
PaliGemma-2's sliding layers a window that does not limit the prefix, as its mask composes them):

* the op: ``position_masked_attention(window_in_blocks=False)`` against the float64 loop reference;
* keeping every token, a converted tiny PaliGemma (Gemma behind it) and PaliGemma-2 (Gemma-2: sliding and
  full layers, a window shorter than the prefix) give Hugging Face's logits, loss and gradients on a
  left-padded batch of image + prefix + suffix rows, and its greedy generation from an image prompt gives
  Hugging Face's tokens and scores;
* skipping image tokens (the default for a model with an image token): the cached generation equals the
  recompute without a cache;
* a first call of several tokens without token_type_ids (where Hugging Face's own result depends on the
  attention implementation and the padding) and a prefix in a later cached step are refused;
* the converter's check refuses a prefix-LM whose rule it is not told.
"""
from __future__ import annotations

import pytest
import torch

from gmod_hf_utils import assert_grads_equal, num_threads, text_config_kwargs, transformers
from references import position_attention_ref

import gmod_ext
from gmod_ext.convert import is_converted
from gmod_ext.masked_attention import position_masked_attention
from gmod_ext.router import prefix_blocks

IMAGE, BOS, N_IMAGE = 299, 2, 4  # (32 / 16) ** 2 image tokens
GMOD_OPS = ()  # the op test: plain torch, no gmod kernel


@pytest.fixture(autouse=True)
def _one_thread():
    with num_threads(1):
        yield


def _paligemma(text="gemma", window=None, seed=0):
    T = transformers
    tc = dict(text_config_kwargs(vocab_size=300, max_position_embeddings=512), num_hidden_layers=2, head_dim=16,
              model_type=text)
    if text == "gemma2":  # layers alternate sliding / full
        tc["sliding_window"] = window
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
               patch_size=16)
    torch.manual_seed(seed)
    try:
        cfg = T.PaliGemmaConfig(text_config=tc, vision_config=vis, image_token_id=IMAGE, projection_dim=64)
        return T.PaliGemmaForConditionalGeneration(cfg).float().eval()
    except (AttributeError, TypeError, ValueError) as err:
        pytest.skip(f"cannot build a tiny PaliGemma here: {err}")


def _rows(prefix=(5, 3), suffix=(4, 6), pad_left=True, seed=3):
    """A batch as PaliGemma's processor lays it out: the image tokens, BOS and the prompt (the prefix,
    token type 0), then the answer (the suffix, 1); shorter rows padded (type 0, masked). Returns
    input_ids, attention_mask, token_type_ids, labels (-100 on the prefix and padding), pixel_values."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for p, s in zip(prefix, suffix):
        ids = torch.cat([torch.full((N_IMAGE,), IMAGE), torch.tensor([BOS]), torch.randint(3, 250, (p + s,), generator=g)])
        types = torch.cat([torch.zeros(N_IMAGE + 1 + p, dtype=torch.long), torch.ones(s, dtype=torch.long)])
        rows.append((ids, types))
    S = max(len(r[0]) for r in rows)
    ids, mask, types = (torch.zeros(len(rows), S, dtype=torch.long) for _ in range(3))
    for b, (i, t) in enumerate(rows):
        sl = slice(S - len(i), S) if pad_left else slice(0, len(i))
        ids[b, sl], mask[b, sl], types[b, sl] = i, 1, t
    labels = ids.masked_fill((types == 0) | (mask == 0), -100)
    return ids, mask, types, labels, torch.randn(len(rows), 3, 32, 32, generator=g)


# ----------------------------------------------------------------------------- the op and the ids
def test_prefix_blocks_put_the_prefix_in_one_block():
    tt = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0, 1, 0, 1, 1]])
    assert prefix_blocks(tt).tolist() == [[0, 0, 0, -1, -1], [0, 0, 0, 0, 0], [0, -1, 0, -1, -1]]
    assert prefix_blocks(torch.ones(2, 4, dtype=torch.long)) is None


def test_op_with_a_window_outside_blocks_matches_float64_loop(device):
    g = torch.Generator().manual_seed(4)
    B, C, Hq, Hk, d, W = 2, 12, 4, 2, 16, 3
    pos = torch.stack([torch.randperm(20, generator=g)[:C].sort().values for _ in range(B)]).to(torch.int32)
    k_len = torch.tensor([12, 9], dtype=torch.int32)
    pos[1, 9:] = -1
    blk = torch.full((B, C), -1, dtype=torch.long)
    blk[0, :7], blk[1, :5] = 0, 0  # a prefix spanning more than the window
    q, k, v = (torch.randn(B, C, h, d, generator=g).to(device).requires_grad_() for h in (Hq, Hk, Hk))
    out = position_masked_attention(q, k, v, pos.to(device), pos.to(device), k_len.to(device), 0.3, window=W,
                                    q_block=blk.to(device), k_block=blk.to(device), window_in_blocks=False)
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref, visible = position_attention_ref(q64, k64, v64, pos, pos, k_len, 0.3, W, q_block=blk, k_block=blk,
                                          window_in_blocks=False)
    tol = dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=1e-3, atol=1e-3)  # (TF32 matmuls)
    torch.testing.assert_close(out.double().cpu()[visible], ref[visible], **tol)
    w = torch.randn(ref.shape, dtype=torch.float64, generator=g) * visible[..., None, None]
    for a, b in zip(torch.autograd.grad((out.double().cpu() * w).sum(), (q, k, v)),
                    torch.autograd.grad((ref * w).sum(), (q64, k64, v64))):
        torch.testing.assert_close(a.double().cpu(), b, **tol)
    # the composition matters on this input (Gemma-3's keeps the window inside blocks)
    inside = position_masked_attention(q, k, v, pos.to(device), pos.to(device), k_len.to(device), 0.3, window=W,
                                       q_block=blk.to(device), k_block=blk.to(device))
    assert float((inside - out).detach().abs().max()) > 1e-3


# ----------------------------------------------------------------------------- keep-all == Hugging Face
@pytest.mark.parametrize("text,window", [("gemma", None), ("gemma2", 3)])
def test_keep_all_prefix_lm_batches_equal_hf(text, window):
    ref, model = _paligemma(text, window), _paligemma(text, window)
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", aux_coef=0.0, progress=False)
    ids, mask, types, labels, pixels = _rows()
    with torch.no_grad():  # the prefix's attention matters here (else this test could not fail)
        causal_only = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                          token_type_ids=torch.ones_like(types)).logits
    ref.train(), model.train()
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels, pixel_values=pixels)
    lr, lm = ref(**inputs), model(**inputs)
    assert model.gmod_state.current.blocks is not None and not model.gmod_state.current.window_in_blocks
    live = mask.bool()
    assert float((causal_only - lr.logits.detach())[live].abs().max()) > 1e-3
    torch.testing.assert_close(lm.logits[live], lr.logits[live], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lm.loss, lr.loss, rtol=1e-5, atol=1e-6)
    lr.loss.backward()
    lm.loss.backward()
    assert_grads_equal(model, ref)


@pytest.mark.parametrize("text,window", [("gemma", None), ("gemma2", 3)])
def test_keep_all_greedy_from_an_image_prompt_equals_hf(text, window):
    ref, model = _paligemma(text, window), _paligemma(text, window)
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", decode_threshold=0.0, progress=False)
    ids, mask, _, _, pixels = _rows(prefix=(6, 3), suffix=(0, 0))  # prompts: all prefix
    types = torch.zeros_like(ids)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, pixel_values=pixels)
    out_ref = ref.generate(**inputs, **gen)
    out = model.generate(**inputs, **gen)
    assert torch.equal(out.sequences, out_ref.sequences)
    for step, (a, b) in enumerate(zip(out.scores, out_ref.scores)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")


# ----------------------------------------------------------------------------- skipping
def test_skipping_image_tokens_cache_equals_no_cache():
    model = _paligemma("gemma2", 3)
    gmod_ext.convert(model, ratio=0.5, layers="all", progress=False)
    with torch.no_grad():
        model.gmod_router.weight.copy_(torch.randn(model.gmod_router.weight.shape,
                                                   generator=torch.Generator().manual_seed(0)) * 0.5)
    ids, mask, _, _, pixels = _rows(prefix=(6, 3), suffix=(0, 0))
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), pixel_values=pixels)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    a = model.generate(**inputs, **gen)
    b = model.generate(**inputs, use_cache=False, **gen)
    assert torch.equal(a.sequences, b.sequences)
    for step, (x, y) in enumerate(zip(a.scores, b.scores)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")
    with torch.no_grad():  # the prompt: image tokens were skipped, text kept
        model(**inputs, use_cache=False)
    idx, count = model.gmod_state.current.selection[0]
    kept = {int(i) for i in idx[0, : int(count[0])]}
    images = {int(i) for i in (ids[0] == IMAGE).nonzero().flatten()}
    text = {int(i) for i in (mask[0].bool() & (ids[0] != IMAGE)).nonzero().flatten()}
    assert images - kept and text <= kept


# ----------------------------------------------------------------------------- refusals
def test_a_call_without_token_types_is_refused():
    ref, model = _paligemma(), _paligemma()
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", decode_threshold=0.0, progress=False)
    ids, mask, types, _, pixels = _rows(suffix=(0, 0))
    with torch.no_grad(), pytest.raises(ValueError, match="prefix-LM .*token_type_ids"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    with torch.no_grad():  # one token, or steps after the prompt on a cache: causal, as Hugging Face's
        model(input_ids=ids[:, -1:])
        more = torch.randint(3, 250, (2, 3), generator=torch.Generator().manual_seed(1))
        outs = []
        for m in (ref, model):
            cache = m.gmod_new_cache() if m is model else None
            out = m(input_ids=ids, attention_mask=mask, token_type_ids=types, pixel_values=pixels, use_cache=True,
                    past_key_values=cache)
            outs.append(m(input_ids=more, attention_mask=torch.cat([mask, torch.ones_like(more)], 1),
                          past_key_values=out.past_key_values if cache is None else cache, use_cache=True).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_a_prefix_in_a_later_cached_step_is_refused():
    model = _paligemma()
    gmod_ext.convert(model, ratio=0.5, layers="all", progress=False)
    ids, mask, types, _, pixels = _rows(suffix=(0, 0))
    cache = model.gmod_new_cache()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, token_type_ids=types, pixel_values=pixels, past_key_values=cache,
              use_cache=True)
        more = torch.randint(3, 250, (2, 3), generator=torch.Generator().manual_seed(1))
        with pytest.raises(NotImplementedError, match="in the prefill only"):
            model(input_ids=more, attention_mask=torch.cat([mask, torch.ones_like(more)], 1),
                  token_type_ids=torch.zeros_like(more), past_key_values=cache, use_cache=True)


def test_a_prefix_lm_without_its_rule_is_refused(monkeypatch):
    """The converter's check is what stands between a prefix-LM and a wrong conversion: told Gemma-3's rule
    instead (its text model alone then attends both ways), it refuses PaliGemma with the reason."""
    import gmod_ext._hf as hf

    monkeypatch.setattr(hf, "PREFIX_LM_MODEL_TYPES", ())
    model = _paligemma()
    with pytest.raises(TypeError, match=r"see later tokens .*MoD layers attend causally"):
        gmod_ext.convert(model, ratio=0.5, layers="all", progress=False)
    assert not is_converted(model)
