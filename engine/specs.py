"""Frozen value objects shared by the whole engine.

Everything the calculator needs is described by three small records:

* :class:`ModelSpec` -- the shape of a model as a flat list of :class:`TensorSpec`
  (one entry per stored tensor, with its role and layer), built from a ``config.json``;
* :class:`QuantSpec` -- a storage format (fp16, bitsandbytes nf4, HQQ 3-bit, GGUF Q4_K_M, ...);
* :class:`RuntimeSpec` / :class:`TrainingSpec` -- what is done with the model.

All sizes are integer bytes; conversion to GiB/GB happens only for display (see :mod:`engine.units`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import Optional

# Tensor roles, used for the breakdown shown to users.
ROLES = ("embedding", "attention", "mlp", "experts", "router", "norm", "lm_head")


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor of a model.

    ``name`` is the Hugging Face state-dict name (``model.layers.3.self_attn.q_proj.weight``);
    ``gguf`` is llama.cpp's base name for the same tensor (``attn_q``), used by the GGUF mixing rules.
    ``linear`` marks weights of ``nn.Linear`` modules: the only ones bitsandbytes/HQQ/GPTQ/AWQ replace.
    Shapes follow PyTorch: ``(out_features, in_features)`` for linear weights, ``(experts, out, in)`` for
    fused expert weights.
    """

    name: str
    role: str
    shape: tuple[int, ...]
    gguf: str
    layer: Optional[int] = None
    linear: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def module(self) -> str:
        """The owning module's name (``model.layers.3.self_attn.q_proj``)."""
        return self.name.rsplit(".", 1)[0]


@dataclass(frozen=True)
class ModelSpec:
    """A model's architecture, reduced to what memory depends on."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    tensors: tuple[TensorSpec, ...]
    num_experts: int = 0
    experts_per_token: int = 0
    max_position_embeddings: int = 0
    # Per layer: the sliding-window length of its attention, or 0 for full attention.
    sliding_windows: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"
    source: str = "preset"  # preset | local | hub | params
    approximate: bool = False
    note: str = ""

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)

    def params_by_role(self) -> dict[str, int]:
        out = {r: 0 for r in ROLES}
        for t in self.tensors:
            out[t.role] = out.get(t.role, 0) + t.numel
        return out

    @property
    def active_params(self) -> int:
        """Parameters used per token: all but the experts not routed to (MoE); equals ``params`` otherwise."""
        if not self.num_experts:
            return self.params
        experts = sum(t.numel for t in self.tensors if t.role == "experts")
        return self.params - experts + experts * self.experts_per_token // self.num_experts

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def window(self, layer: int) -> int:
        return self.sliding_windows[layer] if self.sliding_windows else 0


@dataclass(frozen=True)
class QuantSpec:
    """A storage format for the weights.

    ``method`` is one of ``fp32 fp16 bf16 int8 bnb4 hqq gptq awq gguf``.
    ``dtype`` is the 16-bit type of everything the method leaves unquantized (embeddings, norms,
    lm_head, biases) and of HQQ/GPTQ/AWQ scales.
    """

    method: str
    bits: Optional[int] = None
    group_size: Optional[int] = None
    quant_type: Optional[str] = None  # nf4 | fp4 (bnb4); GGUF file type name (gguf), e.g. Q4_K_M
    double_quant: bool = False
    dtype: str = "bfloat16"
    skip_modules: tuple[str, ...] = ()
    label: str = ""
    fast: bool = False  # the engine's fast decode path (engine.backends.runners); storage is unchanged

    @property
    def name(self) -> str:
        return self.label or self.method


@dataclass(frozen=True)
class RuntimeSpec:
    """How the model is run: context, batch, KV-cache type, device and fixed overhead."""

    context: int = 4096
    batch: int = 1
    kv_dtype: str = "auto"  # auto (= the model's 16-bit dtype) | fp32 | fp16 | bf16 | fp8 | q8_0 | q4_0
    device: str = "cuda"  # cuda | cpu | mps
    overhead_bytes: Optional[int] = None  # None -> the documented default of the device
    # LLM.int8 only: the share (0..1) of a layer's input columns holding a value at or above its outlier threshold
    # (6.0), in the layer where that costs the most -- a property of the model and the prompt, not of the shapes.
    # 1.0 = every column: the upper bound (engine.memory.activation_bytes).
    int8_outlier_share: float = 1.0


@dataclass(frozen=True)
class TrainingSpec:
    """What training adds. ``mode`` inference adds nothing."""

    mode: str = "inference"  # inference | lora | qlora | full
    optimizer: str = "adamw"  # adamw | adamw8bit | sgd
    precision: str = "mixed"  # full fine-tune: mixed (fp32 master + 16-bit compute) | bf16 (pure 16-bit) | fp32
    lora_rank: int = 16
    # "all-linear" = every nn.Linear inside the decoder blocks (peft's target_modules="all-linear").
    lora_targets: tuple[str, ...] = ("all-linear",)
    gradient_checkpointing: bool = True


@dataclass(frozen=True)
class HardwareSpec:
    """A memory pool the model must fit in."""

    name: str
    memory_bytes: int
    kind: str = "gpu"  # gpu | apple | cpu
    bandwidth_bytes_per_s: int = 0
    note: str = ""


@dataclass
class MemoryEstimate:
    """The calculator's answer, in bytes. ``total_bytes`` is the sum of the parts."""

    model: str
    method: str
    params: int
    active_params: int
    weights_bytes: int
    weights_by_role: dict[str, int]
    quantized_params: int
    kv_cache_bytes: int
    activations_bytes: int
    overhead_bytes: int
    gradients_bytes: int = 0
    optimizer_bytes: int = 0
    trainable_params: int = 0
    approximate: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.kv_cache_bytes + self.activations_bytes + self.overhead_bytes
                + self.gradients_bytes + self.optimizer_bytes)

    @property
    def bits_per_param(self) -> float:
        """Average bits per parameter over the whole model (every byte the weights hold)."""
        return 8 * self.weights_bytes / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        d["bits_per_param"] = round(self.bits_per_param, 4)
        return d
