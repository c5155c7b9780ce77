"""The guards in front of the 2:4 kernels (issue 18), checked on the CPU.

1. x/values views whose storage offset breaks the 4-byte alignment of the mma.sp kernel's
   32-bit loads are copied once into aligned storage (``ops.semi24_cuda_operands``).
2. The mma.sp kernel built for an arch below sm_80 traps instead of writing bias only, and
   compute capability < 8.0 is refused before any launch.
3. Invalid 2:4 metadata never reaches a kernel: every path that hands one its metadata
   (convert, ``sp.load``, ``load_state_dict``, the ops called directly, the sm90 packer)
   validates it, once per tensor.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import sparse_prune as sp
from sparse_prune import checks, ops
from sparse_prune import formats as F
from sparse_prune.nn import SparseLinear

ROOT = Path(__file__).resolve().parents[1]


def _semi24(n=8, k=32, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    mask = torch.zeros(n, k, dtype=torch.bool)
    mask.view(n, k // 4, 4)[..., :2] = True
    return F.SemiStructured.from_dense(w, mask), w, mask


def _misaligned(rows, cols, dtype=torch.float16):
    t = torch.randn(rows * cols + 1).to(dtype)[1:].view(rows, cols)
    assert t.is_contiguous() and t.data_ptr() % 4 == 2  # what .contiguous() keeps as it is
    return t


# --- 1. alignment ----------------------------------------------------------------------


def test_misaligned_x_and_values_are_copied_once_into_aligned_storage():
    s, _, _ = _semi24()
    x = _misaligned(3, 32)
    values = _misaligned(*s.values.shape)
    values.copy_(s.values)
    x2, v2 = ops.semi24_cuda_operands(x, values, s.meta)
    assert x2.data_ptr() % 4 == 0 and v2.data_ptr() % 4 == 0
    assert torch.equal(x2, x) and torch.equal(v2, s.values)


def test_aligned_operands_are_passed_through_without_a_copy():
    s, _, _ = _semi24()
    x = torch.randn(3, 32, dtype=torch.float16)
    x2, v2 = ops.semi24_cuda_operands(x, s.values, s.meta)
    assert x2 is x and v2 is s.values


def test_aligned_makes_strided_views_contiguous_and_aligned():
    base = torch.randn(4, 33, dtype=torch.float16)
    t = checks.aligned(base[:, 1:], 4)
    assert t.is_contiguous() and t.data_ptr() % 4 == 0 and torch.equal(t, base[:, 1:])


def test_the_cuda_kernel_refuses_misaligned_operands_itself():
    """The C++ side keeps its own check (a direct call of the private op gets an error, not a fault)."""
    src = (ROOT / "csrc" / "register_ops.cpp").read_text()
    assert "must be 4-byte aligned" in src and "% 4 == 0" in src


# --- 2. architecture guards ------------------------------------------------------------


@pytest.mark.parametrize("cap, refused", [((7, 5), True), ((7, 0), True), ((8, 0), False), ((8, 6), False),
                                          ((9, 0), False)])
def test_compute_capability_below_8_is_refused(cap, refused):
    why = ops.mma_sp_refusal(cap, "GPU X")
    assert (why is not None) == refused
    if refused:
        assert "8.0" in why and f"{cap[0]}.{cap[1]}" in why and "triton" in why


def _nvcc():
    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return str(nvcc) if nvcc.exists() else shutil.which("nvcc")


def _cuobjdump():
    from tests.test_cubins import _cuobjdump as find

    return find()


def test_the_mma_sp_kernel_built_for_sm75_traps_and_holds_no_mma(tmp_path):
    """Built for an arch without sparse tensor cores, the kernel must fail loudly (BPT.TRAP),
    never write a result without the product; for sm_80 it holds HMMA.SP and no trap."""
    nvcc, tool = _nvcc(), _cuobjdump()
    if nvcc is None or tool is None:
        pytest.skip("needs nvcc and cuobjdump")
    sass = {}
    for arch in ("sm_75", "sm_80"):
        cubin = tmp_path / f"{arch}.cubin"
        subprocess.run([nvcc, f"-arch={arch}", "-cubin", "-o", str(cubin), str(ROOT / "csrc" / "semi24_gemm.cu")],
                       check=True, capture_output=True, timeout=300)
        sass[arch] = subprocess.run([tool, "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
    assert "BPT.TRAP" in sass["sm_75"] and "HMMA" not in sass["sm_75"]
    assert "HMMA.SP" in sass["sm_80"] and "BPT.TRAP" not in sass["sm_80"]


# --- 3. metadata validation ------------------------------------------------------------


@pytest.mark.parametrize("nibble", [0b0000, 0b0101, 0b1010, 0b1111, 0b0001, 0b0110, 0b1011])
def test_invalid_nibbles_are_refused_with_the_group(nibble):
    s, _, _ = _semi24()
    meta = s.meta.clone()
    word = int(meta[3, 1]) & 0xFFFF
    word = (word & ~(0xF << 8)) | (nibble << 8)  # group 2 of word 1: columns 24..27
    meta[3, 1] = word - 0x10000 if word >= 0x8000 else word
    with pytest.raises(ValueError, match=r"row 3, columns 24\.\.27"):
        checks.check_2to4_meta(meta, 32)


def test_every_valid_nibble_passes_and_unused_tail_nibbles_are_ignored():
    valid = [0b0100, 0b1000, 0b1100, 0b1001, 0b1101, 0b1110]
    meta = torch.tensor([[v | v << 4 | v << 8 | v << 12 for v in valid]], dtype=torch.int32)
    checks.check_2to4_meta(torch.where(meta >= 0x8000, meta - 0x10000, meta).to(torch.int16), 96)
    # K = 20: the second word holds one used group; its three other nibbles are padding
    checks.check_2to4_meta(torch.tensor([[0x4444, 0x0004]], dtype=torch.int16), 20)
    with pytest.raises(ValueError, match="columns 16..19"):
        checks.check_2to4_meta(torch.tensor([[0x4444, 0x4440]], dtype=torch.int16), 20)


def test_validated_once_until_written_to(monkeypatch):
    s, _, _ = _semi24()  # from_dense validated (and recorded) its metadata
    calls = []
    real = checks.check_2to4_meta
    monkeypatch.setattr(checks, "check_2to4_meta", lambda *a, **k: (calls.append(1), real(*a, **k)))
    checks.check_2to4_meta_once(s.meta, 32)
    assert calls == []
    s.meta[0, 0] = 0  # an in-place write bumps the version: checked again, and refused
    with pytest.raises(ValueError, match="row 0, columns 0..3"):
        checks.check_2to4_meta_once(s.meta, 32)
    assert calls == [1]


def _corrupt(meta):
    bad = meta.clone()
    bad[0, 0] = 0
    return bad


def test_the_cuda_op_checks_refuse_invalid_metadata():
    s, _, _ = _semi24()
    with pytest.raises(ValueError, match=r"mma\.sp\): meta: row 0"):
        ops.semi24_cuda_operands(torch.randn(2, 32, dtype=torch.float16), s.values, _corrupt(s.meta))


def test_the_triton_op_refuses_invalid_metadata():
    from sparse_prune.kernels import triton_semi24

    s, _, _ = _semi24(dtype=torch.float32)
    with pytest.raises(ValueError, match="semi24_linear_triton: meta: row 0"):
        triton_semi24.semi24_linear(torch.randn(2, 32), s.values, _corrupt(s.meta), None)


def test_the_sm90_packer_refuses_invalid_metadata():
    from sparse_prune.kernels import sm90

    s, _, _ = _semi24()
    with pytest.raises(ValueError, match="sm90 pack: meta: row 0"):
        sm90.pack(s.values, _corrupt(s.meta), 32)


def test_sparse_linear_validates_at_construction():
    s, _, _ = _semi24(dtype=torch.float32)
    bad = F.SemiStructured(s.values, _corrupt(s.meta), s.shape)
    with pytest.raises(ValueError, match="row 0"):
        SparseLinear(bad, None)


@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict_refuses_invalid_metadata_and_leaves_the_layer(assign):
    s, w, mask = _semi24(dtype=torch.float32)
    layer = SparseLinear(s, None)
    before = layer.meta.clone()
    state = layer.state_dict()
    state["meta"] = _corrupt(state["meta"])
    with pytest.raises(ValueError, match="load_state_dict: .*invalid 2:4 arrays: meta: row 0"):
        layer.load_state_dict(state, assign=assign)
    assert torch.equal(layer.meta, before)
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), x @ torch.where(mask, w, 0).T)


@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict_rebinds_derived_payloads(assign):
    """The CSR row schedule (a payload derived from crow_indices) follows the loaded arrays."""
    n, k = 4, 32
    w = torch.randn(n, k)
    m1 = torch.zeros(n, k, dtype=torch.bool)
    m1[0, :8] = True  # row lengths 8, 1, 1, 1
    m1[1:, 0] = True
    m2 = torch.zeros(n, k, dtype=torch.bool)
    m2[3, :8] = True  # row lengths 1, 1, 1, 8
    m2[:3, 0] = True
    layer = SparseLinear(F.CSR.from_dense(w, m1), None, backend="triton")
    assert layer.row_order[0] == 0
    layer.load_state_dict(SparseLinear(F.CSR.from_dense(w, m2), None).state_dict(), assign=assign)
    assert layer.row_order[0] == 3
    x = torch.randn(2, k)
    torch.testing.assert_close(layer(x), x @ torch.where(m2, w, 0).T, rtol=1e-5, atol=1e-5)


def test_sp_load_refuses_invalid_metadata(tmp_path, hf_vit):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    skeleton = __import__("copy").deepcopy(hf_vit)
    sp.save(sp.convert(hf_vit, sp.prune(hf_vit, "nm", pattern="2:4"), format="2:4"), tmp_path)
    path = str(tmp_path / "model.safetensors")
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata()  # keep the manifest's token: only the array is tampered with
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith(".meta"))
    tensors[key] = _corrupt(tensors[key])
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match="meta: row 0, columns 0..3"):
        sp.load(skeleton, tmp_path)
