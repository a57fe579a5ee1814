"""A packed (unpadded), windowed ModernBERT sequence classifier in PyTorch.

All pairs of one execution are laid end to end (`input_ids` [total_tokens], `cu_seqlens` [pairs+1]);
every pair gets its own rotary positions 0..len-1. Global layers attend within their pair; local
layers within their pair and within `config.local_attention // 2` tokens each way, exactly as
transformers' ModernBERT defines them (|q - k| <= local_attention // 2). Nothing is padded and no
T x T buffer is built, so an 8192-token document costs O(T * window) in local layers.

Attention, by device:
- CUDA, fp16/bf16: FlashAttention-2 varlen over the whole packed batch (window (w, w) on local
  layers), through `torch.nn.attention.varlen.varlen_attn` where it takes a window, else
  `torch.ops.aten._flash_attention_forward` where its schema has window_size_left/right.
- Otherwise (CPU, fp32 on CUDA, or neither op): global layers run scaled_dot_product_attention per
  pair (grouped by equal length) without a mask, which on CPU is a fused flash-style kernel; local
  layers run blocked window attention: blocks of w queries against their 3w keys with a band mask,
  all blocks of all pairs in one call (O(T * w) memory and time). On CPU in fp32, the linear layers run
  through oneDNN and a pair of GEMM_ATTENTION_MIN tokens or more attends through chunked oneDNN GEMMs
  (_gemm_attention): torch's fp32 F.linear runs MKL's AVX2 code on AMD CPUs, at half oneDNN's rate.

The weights are the checkpoint's own, read from its config.json and model.safetensors (through transformers
where only it can read them: read_checkpoint); the forward is this file's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.nn import functional as F  # noqa: N812 (the usual alias)

from .reranker_engine import RELEASE_AFTER_TOKENS

# Names of the attention kernels forward_packed may use (see select_attention_backend).
VARLEN_ATTN = "varlen_attn"
FLASH_FORWARD = "aten_flash_forward"
BLOCKED = "blocked"  # the device-agnostic algorithm (SDPA per pair + blocked window attention)

FLASH_DTYPES = (torch.float16, torch.bfloat16)

# Blocked path, unwindowed attention: pairs whose lengths differ by at most this share (plus a few
# tokens) run as one SDPA call, keys past each pair's end masked. One call per pair costs more on CPU
# than the masked slack does: with many short pairs the per-call overhead of SDPA outweighs the masked keys.
GROUP_SLACK = 0.125
GROUP_ALLOWANCE = 8


def _varlen_attn_function() -> Callable[..., Any] | None:
    """torch.nn.attention.varlen.varlen_attn if this torch has it with a `window_size` argument."""
    try:
        from torch.nn.attention import varlen
    except ImportError:
        return None
    fn = getattr(varlen, "varlen_attn", None)
    if fn is None:
        return None
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    return fn if "window_size" in params else None


def _flash_forward_has_window() -> bool:
    """Whether aten::_flash_attention_forward exists with window_size_left/right arguments."""
    try:
        schema = torch.ops.aten._flash_attention_forward.default._schema
    except (AttributeError, RuntimeError):
        return False
    names = {argument.name for argument in schema.arguments}
    return {"window_size_left", "window_size_right", "scale"} <= names


def select_attention_backend(
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    *,
    varlen_window: bool | None = None,
    flash_forward: bool | None = None,
    flash_available: bool | None = None,
) -> str:
    """The attention kernel for this device and dtype: VARLEN_ATTN, FLASH_FORWARD or BLOCKED.

    FlashAttention-2 needs CUDA, fp16/bf16 and a head size it compiles (multiple of 8, <= 256);
    anything else takes the blocked algorithm, which is exact on every device. The keyword
    arguments (None: ask this torch) say whether varlen_attn takes a window, whether
    aten::_flash_attention_forward does, and whether flash attention was built in.
    """
    if device.type != "cuda" or dtype not in FLASH_DTYPES or head_dim % 8 != 0 or head_dim > 256:
        return BLOCKED
    if flash_available is None:
        flash_available = bool(torch.backends.cuda.is_flash_attention_available())
    if not flash_available:
        return BLOCKED
    if varlen_window is None:
        varlen_window = _varlen_attn_function() is not None
    if varlen_window:
        return VARLEN_ATTN
    if flash_forward is None:
        flash_forward = _flash_forward_has_window()
    return FLASH_FORWARD if flash_forward else BLOCKED


def _flash_attention_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
    """aten::_flash_attention_forward's output (a module function, so tests can stand in for it)."""
    out: torch.Tensor = torch.ops.aten._flash_attention_forward(*args, **kwargs)[0]
    return out


