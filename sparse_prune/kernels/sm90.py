"""Hopper (sm_90a) 2:4 GEMM on CUTLASS: op schemas, fakes, the metadata packer, the loader.

The kernels live in ``csrc/sm90/`` and are compiled into a separate extension,
``sparse_prune._C_sm90`` (sm_90a only, CUTLASS 3.x/4.x headers from the ``nvidia-cutlass``
package or ``CUTLASS_PATH``). Ops (namespace ``sparse_prune``):

``semi24_sm90_pack(Tensor meta, int cols) -> Tensor e``
    Our portable 2:4 metadata (``SemiStructured.meta``, int16 ``[N, ceil(K/16)]``) rearranged
    into CUTLASS's sm90 metadata layout ``E`` (uint8 ``[round_up(N, 64), round_up(K, 128)/8]``).
    Pure index math in torch ops (any device); run once when a layer is converted, never per
    call. The compressed values need no rearranging: CUTLASS's K-major compressed A for a
    16-bit type is row-major ``[N, K/2]`` with each group's two kept values in column order,
    which is ``SemiStructured.values`` as it is (checked against CuTe by the layout test).

``semi24_sm90_linear(Tensor x, Tensor a, Tensor e, int out_features, Tensor? bias=None,
int activation=0, int tile=-1) -> Tensor``
    ``Y [M, N] = X [M, K] · Wᵀ (+ bias)``, then GELU (exact erf) when ``activation == 1``;
    fp16/bf16 in, fp32 accumulation, output in the input dtype; ``K % 16 == 0``; any M and N.
    ``a`` is the values ``[round_up(N, 8), K/2]`` (zero rows appended when N % 8 != 0, since
    the TMA store needs 16-byte rows of the output; :func:`pack` does it once), ``e`` the
    packed metadata. ``tile``: -1 picks by M (``TILE_CONFIGS``), 0/1 force a config.
    CUDA only (sm_90 GPUs); on CPU tensors it raises ``ValueError``.

``semi24_sm90_cutlass_compress(Tensor weight) -> (Tensor a, Tensor e)``
    Test oracle (CUDA, sm_90): CUTLASS's own sm90 compressor run on a dense 2:4 weight; where
    every group keeps two nonzeros its output equals ``(values, semi24_sm90_pack(meta, K))``.

``semi24_sm90_layout(int rows, int cols) -> (Tensor a_offsets, Tensor e_offsets)``
    Host-only (needs the extension, not a GPU): the offsets CuTe computes for the compressed A
    (element units) and for the metadata bytes, the way CUTLASS's sm90 compressor addresses
    them. The tests compare :func:`e_byte_offsets` / :func:`a_offsets` with it.

Importing this module never raises: :func:`has_sm90_extension` and
:func:`sm90_extension_error` say whether the compiled kernels are there.
"""

from __future__ import annotations

import importlib

import torch

from sparse_prune.checks import check_2to4_meta_once

__all__ = [
    "ACTIVATIONS",
    "TILE_CONFIGS",
    "a_offsets",
    "e_byte_offsets",
    "e_shape",
    "has_sm90_device",
    "has_sm90_extension",
    "linear",
    "load_sm90_extension",
    "pack",
    "pack_metadata",
    "sm90_extension_error",
]

# Metadata layout constants of CUTLASS's Sm90GemmSparseConfig for 16-bit A and TileK = 128
# (every tile config shares TileK = 128; csrc/sm90/semi24_sm90_kernel.cuh asserts it).
E_ROWS_ALIGN = 64  # TensorEAtomM
E_COLS_ALIGN = 128  # TensorEAtomK, in logical weight columns
E_COLS_PER_BYTE = 8  # sparse_elem<8, uint8_t>: one byte holds the nibbles of 2 groups of 4
K_MULTIPLE = 16  # K % 16: 16-byte TMA rows of the compressed values [N, K/2]
A_ROWS_ALIGN = 8  # rows of a (= output features of the GEMM) padded to 16 bytes of output

ACTIVATIONS = {"none": 0, "gelu": 1}
# tile -> (GEMM tile (out features x tokens x K), cluster); -1 = auto: 128x128 unless that
# leaves SMs idle in the first wave (ceil(N/128)·ceil(M/128) < SM count), then 128x64.
TILE_CONFIGS = {0: ("128x128x128", "1x2x1"), 1: ("128x64x128", "1x1x1")}

