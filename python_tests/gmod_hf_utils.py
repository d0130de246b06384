"""Helpers for the gamma-MoD model tests: tiny Hugging Face models and plain-PyTorch references.

Every model here is built from a config (no download): hidden 64, 4 heads (2 KV heads, head dim
16), 4 layers, vocab 128.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

VOCAB = 128
IMAGE_TOKEN = 100  # LLaVA image token id (inside the vocab, never drawn as text)
N_IMAGE = 16  # (32 / 8) ** 2 patches, CLS dropped


def text_config_kwargs(**over):
    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    )
    kw.update(over)
    return kw


def tiny_model(arch: str, dtype=torch.float32, seed: int = 0, **over):
    torch.manual_seed(seed)
    if arch == "llama":
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**text_config_kwargs(**over)))
    elif arch == "mistral":
        m = transformers.MistralForCausalLM(transformers.MistralConfig(**text_config_kwargs(**over)))
    elif arch == "qwen2":
        m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**text_config_kwargs(**over)))
    elif arch == "qwen3":  # q/k norms
        m = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**text_config_kwargs(head_dim=16, **over)))
    elif arch == "llava":
        vc = transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
        )
        tc = transformers.LlamaConfig(**text_config_kwargs(**over))
        cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN)
        m = transformers.LlavaForConditionalGeneration(cfg)
    else:
        raise ValueError(arch)
    return m.to(dtype)


def make_batch(arch: str, B: int = 2, S: int = 24, pad: bool = True, seed: int = 1, labels_prefix: int = 0):
    """Model kwargs for a batch; left padding of 3 tokens on the last row when ``pad``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, IMAGE_TOKEN, (B, S), generator=g)
    batch = {"input_ids": ids}
    am = torch.ones(B, S, dtype=torch.long)
    if pad:
        am[-1, :3] = 0
        ids[-1, :3] = 0
    batch["attention_mask"] = am
    if arch == "llava":
        start = 4
        ids[:, start : start + N_IMAGE] = IMAGE_TOKEN
        batch["pixel_values"] = torch.randn(B, 3, 32, 32, generator=g)
    labels = ids.clone()
    labels[am == 0] = -100
    if labels_prefix:
        labels[:, :labels_prefix] = -100
    if arch == "llava":
        labels[ids == IMAGE_TOKEN] = -100
    batch["labels"] = labels
    return batch


def valid_positions(batch):
    return batch["attention_mask"].bool()


@contextlib.contextmanager
def num_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- references
def rms_norm(x, weight, eps):
    xf = x.float()
    return weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))