@functools.cache
def _glibc() -> Any:
    """The C library if it is glibc (it has malloc_trim and mallopt), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018  (AttributeError: another C library)
    except (OSError, AttributeError):
        return None
    return libc


# glibc's mallopt parameters (malloc.h), and the values hold_freed_memory sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_BLOCK_LIMIT = 32 << 20  # blocks up to this size come from the heap: glibc's largest mmap threshold
HEAP_TOP_LIMIT = 1 << 30  # free() hands the heap's top back only past this; release_memory trims sooner


@functools.cache
def hold_freed_memory() -> bool:
    """Make glibc keep the activations a CPU run frees for the next run, in this process (once; False where
    the C library is not glibc). By default its thresholds start at 128 KiB and rise only as large blocks
    are freed, so how much a process re-maps on every run depends on its history: in Triton's Python
    stub, ModernBERT-base in bf16 took 196,000 page faults and 0.35 s of system time per request of
    16 x 256 tokens (9% of its time), in the benchmark's own process 50,000 to 200,000 from one start to
    the next; with these fixed thresholds, none. release_memory still returns memory after long runs."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT) and libc.mallopt(_M_TRIM_THRESHOLD, HEAP_TOP_LIMIT))


def flash_window(half_window: int | None) -> tuple[int, int]:
    """FlashAttention's (left, right) window: inclusive, so |q - k| <= w is (w, w); (-1, -1) is global."""
    return (-1, -1) if half_window is None else (half_window, half_window)


def flash_forward_arguments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    half_window: int | None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments of aten::_flash_attention_forward for packed q, k, v [N, H, D]."""
    left, right = flash_window(half_window)
    args = (q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, False, False)
    kwargs = {"scale": scale, "window_size_left": left, "window_size_right": right}
    return args, kwargs


@dataclass
class _Layer:
    attn_norm: tuple[torch.Tensor, torch.Tensor | None] | None  # None: layer 0's Identity
    wqkv: tuple[torch.Tensor, torch.Tensor | None]
    wo: tuple[torch.Tensor, torch.Tensor | None]
    mlp_norm: tuple[torch.Tensor, torch.Tensor | None]
    wi: tuple[torch.Tensor, torch.Tensor | None]
    mlp_wo: tuple[torch.Tensor, torch.Tensor | None]
    half_window: int | None  # None: a global layer
    rope: str  # the layer type whose rotary table it uses


@dataclass
class _Group:
    """Pairs attended together without a window: one pair as a slice, several gathered into
    [pairs, longest] with keys past each pair's end masked."""

    start: int  # packed offset of the first pair when they lie end to end with equal lengths (index is None)
    shape: tuple[int, int]  # (pairs, longest)
    index: torch.Tensor | None = None  # [pairs * longest] packed positions (clamped)
    mask: torch.Tensor | None = None  # [pairs, 1, 1, longest] bool: a key of the pair; None: all are
    keep: torch.Tensor | None = None  # [pairs * longest] bool: a real query; None: all are


@dataclass
class _Blocks:
    """Index plan of blocked window attention over the pairs longer than the window (shared by all
    local layers of one forward)."""

    q_index: torch.Tensor  # [blocks * b] packed positions of each block's queries (clamped)
    q_keep: torch.Tensor  # [blocks * b] bool: a real query (not past its pair's end)
    k_index: torch.Tensor  # [blocks * (b + 2w)] packed positions of each block's keys (clamped)
    mask: torch.Tensor  # [blocks, 1, b, b + 2w] bool: key within the pair and within w of the query
    block: int
    keys: int


@dataclass
class _Plan:
    """How the blocked path attends, shared by the layers of one forward."""

    every_pair: list[_Group]  # global layers
    short_pairs: list[_Group]  # local layers: pairs the window covers whole (length <= w + 1)
    blocks: _Blocks | None  # local layers: the longer pairs


# CPU fp32: single pairs at least this long attend through chunked GEMMs (_gemm_attention) rather than
# SDPA's fused kernel; chunks of queries sized so a chunk's scores take GEMM_SCORES_BYTES.
GEMM_ATTENTION_MIN = 1024