_lib = torch.library.Library("sparse_prune", "FRAGMENT")  # noqa: TOR901 (long-lived on purpose)
_lib.define("semi24_sm90_pack(Tensor meta, int cols) -> Tensor")
_lib.define("semi24_sm90_linear(Tensor x, Tensor a, Tensor e, int out_features, Tensor? bias=None, "
            "int activation=0, int tile=-1) -> Tensor")
_lib.define("semi24_sm90_layout(int rows, int cols) -> (Tensor, Tensor)")
_lib.define("semi24_sm90_cutlass_compress(Tensor weight) -> (Tensor, Tensor)")


def _round_up(v, m):
    return (v + m - 1) // m * m


def e_shape(rows: int, cols: int) -> tuple[int, int]:
    """Shape of the packed metadata ``e`` (uint8) of an ``[rows, cols]`` 2:4 weight."""
    return _round_up(rows, E_ROWS_ALIGN), _round_up(cols, E_COLS_ALIGN) // E_COLS_PER_BYTE


def _e_logical_offset(m: torch.Tensor, k: torch.Tensor, rows_aligned: int) -> torch.Tensor:
    """CUTLASS's ``fill_layoutE`` for 16-bit A, TileK 128, at logical (row m, column k).

    The atom is 64 rows x 128 columns, ``make_ordered_layout(((8,2,4),(16,2,4)),
    ((3,1,5),(0,4,2)))``: with m = m0 + 8·m1 + 16·m2 and k = k0 + 16·k1 + 32·k2, its offset is
    k0 + 16·m1 + 32·k2 + 128·m0 + 1024·k1 + 2048·m2 (cosize 8192); atoms go down the rows
    first (stride 8192), then along K (stride rows_aligned·128). Units: logical weight
    elements, 8 per metadata byte.
    """
    mt, mi = m // 64, m % 64
    kt, ki = k // 128, k % 128
    m0, m1, m2 = mi % 8, (mi // 8) % 2, mi // 16
    k0, k1, k2 = ki % 16, (ki // 16) % 2, ki // 32
    return (k0 + 16 * m1 + 32 * k2 + 128 * m0 + 1024 * k1 + 2048 * m2
            + 8192 * mt + kt * (rows_aligned * 128))


def e_byte_offsets(rows: int, cols: int, device=None) -> torch.Tensor:
    """int64 ``[rows, cols/8]``: where metadata byte b of row r (groups 2b, 2b+1; low nibble =
    group 2b) lives in ``e`` (flattened)."""
    m = torch.arange(rows, device=device).unsqueeze(1)
    k = torch.arange(0, cols, E_COLS_PER_BYTE, device=device).unsqueeze(0)
    return _e_logical_offset(m, k, e_shape(rows, cols)[0]) // E_COLS_PER_BYTE


def a_offsets(rows: int, cols: int, device=None) -> torch.Tensor:
    """int64 ``[rows, cols/2]``: element offset of stored value c of row r in the compressed A
    (K-major, ``round_up(K, 16)/2`` per row): row-major ``[N, K/2]``, i.e. our values."""
    half = _round_up(cols, K_MULTIPLE) // 2
    return (torch.arange(rows, device=device).unsqueeze(1) * half
            + torch.arange(cols // 2, device=device).unsqueeze(0))


def _check_pack_args(meta: torch.Tensor, cols: int) -> None:
    if meta.dtype != torch.int16 or meta.dim() != 2:
        raise ValueError(f"meta must be 2-D torch.int16 (SemiStructured.meta), got {meta.dtype} "
                         f"{tuple(meta.shape)}")
    if cols <= 0 or cols % K_MULTIPLE:
        raise ValueError(f"cols (K) must be a positive multiple of {K_MULTIPLE} for the sm90 "
                         f"kernel, got {cols}")
    if meta.shape[1] != (cols + 15) // 16:
        raise ValueError(f"meta must be [N, {(cols + 15) // 16}] for K = {cols}, got {tuple(meta.shape)}")


def pack_metadata(meta: torch.Tensor, cols: int) -> torch.Tensor:
    """Reference implementation of ``semi24_sm90_pack``: torch ops only, any device.

    Our nibble (bits [1:0] first kept column, [3:2] second, docs/semi_structured_layout.md)
    is already the per-group code CUTLASS's compressor writes for 16-bit types; only where the
    nibbles live changes. Rows and columns of padding get 0 (as CUTLASS's compressor leaves them).
    """
    _check_pack_args(meta, cols)
    rows = meta.shape[0]
    groups = cols // 4
    shifts = torch.arange(4, device=meta.device, dtype=torch.int32) * 4
    nibbles = (meta.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF  # [rows, words, 4]
    nibbles = nibbles.reshape(rows, -1)[:, :groups]
    byte = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)  # [rows, cols/8]
    e_rows, e_cols = e_shape(rows, cols)
    e = torch.zeros(e_rows * e_cols, dtype=torch.uint8, device=meta.device)
    e[e_byte_offsets(rows, cols, meta.device).reshape(-1)] = byte.reshape(-1)
    return e.view(e_rows, e_cols)


_lib.impl("semi24_sm90_pack", pack_metadata, "CompositeExplicitAutograd")


@torch.library.register_fake("sparse_prune::semi24_sm90_pack")
def _pack_fake(meta: torch.Tensor, cols: int) -> torch.Tensor:
    torch._check(meta.dim() == 2 and meta.dtype == torch.int16,
                 lambda: f"meta must be 2-D torch.int16, got {meta.dtype} {meta.dim()}-D")
    torch._check(cols > 0 and cols % K_MULTIPLE == 0,
                 lambda: f"cols (K) must be a positive multiple of {K_MULTIPLE}, got {cols}")
    torch._check(meta.shape[1] == (cols + 15) // 16, lambda: "meta must hold ceil(K/16) words per row")
    return meta.new_empty(e_shape(meta.shape[0], cols), dtype=torch.uint8)


def _check_linear(x, a, e, n, bias, activation, tile) -> None:
    """Shape/dtype checks of the fake (torch._check: symbolic-safe)."""
    torch._check(x.dim() == 2, lambda: f"x must be 2-D [M, K], got {x.dim()}-D")
    torch._check(a.dim() == 2, lambda: f"a must be 2-D [round_up(N, 8), K/2], got {a.dim()}-D")
    torch._check(x.dtype in (torch.float16, torch.bfloat16),
                 lambda: f"dtype must be float16 or bfloat16 (sparse tensor cores), got {x.dtype}")
    torch._check(a.dtype == x.dtype, lambda: f"a dtype {a.dtype} must equal x dtype {x.dtype}")
    k = x.shape[1]
    torch._check(n > 0, lambda: f"out_features must be positive, got {n}")
    torch._check(k % K_MULTIPLE == 0, lambda: f"K = {k} must be a multiple of {K_MULTIPLE}")
    rows = _round_up(n, A_ROWS_ALIGN)
    torch._check(a.shape[0] == rows and a.shape[1] * 2 == k,
                 lambda: f"a must be [round_up(N, 8), K/2] = [{rows}, {k // 2}] (sm90.pack), got {tuple(a.shape)}")
    er, ec = e_shape(n, k)
    torch._check(e.dtype == torch.uint8 and e.dim() == 2 and e.shape[0] == er and e.shape[1] == ec,
                 lambda: f"e must be uint8 [{er}, {ec}] (semi24_sm90_pack(meta, K)), got {e.dtype} {tuple(e.shape)}")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == n and bias.dtype == x.dtype,
                     lambda: f"bias must be [{n}] of dtype {x.dtype}, got {bias.dtype} {tuple(bias.shape)}")
    torch._check(activation in (0, 1), lambda: f"activation must be 0 (none) or 1 (GELU), got {activation}")
    torch._check(tile in (-1, *TILE_CONFIGS), lambda: f"tile must be -1 (auto), 0 or 1, got {tile}")


@torch.library.register_fake("sparse_prune::semi24_sm90_linear")
def _linear_fake(x, a, e, out_features, bias=None, activation=0, tile=-1):
    _check_linear(x, a, e, out_features, bias, activation, tile)
    return x.new_empty((x.shape[0], out_features))


def _refuse_cpu(x, a, e, out_features, bias=None, activation=0, tile=-1):
    raise ValueError(
        f"sparse_prune::semi24_sm90_linear runs on CUDA sm_90 tensors (H100/H200), got x on "
        f"{x.device}; move the model with .to('cuda') or use another backend")


_lib.impl("semi24_sm90_linear", _refuse_cpu, "CPU")


def _refuse_cpu_compress(weight):
    raise ValueError(f"sparse_prune::semi24_sm90_cutlass_compress runs on CUDA sm_90 tensors, got {weight.device}")


_lib.impl("semi24_sm90_cutlass_compress", _refuse_cpu_compress, "CPU")


@torch.library.register_fake("sparse_prune::semi24_sm90_cutlass_compress")
def _cutlass_compress_fake(weight):
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D, got {weight.dim()}-D")
    rows, cols = weight.shape
    return weight.new_empty((rows, cols // 2)), weight.new_empty(e_shape(rows, cols), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------
# The compiled library. Loading it must never make an import fail.

_EXTENSION_ERROR: str | None = "not loaded yet"
EXTENSION_ABI = 1  # SPARSE_PRUNE_SM90_ABI in csrc/sm90/semi24_sm90_ops.cpp


def load_sm90_extension() -> bool:
    """Import ``sparse_prune._C_sm90`` (registers the CUDA kernels); never raises."""
    global _EXTENSION_ERROR
    if _EXTENSION_ERROR is None:
        return True
    try:
        lib = importlib.import_module("sparse_prune._C_sm90")
        built_for = lib.abi_version()
        if built_for != EXTENSION_ABI:
            raise ImportError(f"sparse_prune._C_sm90 was built for op schemas v{built_for}, this "
                              f"sparse_prune has v{EXTENSION_ABI}: rebuild it (pip install --no-build-isolation -e .)")
        lib.register_kernels()
    except (ImportError, OSError, AttributeError) as exc:  # not built (no CUTLASS/toolkit), another torch, stale
        _EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"
        return False
    except RuntimeError as exc:  # registration refused (signature mismatch)
        _EXTENSION_ERROR = f"RuntimeError: kernels not registered: {exc}"
        return False
    _EXTENSION_ERROR = None
    return True


def has_sm90_extension() -> bool:
    """True when the compiled Hopper kernels (``sparse_prune._C_sm90``) are loaded."""
    return _EXTENSION_ERROR is None


def sm90_extension_error() -> str | None:
    """Why ``sparse_prune._C_sm90`` is not loaded (``None`` when it is)."""
    return _EXTENSION_ERROR


def has_sm90_device(device=None) -> bool:
    """True when ``device`` (default: the current CUDA device) is compute capability 9.0."""
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


def pack(values: torch.Tensor, meta: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sm90 payload of a ``SemiStructured`` weight: ``(a, e)``, computed once.

    ``a`` is ``values`` itself (CUTLASS's compressed A as it is) when N % 8 == 0, else a copy
    with zero rows appended up to ``round_up(N, 8)``; ``e`` is ``semi24_sm90_pack(meta, cols)``
    on meta's device. ``ValueError`` for a layout the kernel cannot take (dtype, K not a
    multiple of 16, shapes).
    """
    if values.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the sm90 kernel takes float16 or bfloat16 weights, got {values.dtype}")
    _check_pack_args(meta, cols)
    if values.dim() != 2 or tuple(values.shape) != (meta.shape[0], cols // 2):
        raise ValueError(f"values must be [{meta.shape[0]}, {cols // 2}], got {tuple(values.shape)}")
    check_2to4_meta_once(meta, cols, name="sm90 pack: meta")  # E carries the nibbles as they are
    a = values.contiguous()
    rows = _round_up(a.shape[0], A_ROWS_ALIGN)
    if rows != a.shape[0]:
        a = torch.cat((a, a.new_zeros((rows - a.shape[0], a.shape[1]))))
    return a, torch.ops.sparse_prune.semi24_sm90_pack(meta, cols)


def linear(x: torch.Tensor, a: torch.Tensor, e: torch.Tensor, out_features: int,
           bias: torch.Tensor | None = None, activation: str = "none", tile: int = -1) -> torch.Tensor:
    """``Y = act(X · Wᵀ + bias)`` for a 2-D ``x`` through ``semi24_sm90_linear``
    (``a, e = pack(values, meta, K)``)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if x.device.type == "cuda" and not has_sm90_extension():
        raise ValueError(f"the sm90 kernels are not loaded: {sm90_extension_error()}")
    return torch.ops.sparse_prune.semi24_sm90_linear(x, a, e, out_features, bias,
                                                     ACTIVATIONS[activation], tile)


if not load_sm90_extension():
    # Without the library, CUDA calls get this message instead of "no CUDA kernel registered".
    def _refuse_unbuilt(x, a, e, out_features, bias=None, activation=0, tile=-1):
        raise ValueError(f"sparse_prune::semi24_sm90_linear: the sm90 kernels are not loaded "
                         f"({sm90_extension_error()})")

    _lib.impl("semi24_sm90_linear", _refuse_unbuilt, "CUDA")