def plain_router_logits(x, norm, router):
    """l1 - l0 of Linear(D, 2) on RMSNorm(x) in plain PyTorch (fp32)."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    logits = F.linear(rms_norm(x, norm.weight, eps), router.weight.float(), router.bias.float())
    return logits[..., 1] - logits[..., 0]


def reference_selection(logits, mask, ratio):
    """Plain top-k + forced: list of sorted kept positions per row, following the documented rule."""
    B, S = logits.shape
    logits = logits.detach()
    out = []
    for b in range(B):
        codes = mask[b].tolist() if mask is not None else [0] * S
        routable = [s for s in range(S) if codes[s] == 0]
        forced = [s for s in range(S) if codes[s] == 1]
        n = len(routable)
        k = n - int(math.floor(ratio * n + 1e-9))
        order = sorted(routable, key=lambda s: (-float(logits[b, s]), s))
        out.append(sorted(forced + order[:k]))
    return out


def rope(x, cos, sin):
    """x [N, H, d], cos/sin [N, d]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def plain_block(layer, xs, cos, sin):
    """Dense HF decoder math on gathered tokens xs [N, D] of one row, explicit causal mask.

    Returns (h, a, m): h = xs + Attn(LN1(xs)), a = the attention output, m = MLP(LN2(h)).
    """
    attn = layer.self_attn
    N = xs.shape[0]
    d = attn.head_dim
    hin = layer.input_layernorm(xs)
    q = attn.q_proj(hin).view(N, -1, d)
    k = attn.k_proj(hin).view(N, -1, d)
    v = attn.v_proj(hin).view(N, -1, d)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * attn.scaling
    causal = torch.ones(N, N, dtype=torch.bool, device=xs.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    probs = scores.softmax(-1)
    o = torch.einsum("hqk,khd->qhd", probs, v.float()).to(xs.dtype).reshape(N, -1)
    a = attn.o_proj(o)
    h = xs + a
    m = layer.mlp(layer.post_attention_layernorm(h))
    return h, a, m


def padded_prompt(B: int, S: int, pad=(), side: str = "left", seed: int = 0):
    """input_ids [B, S] (tokens 1..99) and attention_mask; row i gets pad[i] padding tokens (id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    for b, n in enumerate(pad):
        if n:
            if side == "left":
                am[b, :n] = 0
            else:
                am[b, S - n :] = 0
    ids[am == 0] = 0
    return ids, am


def skipping_llama(ratio=0.5, layers=(1, 2, 3), router_std=0.5, seed=0, arch="llama", model_kw=None, **kw):
    """A tiny Llama (or ``arch`` with config overrides ``model_kw``) converted at ``ratio`` on ``layers``
    (shared router), router weights redrawn at ``router_std`` so that p lies well away from 0.5 on
    both sides: decode steps keep some tokens and skip others."""
    import gmod_ext

    model = tiny_model(arch, **(model_kw or {})).eval()
    gmod_ext.convert(model, ratio=ratio, layers=list(layers), progress=False, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.gmod_router.weight.copy_(torch.randn(model.gmod_router.weight.shape, generator=g) * router_std)
        model.gmod_router.bias.zero_()
    return model


def mod_slots(cache) -> dict:
    """The compact MoD slots of a KV cache, by layer index."""
    from gmod_ext.cache import GmodLayer_cls

    return {i: layer for i, layer in enumerate(cache.layers) if isinstance(layer, GmodLayer_cls())}


def hf_model(cls_name: str, cfg_name: str, **over):
    """A tiny Hugging Face ``cls_name`` from ``cfg_name`` (text_config_kwargs + ``over``), float32, seed 0;
    the test is skipped where this transformers lacks the class."""
    cls, cfg_cls = getattr(transformers, cls_name, None), getattr(transformers, cfg_name, None)
    if cls is None or cfg_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    torch.manual_seed(0)
    cfg = cfg_cls(**text_config_kwargs(**over))
    cfg.pad_token_id = None
    return cls(cfg).float()


def lm_labels(ids, am):
    """Labels for a left-padded batch: no loss on padding, nor on what a padding position predicts
    (MoD layers never process padding, so those logits are not the dense model's)."""
    labels = ids.masked_fill(am == 0, -100)
    labels[:, 1:][am[:, :-1] == 0] = -100
    return labels


def assert_grads_equal(model, ref, rtol=1e-4, atol=1e-6):
    """Every parameter gradient of a converted ``model`` equals the dense ``ref``'s (routers excluded)."""
    grads = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if "gmod_router" not in n:
            torch.testing.assert_close(p.grad, grads[n].grad, rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def assert_cache_equals_no_cache(model, inputs: dict, max_new_tokens: int = 8, tol: float = 1e-4, **gen_kw):
    """Greedy generation with the compact cache gives the tokens and scores of the no-cache recomputation;
    returns the cached output."""
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
              return_dict_in_generate=True, output_scores=True, **gen_kw)
    cached, full = model.generate(**inputs, **kw), model.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached.sequences, full.sequences), (cached.sequences, full.sequences)
    for step, (x, y) in enumerate(zip(cached.scores, full.scores)):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=lambda m: f"step {step}: {m}")
    return cached


