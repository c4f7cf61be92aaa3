"""Analytic per-GPU training memory: model states per distributed strategy, plus activations.

Why: to pick a strategy before renting GPUs, and to know what a CPU benchmark can and cannot say.
Bytes, per GPU (data parallelism over N GPUs, no tensor/pipeline parallelism).

Model states (ZeRO paper, Rajbhandari et al. 2020, arXiv 1910.02054, section 3.1 and Figure 1):
with Psi trainable parameters under bf16/fp16 mixed-precision AdamW, each parameter costs 2 bytes
of 16-bit weights, 2 of 16-bit gradients and K = 12 of optimizer state (fp32 master weights, fp32
first and second moments): 2 + 2 + 12 = 16 bytes (`32-true`: 4 + 4 + 8, no separate master).
  ddp                       (2 + 2 + K) * Psi                    (paper: baseline)
  deepspeed_zero1           (2 + 2) * Psi + K * Psi / N          (P_os)
  deepspeed_zero2           2 * Psi + (2 + K) * Psi / N          (P_os+g)
  deepspeed_zero3, fsdp     (2 + 2 + K) * Psi / N                (P_os+g+p; FSDP FULL_SHARD is the same
                                                                  partitioning, Zhao et al. 2023 arXiv 2304.11277)
  deepspeed_zero3_offload   0 on the GPU; (2 + 2 + K) * Psi / N in host memory per rank (ZeRO-Offload /
                            ZeRO-Infinity: optimizer and parameters offloaded to CPU, as LLaVA's
                            zero3_offload.json does)
The paper's Figure 1 example (Psi = 7.5B, N = 64, K = 12): 120, 31.4, 16.6, 1.9 GB; tests check it.
Lightning's `bf16-mixed` (autocast) keeps fp32 weights and gradients instead (4 + 4 + 8): the same
16 bytes per trainable parameter, split differently; the totals above hold for both.

Frozen parameters (vision tower; under LoRA also the base LLM, embeddings and LM head) cost their
16-bit weights only: 2 * Psi_frozen, divided by N where parameters are partitioned (ZeRO-3, FSDP),
in host memory under zero3_offload.

Gathered working set (ZeRO-3, FSDP, offload): partitioned weights are all-gathered one unit at a time
(`train/infra/sharding.py`: a decoder layer; under ZeRO-3 also each other module, e.g. the embedding or the
LM head), the current unit plus one prefetched: 2 * largest_unit * 2 bytes. FSDP's root unit
(everything outside the decoder and vision layers: embeddings, LM head, projector) stays gathered
from the root's forward through its backward: + root * 2 bytes. (DeepSpeed may keep more live:
`stage3_max_live_parameters`.)

Activations (per sample, dense plan, bf16, what this engine's autograd graph saves for backward;
`tests/test_memory.py` checks them against `torch.autograd.graph.saved_tensors_hooks` on a real
forward). With s tokens (s_v visual), hidden h, FFN width m, q width dq = heads * head_dim, a heads,
head_dim dh, L layers, vocabulary V, vision width d_v, n supervised tokens (upper bound: s - s_v):
  per layer  16 s h     two RMSNorms (HF keeps an fp32 copy of the input, 4 bytes; the normalised
                        and the weighted output, 2 + 2; the latter is the projections' input);
                        12 s h under LoRA (a frozen norm weight needs no copy of the normalised input)
           + 4 s dq     Q and the attention output (2 + 2): a dense layer is one causal SDPA call
                        over the whole sequence (no mask; models/decoder.py `_one_sequence`)
           + 4 s dkv    K and V at their own width dkv = kv_heads * head_dim (GQA read natively)
           + 8 s m      SwiGLU: gate output, SiLU output, up output, their product (2 bytes each)
           + 4 s (dh + a)   RoPE cos/sin, fp32 log-sum-exp of the attention
  LoRA adds per adapted linear 2 s r (the rank-r intermediate), and with dropout > 0 the dropped
  input and its mask, 3 s d_in (peft's `lora_dropout`).
  outside layers: projector 2 s_v (d_v + 2 h) (its input, GELU input and output); loss head
  n (8 h + 4 V) (final norm as above, fp32 log-softmax over the vocabulary; 6 h under LoRA). The frozen vision
  tower saves nothing.
  without gradient checkpointing: L * per_layer + outside; with it (one checkpoint per layer, like
  Korthikanti et al. 2022, arXiv 2205.05198, "full recomputation"): each layer's input 2 s h is kept,
  and one layer's activations live again during its backward: L * 2 s h + per_layer + outside.
Not counted: CUDA context and kernels' workspaces (~0.5-1 GB), allocator fragmentation,
communication buffers (DDP's gradient buckets, a full gradient copy unless
`gradient_as_bucket_view`; DeepSpeed's reduce/all-gather buckets, 2e8 elements each under Lightning's
defaults), logits of unsupervised positions (never computed), plans that skip visual work (they
save less; the estimate is the dense upper bound), and LoRA on head/neuron-subset paths (which read
W + BA directly and so keep that weight for backward).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GB = 1e9  # the ZeRO paper's unit; every `*_gb` field is bytes / 1e9

BYTES = {"bf16-mixed": {"params": 2, "grads": 2, "optimizer": 12}, "32-true": {"params": 4, "grads": 4, "optimizer": 8}}


@dataclass(frozen=True)
class Sharding:
    params: bool  # parameters (trainable and frozen) partitioned over the N ranks
    grads: bool
    optimizer: bool
    offload: bool = False  # partitions live in host memory, not on the GPU
    root_gathered: bool = False  # FSDP2: the root unit's parameters stay gathered for the whole step


STRATEGIES = {
    "ddp": Sharding(False, False, False),
    "deepspeed_zero1": Sharding(False, False, True),
    "deepspeed_zero2": Sharding(False, True, True),
    "deepspeed_zero3": Sharding(True, True, True),
    "deepspeed_zero3_offload": Sharding(True, True, True, offload=True),
    "fsdp": Sharding(True, True, True, root_gathered=True),
}


@dataclass(frozen=True)
class ParamCounts:
    trainable: int  # Psi: what the optimizer updates
    frozen: int  # held for forward/backward only
    unit: int  # largest all-gathered unit (a decoder layer, the embedding, ...) for sharded strategies
    root: int = 0  # parameters outside the decoder and vision layers (FSDP's root unit)


@dataclass(frozen=True)
class ActShape:
    """What activation memory depends on (one sample)."""

    seq_len: int
    n_visual: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    head_dim: int
    vocab: int
    vision_hidden: int
    lora_r: int = 0
    lora_inputs: tuple[int, ...] = ()  # input width of each adapted linear in one layer
    lora_dropout: float = 0.0
    kv_heads: int | None = None  # None: as many as `heads` (MHA)
    supervised: int | None = None  # tokens with a loss (the LM head runs on these); None: s - s_v
    frozen_llm: bool = False  # LoRA: frozen norm weights and LM head keep no copy of their input

    def __post_init__(self):
        if not 0 <= self.n_visual < self.seq_len:
            raise ValueError(f"seq_len={self.seq_len} must exceed the {self.n_visual} visual tokens (text needs room)")


def model_states(counts: ParamCounts, strategy: str, n_gpus: int, precision: str = "bf16-mixed") -> dict[str, float]:
    """Per-GPU bytes of parameters, gradients, optimizer states, frozen weights and gathered units,
    and the host bytes per rank under offload (see the module docstring for the formulas)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; one of {sorted(STRATEGIES)}")
    if precision not in BYTES:
        raise ValueError(f"unknown precision {precision!r}; one of {sorted(BYTES)}")
    if n_gpus < 1:
        raise ValueError(f"n_gpus must be >= 1, got {n_gpus}")
    sh, b, psi = STRATEGIES[strategy], BYTES[precision], counts.trainable
    parts = {
        "params": b["params"] * psi / (n_gpus if sh.params else 1),
        "grads": b["grads"] * psi / (n_gpus if sh.grads else 1),
        "optimizer": b["optimizer"] * psi / (n_gpus if sh.optimizer else 1),
        "frozen": b["params"] * counts.frozen / (n_gpus if sh.params else 1),
    }
    host = 0.0
    if sh.offload:
        host = sum(parts.values())
        parts = dict.fromkeys(parts, 0.0)
    gathered = 2 * counts.unit + (counts.root if sh.root_gathered else 0)
    parts["gathered"] = float(gathered * b["params"]) if sh.params else 0.0
    parts["host"] = host
    return parts


