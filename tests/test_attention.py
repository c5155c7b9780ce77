"""sparse_prune::attention (csrc/cpu/attention_kernel.h) and sp.set_attention.

Against softmax(scale·q·kᵀ)·v in float64 on odd shapes, every ISA the CPU has (forced with
SPARSE_PRUNE_CPU_ISA; "portable" is torch's SDPA in the kernel's layout), 1 and 2 threads (bitwise equal), strided operands, non-finite inputs (the
NaN pattern of the float64 reference), the other dtypes' SDPA path, bad input, opcheck,
torch.compile and torch.export; then transformers models through ``set_attention``.
"""

import math

import pytest
import torch
import torch.nn.functional as Fn

import sparse_prune as sp
from sparse_prune import attention as attn
from sparse_prune import ops

needs_kernels = pytest.mark.skipif(not ops.has_cpu_extension(),
                                   reason=f"CPU kernels not built: {ops.cpu_extension_error()}")

ISAS = ["avx512", "avx2", "portable"]
# (B, H, Lq, Lk, D, Dv): ViT-B/16's head, one of everything, rows and keys that fill no register
# tile (Lq % 6, Lk % 16), head dims past one panel (Dv = 65, 130), keys < one vector, D = 1
SHAPES = [(1, 12, 197, 197, 64, 64), (1, 1, 1, 1, 1, 1), (2, 3, 5, 7, 17, 9), (1, 2, 13, 200, 80, 65),
          (1, 1, 37, 1, 3, 130), (3, 1, 8, 33, 64, 64), (1, 1, 6, 16, 16, 16), (2, 1, 50, 3, 8, 70)]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    if request.param not in ops.cpu_isas():
        pytest.skip(f"this CPU (or build) cannot run {request.param}")
    monkeypatch.setenv("SPARSE_PRUNE_CPU_ISA", request.param)
    assert ops.cpu_isa() == request.param
    return request.param


def _qkv(b, h, lq, lk, d, dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g).to(dtype), torch.randn(b, h, lk, d, generator=g).to(dtype),
            torch.randn(b, h, lk, dv, generator=g).to(dtype))


def _reference(q, k, v, scale=None):
    """softmax(scale·q·kᵀ)·v in float64, torch's softmax order (max, exp(s - max), sum); a row
    whose scores are all -inf weighs nothing, as in torch's SDPA (plain softmax: NaN)."""
    s = q.double() @ k.double().transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    p = s.softmax(-1)
    return torch.where((s == float("-inf")).all(-1, keepdim=True), 0.0, p) @ v.double()


def _threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(isa, shape):
    q, k, v = _qkv(*shape)
    got = _threads(1, lambda: attn.attention(q, k, v))
    b, h, lq, _, _, dv = shape
    assert got.shape == (b, h, lq, dv) and got.dtype == torch.float32
    assert got.transpose(1, 2).is_contiguous()  # [B, Lq, H, Dv] in memory
    torch.testing.assert_close(got.double(), _reference(q, k, v), rtol=2e-5, atol=2e-6)
    assert torch.equal(got, _threads(2, lambda: attn.attention(q, k, v)))


@needs_kernels
@pytest.mark.parametrize("scale", [0.0, 0.37, -1.5, 3.0])
def test_explicit_scale(isa, scale):
    q, k, v = _qkv(2, 2, 11, 19, 24, 8)
    torch.testing.assert_close(attn.attention(q, k, v, scale).double(), _reference(q, k, v, scale),
                               rtol=2e-5, atol=2e-6)


@needs_kernels
def test_few_heads_split_query_rows_across_workers(isa):
    """B·H = 1 with 2 workers: the rows of one head run in chunks (each packs K and V)."""
    q, k, v = _qkv(1, 1, 197, 150, 64, 64, seed=3)
    one = _threads(1, lambda: attn.attention(q, k, v))
    two = _threads(2, lambda: attn.attention(q, k, v))
    assert torch.equal(one, two)
    torch.testing.assert_close(two.double(), _reference(q, k, v), rtol=2e-5, atol=2e-6)