def vision_prompt(B: int = 2, S: int = 16, start: int = 297, image: int = 299, end: int = 296, seed: int = 7):
    """``input_ids`` [B, S] with one image of 4 tokens at positions 3..6 (a 4x4 patch grid merged 2x2, the
    Qwen-VL / GLM-4V layout) between its start and end tokens, and the pixel inputs of such a grid."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (B, S), generator=g)
    ids[:, 2], ids[:, 3:7], ids[:, 7] = start, image, end
    kw = dict(pixel_values=torch.randn(B * 16, 3 * 2 * 4 * 4, generator=g), image_grid_thw=torch.tensor([[1, 4, 4]] * B),
              mm_token_type_ids=(ids == image).long())
    return ids, kw


def assert_vlm_converts_exactly(build, skip_layers, positions_3d: bool = True):
    """``build() -> (model, input_ids, image kwargs)``: keeping every token, the converted model gives the
    dense logits on that image prompt (with ``positions_3d``, after checking that its 3-D positions change
    them); converted at ratio 0.5 on ``skip_layers``, generation from the compact cache gives the no-cache
    tokens and scores."""
    import gmod_ext

    model, ids, kw = build()
    with torch.no_grad():
        ref = model(input_ids=ids, **kw).logits
        if positions_3d:
            flat = model(input_ids=ids, **kw, position_ids=torch.arange(ids.shape[1]).expand(ids.shape[0], -1)).logits
            assert float((flat - ref).abs().max() / ref.abs().max()) > 1e-4  # the 3-D positions matter here
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", progress=False)
    with torch.no_grad():
        out = model(input_ids=ids, **kw).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5

    model, ids, kw = build()
    gmod_ext.convert(model, ratio=0.5, layers=list(skip_layers), progress=False)
    with torch.no_grad():  # p well away from 0.5 on both sides
        model.gmod_router.weight.copy_(torch.randn(model.gmod_router.weight.shape,
                                                   generator=torch.Generator().manual_seed(8)) * 0.5)
    assert_cache_equals_no_cache(model, dict(input_ids=ids, **kw))
    return model


def assert_keep_all_equals_hf(ref, model, B: int = 2, S: int = 14, pad=(0, 3), seed: int = 1):
    """``model``, a copy of the dense ``ref`` converted keeping every token without gating (aux_coef 0):
    training-mode logits on a left-padded batch and every parameter's gradient equal ``ref``'s."""
    ids, am = padded_prompt(B, S, pad=pad, seed=seed)
    labels = lm_labels(ids, am)
    ref.train(), model.train()
    lr = ref(ids, attention_mask=am, labels=labels)
    lm = model(ids, attention_mask=am, labels=labels)
    keep = am.bool()
    torch.testing.assert_close(lm.logits[keep], lr.logits[keep], rtol=1e-5, atol=1e-5)
    lr.loss.backward()
    lm.loss.backward()
    assert_grads_equal(model, ref)


def assert_keep_all_generation_equals_dense(model, ids):
    """Greedy generation (and its scores) of ``model`` converted with ratio 0, no gate and decode_threshold 0
    (every token, prompt and new, runs every MoD layer) equals the dense model's, token for token."""
    import gmod_ext

    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    kw = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, **kw)
        gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", decode_threshold=0.0, progress=False)
        out = model.generate(input_ids=ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def rel_err(a, b) -> float:
    """Largest absolute difference of ``a`` from ``b``, relative to ``b``'s largest magnitude (float64)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def padded_ids(B: int = 2, S: int = 20, seed: int = 1):
    """(token ids in [3, 100), attention mask) with the second row left-padded by 4."""
    ids = torch.randint(3, 100, (B, S), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    return ids, mask


def assert_keep_all_logits_equal_dense_float64(model, ids, mask, factor: float = 6.0) -> list:
    """Convert ``model`` at ratio 0 with no gate (every token kept) and check its float32 logits against the dense
    model's in float64: within ``factor`` times the dense model's own float32 error (plus 1e-6). Returns the
    indices of the layers that became MoD layers."""
    import copy

    import gmod_ext
    from gmod_ext._hf import find_decoder

    keep = mask.bool()
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(ids, attention_mask=mask).logits[keep]
        ref32 = model(ids, attention_mask=mask).logits[keep]
        gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", progress=False)
        out = model(ids, attention_mask=mask).logits[keep]
    base = rel_err(ref32, ref64)
    assert 0 < base < 1e-4
    assert rel_err(out, ref64) <= factor * base + 1e-6, (rel_err(out, ref64), base)
    return [i for i, layer in enumerate(find_decoder(model).layers) if hasattr(layer, "gmod_ratio")]


def one_skipping_layer(model, which: int):
    """``(dense, layer)``: a float64 copy (eager attention) of ``model``'s decoder layer ``which`` as it was, and
    that layer converted at ratio 0.5 with no gate and a random N(0, 1) shared router, so that it skips tokens."""
    import copy

    import gmod_ext
    from gmod_ext._hf import find_decoder

    dense = copy.deepcopy(find_decoder(model).layers[which]).double()
    dense.config._attn_implementation = "eager"
    gmod_ext.convert(model, ratio=0.5, layers=[which], gate="none", progress=False)
    with torch.no_grad():
        model.gmod_router.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(4))
    return dense, find_decoder(model).layers[which]


def decode_step_io(model, layer):
    """(input, output) of ``layer`` in a one-token decode step of ``model`` after a 9-token prefill (no grad)."""
    seen = []
    handle = layer.register_forward_hook(lambda _m, args, out: seen.append((args[0].clone(), out.clone())))
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            out = model(ids, use_cache=True)
            model(ids[:, :1], cache=out.past_key_values, use_cache=True)
    finally:
        handle.remove()
    return seen[-1]
