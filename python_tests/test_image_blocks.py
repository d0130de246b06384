"""Gemma-3's multimodal model: the tokens of one image (a run of ``token_type_ids == 1``) attend to each
other in both directions. MoD layers reproduce that (``RoutingInfo.blocks``, the position-masked
attention's block ids):

* the op: ``position_masked_attention`` with block ids against the float64 loop reference;
* keeping every token, a converted tiny Gemma-3 (sliding and full layers, with a window shorter and
  longer than an image) gives Hugging Face's logits and gradients on prompts with images, and its
  greedy generation from an image prompt gives Hugging Face's tokens and scores;
* skipping image tokens (the default for a model with an image token): the cached generation equals
  the recompute without a cache;
* a step on a KV cache that carries image tokens after the first is refused with the reason.
"""
from __future__ import annotations

import pytest
import torch

from gmod_hf_utils import num_threads, text_config_kwargs, transformers
from references import position_attention_ref

import gmod_ext
from gmod_ext.masked_attention import position_masked_attention
from gmod_ext.router import image_blocks

IMAGE, BOI, EOI = 299, 297, 298


@pytest.fixture(autouse=True)
def _one_thread():
    with num_threads(1):
        yield


def _gemma3_vlm(window=None):
    T = transformers
    tc = dict(text_config_kwargs(vocab_size=300, max_position_embeddings=512), num_hidden_layers=2, head_dim=16,
              layer_types=["sliding_attention", "full_attention"])
    if window is not None:
        tc["sliding_window"] = window
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
               patch_size=8)
    torch.manual_seed(0)
    try:
        cfg = T.Gemma3Config(text_config=tc, vision_config=vis, mm_tokens_per_image=4, image_token_id=IMAGE,
                             boi_token_id=BOI, eoi_token_id=EOI)
        return T.Gemma3ForConditionalGeneration(cfg).float().eval()
    except (AttributeError, TypeError, ValueError) as err:
        pytest.skip(f"cannot build a tiny Gemma-3 multimodal model here: {err}")