@needs_kernels
def test_strided_operands(isa):
    """transformers' layout (views of [B, L, H·D]) and a last dim that is not contiguous."""
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(2, 29, 3 * 40, generator=g) for _ in range(3)]
    q, k, v = (t.view(2, 29, 3, 40).transpose(1, 2) for t in x)
    torch.testing.assert_close(attn.attention(q, k, v).double(), _reference(q, k, v), rtol=2e-5, atol=2e-6)
    wide = torch.randn(2, 3, 29, 80, generator=g)
    q2 = wide[..., ::2]
    assert q2.stride(-1) == 2
    torch.testing.assert_close(attn.attention(q2, k, v).double(), _reference(q2, k, v), rtol=2e-5, atol=2e-6)


@needs_kernels
def test_empty_operands(isa):
    q, k, v = _qkv(1, 2, 0, 4, 5, 6)
    assert attn.attention(q, k, v).shape == (1, 2, 0, 6)
    q, k, v = _qkv(1, 2, 3, 0, 5, 6)  # no keys: zeros, as torch's SDPA
    assert torch.equal(attn.attention(q, k, v), torch.zeros(1, 2, 3, 6))
    q, k, v = _qkv(1, 2, 3, 4, 0, 6)  # head_dim 0: every score 0, uniform weights
    torch.testing.assert_close(attn.attention(q, k, v, 1.0), v.mean(2, keepdim=True).expand(1, 2, 3, 6))


@needs_kernels
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_match_the_reference_pattern(isa, where, value):
    """A NaN or an infinity reaches exactly the outputs it reaches in the float64 reference: a
    score row holding a NaN, +inf or only -inf is NaN; v's non-finite values spread through every
    weight (0·inf = NaN as in the reference's matmul)."""
    q, k, v = _qkv(1, 2, 9, 21, 16, 20, seed=5)
    t = dict(q=q, k=k, v=v)[where]
    t[0, 1, 4, 3] = value
    got = attn.attention(q, k, v).double()
    ref = _reference(q, k, v)
    assert torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(got.isinf(), ref.isinf())
    finite = ref.isfinite()
    assert finite.any()  # the other head is untouched
    torch.testing.assert_close(got[finite], ref[finite], rtol=2e-5, atol=2e-6)


@needs_kernels
def test_a_score_that_overflows_to_minus_inf_weighs_nothing(isa):
    """Scores past float32's range: -inf in our float32 product, finite in the float64 one; the
    row's other keys keep all the weight either way."""
    q, k, v = _qkv(1, 1, 7, 12, 8, 5, seed=2)
    q[0, 0, 3, 0] = -3e38
    k[0, 0, :, 0] = 0.0
    k[0, 0, 4, 0] = 10.0  # key 4 scores -3.75e38 · 10 for query 3: -inf in float32
    got = attn.attention(q, k, v, 0.125).double()
    torch.testing.assert_close(got, _reference(q, k, v, 0.125), rtol=2e-5, atol=2e-6)
    assert got.isfinite().all()


@needs_kernels
def test_a_row_of_only_minus_inf_scores_is_zero_as_in_sdpa(isa):
    q, k, v = _qkv(1, 2, 5, 9, 4, 3, seed=4)
    k[..., 0] = k[..., 0].abs() + 0.1
    q[0, 0, 1, 0] = float("-inf")  # query 1 of head 0 scores -inf against every key
    got = attn.attention(q, k, v)
    sdpa = Fn.scaled_dot_product_attention(q, k, v)
    assert torch.equal(got[0, 0, 1], torch.zeros(3)) and torch.equal(sdpa[0, 0, 1], torch.zeros(3))
    torch.testing.assert_close(got, sdpa, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(ops._attention_composite(q.double(), k.double(), v.double()), got.double(),
                               rtol=2e-5, atol=2e-6)


@needs_kernels
def test_the_scale_is_applied_to_the_scores_not_to_k(isa):
    """scale·(q·kᵀ): k = 1e30 with scale 1e-10 stays finite (scale·k first would not matter here,
    but k = 1e30, scale = 1e10 against q = 0 would make 0·inf = NaN)."""
    q, k, v = _qkv(1, 1, 4, 6, 8, 3, seed=6)
    q[..., 0] = 0.0
    k[..., 0] = 1e30
    got = attn.attention(q, k, v, 1e10)
    assert got.isfinite().all()
    torch.testing.assert_close(got.double(), _reference(q, k, v, 1e10), rtol=2e-5, atol=2e-6)


@needs_kernels
def test_gradients_are_sdpa_gradients():
    q, k, v = (t.requires_grad_() for t in _qkv(2, 3, 7, 9, 8, 5))
    g = torch.randn(2, 3, 7, 5, generator=torch.Generator().manual_seed(9))
    ours = torch.autograd.grad(attn.attention(q, k, v, 0.4), (q, k, v), g)
    want = torch.autograd.grad(Fn.scaled_dot_product_attention(q, k, v, scale=0.4), (q, k, v), g)
    for a, b in zip(ours, want, strict=True):
        torch.testing.assert_close(a, b)
    (gk,) = torch.autograd.grad(attn.attention(q.detach(), k, v.detach()).sum(), (k,))
    assert gk.shape == k.shape and gk.isfinite().all()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes_take_torch_sdpa_in_the_same_layout(dtype):
    q, k, v = _qkv(2, 3, 10, 14, 8, 6, dtype=dtype)
    got = attn.attention(q, k, v)
    assert got.dtype == dtype and got.transpose(1, 2).is_contiguous()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.double(), _reference(q, k, v), **tol)