def _scores_bytes(default_l3: int = 16 << 20) -> int:
    """Half the CPU's last-level cache, at most 16 MiB. One 8192-token layer of ModernBERT-base on 2 Zen 5
    cores (32 MiB L3): scores of 2, 4, 8, 16 MiB a chunk take 0.98, 0.79, 0.70, 0.68 s; 32 MiB 2.56 s
    (out of cache between the two products)."""
    l3 = default_l3
    try:
        for index in range(8):
            folder = f"/sys/devices/system/cpu/cpu0/cache/index{index}"
            with open(f"{folder}/level") as level, open(f"{folder}/size") as size:
                if level.read().strip() == "3":
                    text = size.read().strip().upper()
                    units = {"K": 1 << 10, "M": 1 << 20}
                    l3 = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError):
        pass
    return max(1 << 20, min(16 << 20, l3 // 2))


GEMM_SCORES_BYTES = _scores_bytes()


def _linear(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    return F.linear(x, weight[0], weight[1])


def _onednn_linear(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """x @ W.T + b through oneDNN. torch's fp32 F.linear calls MKL's sgemm, which on AMD CPUs runs its AVX2
    code: one 8192 x 768 x 2304 product on 2 Zen 5 cores, 61 GFLOP/s there, 117 through oneDNN."""
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight[0], weight[1], "none", [], "")
    return out


def _onednn_linear_agrees(dtype: torch.dtype) -> bool:
    """Whether this torch has oneDNN's linear for `dtype` and it agrees with F.linear (within the dtype's
    rounding: bf16 keeps 8 significant bits)."""
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    try:
        generator = torch.Generator().manual_seed(0)
        x, w = torch.randn(5, 24, generator=generator), torch.randn(7, 24, generator=generator)
        b = torch.randn(7, generator=generator)
        for bias in (b, None):
            args = (x.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype))
            got = _onednn_linear(args[0], (args[1], args[2])).float()
            expected = F.linear(*args).float()
            if not torch.allclose(got, expected, atol=tolerance * 10, rtol=tolerance):
                return False
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


def _cpu_fp32_linear() -> Callable[[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]], torch.Tensor]:
    """_onednn_linear where this torch has oneDNN's linear and it agrees with F.linear, else _linear."""
    return _onednn_linear if _onednn_linear_agrees(torch.float32) else _linear


# Activations by the names transformers' ACT2FN gives them, where it computes exactly these (other names are
# looked up in ACT2FN itself).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

# The config keys the forward reads; a config.json written by transformers' save_pretrained has them all.
CONFIG_KEYS = frozenset(
    {
        "hidden_size",
        "num_attention_heads",
        "num_hidden_layers",
        "norm_eps",
        "hidden_activation",
        "classifier_activation",
        "classifier_pooling",
        "local_attention",
        "layer_types",
        "rope_parameters",
    }
)


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _weights(tensors: dict[str, torch.Tensor], prefix: str) -> SimpleNamespace:
    """A module's weight and bias (None when it has none), as `lin` reads them."""
    return SimpleNamespace(weight=tensors.pop(f"{prefix}.weight"), bias=tensors.pop(f"{prefix}.bias", None))


def read_checkpoint(model_dir: str | Path) -> SimpleNamespace | None:
    """A saved ModernBertForSequenceClassification's config and weights, shaped as PackedModernBert reads a
    transformers model, straight from config.json and model.safetensors: without importing transformers'
    model code, which is most of a stub's start (about 2 s of CPU). None where transformers must read it:
    sharded or .bin weights, scaled rotary embeddings, a config without the keys the forward reads, or
    weights other than the ones it names."""
    folder = Path(model_dir)
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        return None
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "modernbert" or not config.keys() >= CONFIG_KEYS:
        return None
    rope, layer_types = config["rope_parameters"], config["layer_types"]
    if not (isinstance(rope, dict) and isinstance(layer_types, list) and set(layer_types) <= rope.keys()):
        return None
    if any(not isinstance(p, dict) or p.get("rope_type", "default") != "default" for p in rope.values()):
        return None
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    try:
        layers = [
            SimpleNamespace(
                # Layer 0 has no attention norm (transformers' nn.Identity).
                attn_norm=torch.nn.Identity() if i == 0 else _weights(tensors, f"model.layers.{i}.attn_norm"),
                attn=SimpleNamespace(
                    Wqkv=_weights(tensors, f"model.layers.{i}.attn.Wqkv"),
                    Wo=_weights(tensors, f"model.layers.{i}.attn.Wo"),
                ),
                mlp_norm=_weights(tensors, f"model.layers.{i}.mlp_norm"),
                mlp=SimpleNamespace(
                    Wi=_weights(tensors, f"model.layers.{i}.mlp.Wi"), Wo=_weights(tensors, f"model.layers.{i}.mlp.Wo")
                ),
            )
            for i in range(int(config["num_hidden_layers"]))
        ]
        model = SimpleNamespace(
            config=SimpleNamespace(**config),
            model=SimpleNamespace(
                embeddings=SimpleNamespace(
                    tok_embeddings=_weights(tensors, "model.embeddings.tok_embeddings"),
                    norm=_weights(tensors, "model.embeddings.norm"),
                ),
                layers=layers,
                final_norm=_weights(tensors, "model.final_norm"),
            ),
            head=SimpleNamespace(dense=_weights(tensors, "head.dense"), norm=_weights(tensors, "head.norm")),
            classifier=_weights(tensors, "classifier"),
        )
    except KeyError:
        return None
    # Every tensor is one the forward uses: anything left (a decoder, another head) means another model.
    return None if tensors else model


class PackedModernBert:
    """ModernBERT's sequence classifier over packed pairs (first logit per pair)."""

    device: torch.device
    dtype: torch.dtype

    def __init__(self, model: Any, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        """From a loaded transformers ModernBertForSequenceClassification, or read_checkpoint's stand-in for one
        (its config and weights only)."""
        config = model.config
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.hidden = int(config.hidden_size)
        self.heads = int(config.num_attention_heads)
        if self.hidden % self.heads:
            raise ValueError(f"hidden_size {self.hidden} is not a multiple of num_attention_heads {self.heads}")
        self.head_dim = self.hidden // self.heads
        self.scale = self.head_dim**-0.5
        self.eps = float(getattr(config, "norm_eps", 1e-5))
        self.act = _activation(getattr(config, "hidden_activation", "gelu"))
        self.head_act = _activation(getattr(config, "classifier_activation", "gelu"))
        self.pooling = getattr(config, "classifier_pooling", "cls")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"classifier_pooling {self.pooling!r} is not supported (cls, mean)")
        self.half_window = int(getattr(config, "local_attention", 128)) // 2
        self.backend = select_attention_backend(self.device, dtype, self.head_dim)
        # On CPUs the residual stream (the sum each layer adds to) and its norms stay in fp32 whatever the
        # compute precision; matmuls and attention take it rounded. Rounding the sum itself to bf16 at every
        # layer compounds: ModernBERT-base with random weights, 64 documents of (b), bf16 against fp32:
        # Spearman 0.908 and top-10 overlap 0.6 with a bf16 sum, 0.9994 and 1.0 with an fp32 one. Its cost
        # is elementwise, small beside the matmuls on a CPU; on GPUs, where elementwise work is relatively
        # dearer, it stays in the compute precision.
        self.residual = torch.float32 if self.device.type == "cpu" else dtype
        cpu_fp32 = self.device.type == "cpu" and dtype == torch.float32
        self.linear = _cpu_fp32_linear() if cpu_fp32 else _linear
        # Long single pairs on CPU, fp32 and bf16: GEMMs through oneDNN (see _gemm_attention).
        self.gemm_attention = (
            self.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _onednn_linear_agrees(dtype)
        )
        self.varlen_attn = _varlen_attn_function() if self.backend == VARLEN_ATTN else None

        def param(t: torch.Tensor | None, to: torch.dtype = dtype) -> torch.Tensor | None:
            return None if t is None else t.detach().to(self.device, to).contiguous()

        def lin(module: Any, to: torch.dtype = dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
            weight = param(module.weight, to)
            assert weight is not None
            return weight, param(getattr(module, "bias", None), to)

        base = model.model
        self.embeddings = lin(base.embeddings.tok_embeddings)[0]
        self.emb_norm = lin(base.embeddings.norm, self.residual)
        layer_types = self._layer_types(config)
        self.layers: list[_Layer] = []
        for i, layer in enumerate(base.layers):
            is_global = layer_types[i] == "full_attention"
            self.layers.append(
                _Layer(
                    attn_norm=None
                    if isinstance(layer.attn_norm, torch.nn.Identity)
                    else lin(layer.attn_norm, self.residual),
                    wqkv=lin(layer.attn.Wqkv),
                    wo=lin(layer.attn.Wo),
                    mlp_norm=lin(layer.mlp_norm, self.residual),
                    wi=lin(layer.mlp.Wi),
                    mlp_wo=lin(layer.mlp.Wo),
                    half_window=None if is_global else self.half_window,
                    rope=layer_types[i],
                )
            )
        # The final norm, pooling and the scoring head in fp32 whatever the encoder's precision: a negligible
        # share of the work, and the logit keeps fp32's resolution (bf16 rounds logits between 4 and 8 to
        # steps of 0.03, so close candidates would tie and request order would rank them).
        self.final_norm = lin(base.final_norm, torch.float32)
        self.head_dense = lin(model.head.dense, torch.float32)
        self.head_norm = lin(model.head.norm, torch.float32)
        self.classifier = lin(model.classifier, torch.float32)
        # Rotary inverse frequencies per layer type, in float32 (tables are grown on demand).
        self.inv_freq: dict[str, tuple[torch.Tensor, float]] = {}
        for layer_type in set(layer_types):
            self.inv_freq[layer_type] = self._inv_freq(config, base, layer_type)
        self._rope_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, model_dir: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> PackedModernBert:
        """Load a saved transformers ModernBertForSequenceClassification checkpoint folder."""
        model = read_checkpoint(model_dir)
        if model is None:
            import transformers
            from transformers import ModernBertForSequenceClassification

            transformers.utils.logging.disable_progress_bar()
            model = ModernBertForSequenceClassification.from_pretrained(
                model_dir, dtype=torch.float32, attn_implementation="eager"
            ).eval()
        engine = cls(model, device=device, dtype=dtype)
        del model
        return engine

    @staticmethod
    def _layer_types(config: Any) -> list[str]:
        n = int(config.num_hidden_layers)
        types = getattr(config, "layer_types", None)
        if types:
            return [str(t) for t in types][:n]
        every = int(getattr(config, "global_attn_every_n_layers", 3))
        return ["full_attention" if i % every == 0 else "sliding_attention" for i in range(n)]

    def _inv_freq(self, config: Any, base: Any, layer_type: str) -> tuple[torch.Tensor, float]:
        rope_parameters = getattr(config, "rope_parameters", None) or {}
        params = rope_parameters.get(layer_type) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            # Scaled rotary variants: take the frequencies transformers computed for this config.
            rotary = base.rotary_emb
            inv = getattr(rotary, f"{layer_type}_inv_freq").detach().float()
            return inv.to(self.device), float(getattr(rotary, f"{layer_type}_attention_scaling", 1.0))
        theta: Any = params.get("rope_theta")
        if theta is None:  # configs written before rope_parameters
            key = "global_rope_theta" if layer_type == "full_attention" else "local_rope_theta"
            theta = getattr(config, key, 160000.0 if layer_type == "full_attention" else 10000.0)
        dim = self.head_dim
        inv = 1.0 / (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        return inv.to(self.device), 1.0

    def _rope(self, layer_type: str, positions: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, 1, 1, D/2] in the compute dtype for these positions (both halves of transformers'
        cat((freqs, freqs)) are equal, so the table keeps one; it grows by powers of 2)."""
        table = self._rope_tables.get(layer_type)
        if table is None or table[0].shape[0] < max_len:
            size = 1 << max(10, math.ceil(math.log2(max(max_len, 1))))
            inv, scaling = self.inv_freq[layer_type]
            freqs = torch.arange(size, device=self.device, dtype=torch.float32)[:, None] * inv[None, :]
            # Cast as transformers does: cos/sin in float32, then to the activations' dtype.
            table = ((freqs.cos() * scaling).to(self.dtype), (freqs.sin() * scaling).to(self.dtype))
            self._rope_tables[layer_type] = table
        return table[0][positions][:, None, None, :], table[1][positions][:, None, None, :]

    # -- forward --------------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden,), weight[0], weight[1], self.eps)

    @torch.inference_mode()
    def forward_packed(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """input_ids: int64 [total_tokens] on self.device, pairs end to end; cu_seqlens: int32 [pairs+1]
        cumulative offsets (0, l0, l0+l1, ...). Returns float32 [pairs] logits (the first head column)."""
        if input_ids.dim() != 1 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("input_ids must be [total_tokens] and cu_seqlens [pairs+1] with at least one pair")
        cu_host = cu_seqlens.detach().to("cpu", torch.int64)
        lengths_host = cu_host[1:] - cu_host[:-1]
        total = int(cu_host[-1])
        if int(cu_host[0]) != 0 or total != input_ids.numel() or bool((lengths_host < 1).any()):
            raise ValueError("cu_seqlens must start at 0, increase strictly and end at len(input_ids)")
        device = self.device
        ids = input_ids.to(device)
        cu = cu_host.to(device)
        lengths = lengths_host.to(device)
        max_len = int(lengths_host.max())
        pair_of_token = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
        positions = torch.arange(total, device=device) - cu[:-1][pair_of_token]

        h = self._norm(F.embedding(ids, self.embeddings).to(self.residual), self.emb_norm)
        ropes = {t: self._rope(t, positions, max_len) for t in self.inv_freq}
        plan = self._plan(cu_host, lengths_host, total) if self.backend == BLOCKED else None
        cu32 = cu.to(torch.int32)

        for layer in self.layers:
            x = (h if layer.attn_norm is None else self._norm(h, layer.attn_norm)).to(self.dtype)
            qkv = self.linear(x, layer.wqkv).view(total, 3, self.heads, self.head_dim)
            cos, sin = ropes[layer.rope]
            qk = self._rotate(qkv[:, :2], cos, sin)
            q, k, v = qk[:, 0], qk[:, 1], qkv[:, 2]
            del qk
            del qkv
            attn = self._attention(q, k, v, layer.half_window, cu32, max_len, plan)
            del q, k, v
            h = h + self.linear(attn.reshape(total, self.hidden), layer.wo)
            del attn
            gate_in, gate = self.linear(self._norm(h, layer.mlp_norm).to(self.dtype), layer.wi).chunk(2, dim=-1)
            h = h + self.linear(self.act(gate_in) * gate, layer.mlp_wo)

        # fp32 from here (see __init__). The norm acts on each token alone, so [CLS] pooling normalises its rows only.
        if self.pooling == "cls":
            pooled = self._norm(h[cu[:-1]].float(), self.final_norm)
        else:
            pooled = torch.zeros(lengths.numel(), self.hidden, device=device, dtype=torch.float32)
            pooled.index_add_(0, pair_of_token, self._norm(h.float(), self.final_norm))
            pooled /= lengths[:, None].float()
        pooled = self._norm(self.head_act(_linear(pooled, self.head_dense)), self.head_norm)
        logits: torch.Tensor = _linear(pooled, self.classifier)[:, 0]
        return logits

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of q and k (x [N, 2, H, D]): x * cos + rotate_half(x) * sin, i.e.
        (x1 c - x2 s, x2 c + x1 s) over the two halves, in the activations' dtype. (transformers
        computes it in float32 and rounds once; in bf16 the float round trip took a quarter of a
        16 x 256-token forward on CPU, for a difference far inside bf16's own error.)"""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        first, second = out[..., :half], out[..., half:]
        torch.mul(x1, cos, out=first)
        first.addcmul_(x2, sin, value=-1.0)
        torch.mul(x2, cos, out=second)
        second.addcmul_(x1, sin)
        return out

    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        half_window: int | None,
        cu32: torch.Tensor,
        max_len: int,
        plan: _Plan | None,
    ) -> torch.Tensor:
        """Attention of packed q, k, v [N, H, D] -> [N, H, D]."""
        if self.backend == VARLEN_ATTN:
            assert self.varlen_attn is not None
            out: torch.Tensor = self.varlen_attn(
                q.contiguous(),
                k.contiguous(),
                v.contiguous(),
                cu32,
                cu32,
                max_len,
                max_len,
                scale=self.scale,
                window_size=flash_window(half_window),
            )
            return out
        if self.backend == FLASH_FORWARD:
            args, kwargs = flash_forward_arguments(
                q.contiguous(), k.contiguous(), v.contiguous(), cu32, max_len, self.scale, half_window
            )
            return _flash_attention_forward(*args, **kwargs)
        assert plan is not None
        out = torch.empty_like(q)
        if half_window is None:
            self._unwindowed(q, k, v, out, plan.every_pair)
        else:
            self._unwindowed(q, k, v, out, plan.short_pairs)
            if plan.blocks is not None:
                self._windowed(q, k, v, out, plan.blocks)
        return out

    def _plan(self, cu_host: torch.Tensor, lengths_host: torch.Tensor, total: int) -> _Plan:
        starts = cu_host[:-1]
        short = lengths_host <= self.half_window + 1
        has_local = any(layer.half_window is not None for layer in self.layers)
        return _Plan(
            every_pair=self._groups(starts, lengths_host, total),
            short_pairs=self._groups(starts[short], lengths_host[short], total) if has_local else [],
            blocks=self._plan_blocks(cu_host, lengths_host, total) if has_local else None,
        )

    def _groups(self, starts: torch.Tensor, lengths: torch.Tensor, total: int) -> list[_Group]:
        """Pairs in length order, cut where a length exceeds the group's first by GROUP_SLACK."""
        order = torch.argsort(lengths, stable=True).tolist()
        starts_list, lengths_list = starts.tolist(), lengths.tolist()
        groups: list[_Group] = []
        i = 0
        while i < len(order):
            limit = lengths_list[order[i]] * (1 + GROUP_SLACK) + GROUP_ALLOWANCE
            j = i + 1
            while j < len(order) and lengths_list[order[j]] <= limit:
                j += 1
            members = order[i:j]
            i = j
            longest = lengths_list[members[-1]]
            first = starts_list[members[0]]
            if all(lengths_list[m] == longest and starts_list[m] == first + n * longest for n, m in enumerate(members)):
                # Equal lengths, end to end (as score's length order lays them): a view, no copies.
                groups.append(_Group(start=first, shape=(len(members), longest)))
                continue
            group_starts = torch.tensor([starts_list[m] for m in members])
            group_lengths = torch.tensor([lengths_list[m] for m in members])
            offsets = torch.arange(longest)[None, :]
            index = (group_starts[:, None] + offsets).clamp(max=total - 1).reshape(-1).to(self.device)
            real = offsets < group_lengths[:, None]  # [pairs, longest]
            equal = bool(real.all())
            groups.append(
                _Group(
                    start=-1,
                    shape=(len(members), longest),
                    index=index,
                    mask=None if equal else real[:, None, None, :].to(self.device),
                    keep=None if equal else real.reshape(-1).to(self.device),
                )
            )
        return groups

    def _unwindowed(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, groups: list[_Group]
    ) -> None:
        """SDPA per group of pairs: a lone pair without a mask (the fused CPU kernel, no T x T buffer)."""
        for group in groups:
            pairs, longest = group.shape
            shape = (pairs, longest, self.heads, self.head_dim)
            if group.index is None and self.gemm_attention and longest >= GEMM_ATTENTION_MIN:
                for n in range(pairs):
                    rows = slice(group.start + n * longest, group.start + (n + 1) * longest)
                    self._gemm_attention(q[rows], k[rows], v[rows], out[rows])
                continue
            if group.index is None:
                # [pairs * L, H, D] -> [pairs, H, L, D]: the fused CPU kernel takes 4-D inputs only
                # (3-D ones fall back to the math path, which builds the T x T scores).
                rows = slice(group.start, group.start + pairs * longest)
                o = F.scaled_dot_product_attention(
                    q[rows].view(shape).transpose(1, 2),
                    k[rows].view(shape).transpose(1, 2),
                    v[rows].view(shape).transpose(1, 2),
                    scale=self.scale,
                )
                out[rows] = o.transpose(1, 2).reshape(-1, self.heads, self.head_dim)
                continue
            o = F.scaled_dot_product_attention(
                q.index_select(0, group.index).view(shape).transpose(1, 2),
                k.index_select(0, group.index).view(shape).transpose(1, 2),
                v.index_select(0, group.index).view(shape).transpose(1, 2),
                attn_mask=group.mask,
                scale=self.scale,
            )
            o = o.transpose(1, 2).reshape(-1, self.heads, self.head_dim)
            if group.keep is None:
                out.index_copy_(0, group.index, o)
            else:
                out.index_copy_(0, group.index[group.keep], o[group.keep])

    def _gemm_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        """Unmasked attention of one pair (q, k, v, out [L, H, D]) as oneDNN GEMMs, head by head and chunk
        of queries by chunk: scores = q_c Kᵀ, softmax, @ V. A chunk's scores (GEMM_SCORES_BYTES) stay in
        cache between the two products; no T x T buffer. ModernBERT-base, 8192 tokens, 2 Zen 5 cores: 0.66 s a
        layer against 1.10 s in SDPA's fused kernel; in bf16 (scores and softmax in bf16, as SDPA's) 0.55 s
        against 1.22 s."""
        length = q.shape[0]
        chunk = max(64, GEMM_SCORES_BYTES // (q.element_size() * length))
        for head in range(self.heads):
            q_head = q[:, head] * self.scale  # contiguous [L, D]
            k_head = k[:, head].contiguous()  # [L, D]: the "weight" of scores = q Kᵀ
            v_t = v[:, head].t().contiguous()  # [D, L]: the "weight" of out = p V
            for start in range(0, length, chunk):
                scores = _onednn_linear(q_head[start : start + chunk], (k_head, None))
                probabilities = torch.softmax(scores, dim=-1)
                del scores
                out[start : start + chunk, head] = _onednn_linear(probabilities, (v_t, None))

    def _plan_blocks(self, cu_host: torch.Tensor, lengths_host: torch.Tensor, total: int) -> _Blocks | None:
        """Blocks of b = w queries (w = the half window) of every pair longer than w + 1, each with the
        keys [start - w, start + b + w): every query's window lies inside its block's keys, and with
        b <= w no query row is left without a key."""
        w = self.half_window
        long_pairs = lengths_host > w + 1
        if not bool(long_pairs.any()):
            return None
        b = max(1, w)
        keys = b + 2 * w
        starts = cu_host[:-1][long_pairs]
        lengths = lengths_host[long_pairs]
        counts = (lengths + b - 1) // b
        pair = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        first_block = torch.cumsum(counts, 0) - counts
        rank = torch.arange(int(counts.sum())) - first_block[pair]
        block_start = starts[pair] + rank * b  # packed position of each block's first query
        pair_end = (starts + lengths)[pair]
        q_pos = block_start[:, None] + torch.arange(b)[None, :]  # [blocks, b]
        k_pos = block_start[:, None] - w + torch.arange(keys)[None, :]  # [blocks, keys]
        k_in_pair = (k_pos >= starts[pair][:, None]) & (k_pos < pair_end[:, None])
        # Key j of a block holds position start - w + j, query r position start + r: |j - w - r| <= w.
        band = (torch.arange(keys)[None, :] - w - torch.arange(b)[:, None]).abs() <= w  # [b, keys]
        mask = band[None, :, :] & k_in_pair[:, None, :]
        device = self.device
        return _Blocks(
            q_index=q_pos.clamp(max=total - 1).reshape(-1).to(device),
            q_keep=(q_pos < pair_end[:, None]).reshape(-1).to(device),
            k_index=k_pos.clamp(0, total - 1).reshape(-1).to(device),
            mask=mask.unsqueeze(1).to(device),
            block=b,
            keys=keys,
        )

    def _windowed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, blocks: _Blocks) -> None:
        """Blocked window attention of the long pairs, all blocks in one SDPA call."""
        n_blocks = blocks.mask.shape[0]
        h, d = self.heads, self.head_dim
        qb = q.index_select(0, blocks.q_index).view(n_blocks, blocks.block, h, d).transpose(1, 2)
        kb = k.index_select(0, blocks.k_index).view(n_blocks, blocks.keys, h, d).transpose(1, 2)
        vb = v.index_select(0, blocks.k_index).view(n_blocks, blocks.keys, h, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=blocks.mask, scale=self.scale)
        o = o.transpose(1, 2).reshape(-1, h, d)
        out.index_copy_(0, blocks.q_index[blocks.q_keep], o[blocks.q_keep])

    def release_memory(self, tokens: int) -> None:
        """After a run of `tokens` on a CPU, return freed activation memory to the system where the run was
        long enough to matter (RELEASE_AFTER_TOKENS): glibc keeps freed blocks below its mmap threshold (up
        to 32 MiB, so most activations) in its arenas, and malloc_trim (a few ms) hands them back
        (ModernBERT-base, one 8192-token pair: RSS held +0.4 GiB after the call without it). GPUs keep
        CUDA's caching allocator: a card serves one model, and re-allocating each run would cost more."""
        if self.device.type != "cpu" or tokens < RELEASE_AFTER_TOKENS:
            return
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)