def _image_prompt(B=2, S=18, starts=((3, 10), (6,)), seed=3):
    """input_ids with 4-token images (begin / end markers around them) at the given starts per row, plus
    pixel_values and token_type_ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (B, S), generator=g)
    n_images = 0
    for b in range(B):
        for s in starts[b % len(starts)]:
            ids[b, s - 1], ids[b, s : s + 4], ids[b, s + 4] = BOI, IMAGE, EOI
            n_images += 1
    return ids, dict(pixel_values=torch.randn(n_images, 3, 32, 32, generator=g), token_type_ids=(ids == IMAGE).long())


# ----------------------------------------------------------------------------- the op and the ids
def test_image_blocks_number_each_run_of_image_tokens():
    tt = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0, 1]])
    assert image_blocks(tt).tolist() == [[-1, 0, 0, -1, -1, 1, 1, 1], [0, 0, -1, -1, -1, -1, -1, 1]]
    assert image_blocks(torch.zeros(2, 8, dtype=torch.long)) is None
    find = getattr(__import__("transformers.models.gemma3.modeling_gemma3", fromlist=["x"]),
                   "get_block_sequence_ids_for_mask", None)
    if find is not None:  # the same ids as transformers' own
        assert torch.equal(image_blocks(tt), find(tt))


@pytest.mark.parametrize("window", [None, 2])
def test_op_with_block_ids_matches_float64_loop(window):
    g = torch.Generator().manual_seed(4)
    B, C, Hq, Hk, d = 2, 12, 4, 2, 16
    pos = torch.stack([torch.randperm(20, generator=g)[:C].sort().values for _ in range(B)]).to(torch.int32)
    k_len = torch.tensor([12, 9], dtype=torch.int32)
    pos[1, 9:] = -1
    blk = torch.full((B, C), -1, dtype=torch.long)
    blk[0, 2:6], blk[0, 8:11], blk[1, 0:3], blk[1, 5:9] = 0, 1, 0, 1
    q, k, v = (torch.randn(B, C, h, d, generator=g).requires_grad_() for h in (Hq, Hk, Hk))
    out = position_masked_attention(q, k, v, pos, pos, k_len, 0.3, window=window, q_block=blk, k_block=blk)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, visible = position_attention_ref(q64, k64, v64, pos, pos, k_len, 0.3, window, q_block=blk, k_block=blk)
    torch.testing.assert_close(out.double()[visible], ref[visible], rtol=1e-5, atol=1e-6)
    w = torch.randn(ref.shape, dtype=torch.float64, generator=g) * visible[..., None, None]
    for a, b in zip(torch.autograd.grad((out.double() * w).sum(), (q, k, v)),
                    torch.autograd.grad((ref * w).sum(), (q64, k64, v64))):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="both"):
        position_masked_attention(q, k, v, pos, pos, k_len, 0.3, q_block=blk)


# ----------------------------------------------------------------------------- keep-all == Hugging Face
@pytest.mark.parametrize("window", [None, 3])
def test_keep_all_image_prompts_equal_hf(window):
    ref, model = _gemma3_vlm(window), _gemma3_vlm(window)
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", aux_coef=0.0, progress=False)
    ids, image = _image_prompt()
    with torch.no_grad():  # the image attention matters here (else this test could not fail)
        causal_only = ref(input_ids=ids, pixel_values=image["pixel_values"],
                          token_type_ids=torch.zeros_like(ids)).logits
    labels = ids.masked_fill(ids == IMAGE, -100)
    ref.train(), model.train()
    lr = ref(input_ids=ids, labels=labels, **image)
    lm = model(input_ids=ids, labels=labels, **image)
    assert model.gmod_state.current.blocks is not None
    assert float((causal_only - lr.logits.detach()).abs().max()) > 1e-3
    torch.testing.assert_close(lm.logits, lr.logits, rtol=1e-5, atol=1e-5)
    lr.loss.backward()
    lm.loss.backward()
    grads = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if "gmod_router" not in n and grads[n].grad is not None:
            torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_keep_all_greedy_from_an_image_prompt_equals_hf():
    ref, model = _gemma3_vlm(3), _gemma3_vlm(3)
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", decode_threshold=0.0, progress=False)
    ids, image = _image_prompt()
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    out_ref = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **image, **gen)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **image, **gen)
    assert torch.equal(out.sequences, out_ref.sequences)
    for step, (a, b) in enumerate(zip(out.scores, out_ref.scores)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")


# ----------------------------------------------------------------------------- skipping
def test_skipping_image_tokens_cache_equals_no_cache():
    model = _gemma3_vlm(3)
    gmod_ext.convert(model, ratio=0.5, layers="all", progress=False)
    with torch.no_grad():
        model.gmod_router.weight.copy_(torch.randn(model.gmod_router.weight.shape,
                                                   generator=torch.Generator().manual_seed(0)) * 0.5)
    ids, image = _image_prompt()
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    a = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **image, **gen)
    b = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **image, **gen)
    assert torch.equal(a.sequences, b.sequences)
    for step, (x, y) in enumerate(zip(a.scores, b.scores)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")
    with torch.no_grad():  # the prompt: image tokens were skipped, text kept
        model(input_ids=ids, **image, use_cache=False)
    idx, count = model.gmod_state.current.selection[0]
    kept = {int(i) for i in idx[0, : int(count[0])]}
    images = {int(i) for i in (ids[0] == IMAGE).nonzero().flatten()}
    assert images - kept and (set(range(ids.shape[1])) - images) <= kept


def test_image_tokens_after_the_first_cached_step_are_refused():
    model = _gemma3_vlm()
    gmod_ext.convert(model, ratio=0.5, layers="all", progress=False)
    ids, image = _image_prompt(B=1, starts=((3,),))
    cache = model.gmod_new_cache()
    with torch.no_grad():
        model(input_ids=ids[:, :2], past_key_values=cache, use_cache=True)
        with pytest.raises(NotImplementedError, match="in the prefill only"):
            model(input_ids=ids[:, 2:], token_type_ids=image["token_type_ids"][:, 2:],
                  pixel_values=image["pixel_values"], past_key_values=cache, use_cache=True)