def test_composite_matches_the_kernel():
    """What serves the op where our CPU kernel is not loaded (other devices)."""
    q, k, v = _qkv(2, 3, 10, 14, 8, 6)
    got = ops._attention_composite(q, k, v, 0.3)
    assert got.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(got.double(), _reference(q, k, v, 0.3), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("impl", ["kernel", "composite"])
@pytest.mark.parametrize("args, error, message", [
    (((2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4)), ValueError, "q must be 4-D"),
    (((1, 2, 3, 4), (1, 3, 3, 4), (1, 2, 3, 4)), ValueError, "batch and heads"),
    (((1, 2, 3, 4), (1, 2, 3, 5), (1, 2, 3, 4)), ValueError, "k's head_dim"),
    (((1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 5, 4)), ValueError, "v must have k's tokens"),
])
def test_bad_shapes_are_refused(impl, args, error, message):
    if impl == "kernel" and not ops.has_cpu_extension():
        pytest.skip("CPU kernels not built")
    q, k, v = (torch.randn(s) for s in args)
    run = attn.attention if impl == "kernel" else ops._attention_composite
    with pytest.raises(error, match=message):
        run(q, k, v, None)


@pytest.mark.parametrize("impl", ["kernel", "composite"])
def test_bad_dtypes_and_scale_are_refused(impl):
    if impl == "kernel" and not ops.has_cpu_extension():
        pytest.skip("CPU kernels not built")
    run = attn.attention if impl == "kernel" else ops._attention_composite
    q, k, v = _qkv(1, 2, 3, 4, 5, 6)
    with pytest.raises(TypeError, match="share one dtype"):
        run(q, k.double(), v, None)
    with pytest.raises(TypeError, match="must be float32"):
        run(q.int(), k.int(), v.int(), None)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        run(*(t.to(torch.float8_e4m3fn) for t in (q, k, v)), None)
    for bad in (float("nan"), float("inf"), 1e39):
        with pytest.raises(ValueError, match="scale must be finite in float32"):
            run(q, k, v, bad)


def test_fake_kernel_refuses_what_the_kernel_refuses():
    with torch._subclasses.fake_tensor.FakeTensorMode():
        q, k, v = torch.empty(1, 2, 3, 4), torch.empty(1, 2, 3, 5), torch.empty(1, 2, 3, 4)
        with pytest.raises(ValueError, match="k's head_dim"):
            attn.attention(q, k, v)
        out = attn.attention(q, torch.empty(1, 2, 7, 4), torch.empty(1, 2, 7, 9))
        assert out.shape == (1, 2, 3, 9) and out.transpose(1, 2).is_contiguous()


@needs_kernels
def test_opcheck():
    q, k, v = _qkv(2, 3, 10, 14, 8, 6)
    torch.library.opcheck(torch.ops.sparse_prune.attention.default, (q, k, v, 0.25))
    torch.library.opcheck(torch.ops.sparse_prune.attention.default, (q, k, v, None))


class _Attend(torch.nn.Module):
    def forward(self, q, k, v):
        return attn.attention(q, k, v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


@needs_kernels
def test_compile_and_export():
    q, k, v = _qkv(2, 3, 10, 14, 8, 8)
    layer = _Attend()
    eager = layer(q, k, v)
    torch.testing.assert_close(torch.compile(layer, backend="inductor", fullgraph=True)(q, k, v), eager)
    torch.testing.assert_close(torch.export.export(layer, (q, k, v)).module()(q, k, v), eager)


# ---------------------------------------------------------------------------------------
# set_attention: transformers models


@needs_kernels
def test_set_attention_runs_our_kernel_and_matches_sdpa(hf_vit, images, monkeypatch):
    with torch.inference_mode():
        want = hf_vit(images).logits
    assert sp.set_attention(hf_vit) is hf_vit
    assert attn.attention_implementation(hf_vit) == "sparse_prune"
    import transformers.integrations.sdpa_attention as hf_sdpa

    def refuse(*args, **kwargs):
        raise AssertionError("transformers' sdpa ran: our kernel was bypassed")

    monkeypatch.setattr(hf_sdpa, "sdpa_attention_forward", refuse)
    with torch.inference_mode():
        got = hf_vit(images).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    sp.set_attention(hf_vit, "sdpa")
    assert attn.attention_implementation(hf_vit) == "sdpa"


@needs_kernels
def test_set_attention_survives_convert(hf_vit, images):
    sp.set_attention(hf_vit)
    masks = sp.prune(hf_vit, "l1_unstructured", amount=0.5)
    fast = sp.convert(hf_vit, masks, format="csr")
    assert attn.attention_implementation(fast) == "sparse_prune"
    dense = sp.convert(hf_vit, masks, format="dense")
    with torch.inference_mode():
        torch.testing.assert_close(fast(images).logits, dense(images).logits, rtol=1e-4, atol=1e-4)


def test_what_the_kernel_does_not_take_goes_to_transformers_sdpa(hf_vit, images):
    """A mask, gradients, output_attentions: transformers' own sdpa, same result."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = next(m for n, m in hf_vit.named_modules() if n.endswith("attention"))
    q, k, v = _qkv(2, 4, 5, 5, 8, 8)
    mask = torch.zeros(2, 1, 5, 5)
    mask[..., 3:] = float("-inf")
    got, _ = attn.transformers_attention(module, q, k, v, mask, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(got, want)
    qg = q.clone().requires_grad_()
    out, _ = attn.transformers_attention(module, qg, k, v, None, scaling=0.3)
    out.sum().backward()
    assert qg.grad is not None and qg.grad.isfinite().all()


def test_fallback_follows_transformers_sdpa_where_it_differs(hf_vit):
    """Broadcast batch, a module without ``is_causal`` (transformers takes it for causal), dropout
    passed in eval: each goes to transformers' sdpa, which decides what it means."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = next(m for n, m in hf_vit.named_modules() if n.endswith("attention"))
    q, k, v = _qkv(1, 2, 4, 4, 8, 8)
    kb, vb = k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1)
    got, _ = attn.transformers_attention(module, q, kb, vb, None, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, kb, vb, None, scaling=0.3)
    torch.testing.assert_close(got, want)
    plain = torch.nn.Module().eval()
    got, _ = attn.transformers_attention(plain, q, k, v, None, scaling=0.3)
    torch.testing.assert_close(got, sdpa_attention_forward(plain, q, k, v, None, scaling=0.3)[0])
    torch.manual_seed(0)
    got, _ = attn.transformers_attention(module, q, k, v, None, scaling=0.3, dropout=0.5)
    torch.manual_seed(0)
    torch.testing.assert_close(got, sdpa_attention_forward(module, q, k, v, None, scaling=0.3, dropout=0.5)[0])


def test_set_attention_training_backward(hf_vit, images):
    sp.set_attention(hf_vit)
    hf_vit.train()
    hf_vit(images).logits.sum().backward()
    grads = [p.grad for p in hf_vit.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.isfinite().all() for g in grads)


def test_set_attention_refuses_bad_input(hf_vit):
    with pytest.raises(ValueError, match="implementation must be one of"):
        sp.set_attention(hf_vit, "flash")
    with pytest.raises(TypeError, match="transformers PreTrainedModel"):
        sp.set_attention(torch.nn.Linear(2, 2))


def test_reference_matches_torch_sdpa():
    q, k, v = _qkv(2, 3, 10, 14, 8, 6, dtype=torch.float64)
    torch.testing.assert_close(_reference(q, k, v), Fn.scaled_dot_product_attention(q, k, v))