def layer_activation_bytes(a: ActShape) -> float:
    s, h, m, dq = a.seq_len, a.hidden, a.ffn, a.heads * a.head_dim
    dkv = (a.kv_heads or a.heads) * a.head_dim
    per = (12 if a.frozen_llm else 16) * s * h + 4 * s * dq + 4 * s * dkv + 8 * s * m + 4 * s * (a.head_dim + a.heads)
    per += sum(2 * s * a.lora_r + (3 * s * d_in if a.lora_dropout > 0 else 0) for d_in in a.lora_inputs)
    return float(per)


def activation_bytes(a: ActShape, gradient_checkpointing: bool) -> float:
    """Peak bytes saved for backward for one sample (formulas in the module docstring)."""
    supervised = a.seq_len - a.n_visual if a.supervised is None else a.supervised
    head = (6 if a.frozen_llm else 8) * a.hidden + 4 * a.vocab
    outside = 2 * a.n_visual * (a.vision_hidden + 2 * a.hidden) + supervised * head
    layer = layer_activation_bytes(a)
    if gradient_checkpointing:
        return a.layers * 2 * a.seq_len * a.hidden + layer + outside
    return a.layers * layer + outside


def estimate(counts: ParamCounts, act: ActShape, strategy: str, n_gpus: int, precision: str = "bf16-mixed",
             micro_batch: int = 1, gradient_checkpointing: bool = True) -> dict:
    """One row: model states + `micro_batch` samples' activations, per GPU, in GB (1e9 bytes)."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    parts = model_states(counts, strategy, n_gpus, precision)
    parts["activations"] = micro_batch * activation_bytes(act, gradient_checkpointing)
    host = parts.pop("host")
    row = {f"{k}_gb": round(v / GB, 3) for k, v in parts.items()}
    row["total_gb"] = round(sum(parts.values()) / GB, 3)
    row["host_gb"] = round(host / GB, 3)
    return {"strategy": strategy, **row}


def counts_dict(counts: ParamCounts) -> dict:
    return asdict(counts)
