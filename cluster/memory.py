"""How much memory each actor of a run needs, computed from the model size and the run config.

An estimate written down once (the formulas are in ``docs/gpu-cluster.md``), used by ``pararl doctor``
before any GPU time is spent and by ``python -m cluster.memory CONFIG`` to print the table. Counted:
weights, fp32 master weights and Adam states, gradients (ZeRO partitions what its stage partitions),
the frozen reference, activations of one micro-batch with and without gradient checkpointing, the
logits (over the whole sequence: the policy's head runs on every position) and the float32 copies
the samplers and estimators make of the two output spans. Not counted: allocator fragmentation
beyond a fixed slack, and NCCL buffers beyond it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from learner.batch import rows_per_trajectory
from learner.config import uses_reference
from pararl.formats import mmada_m_format
from pararl.guidance import make_guidance
from pararl.models.config import LLaDAConfig, parameter_count
from rollout.config import resolve_sampler

GiB = float(1 << 30)
CUDA_SLACK = 2.0 * GiB  # CUDA context, NCCL and allocator slack per GPU process
ZERO3_LIVE_PARAMS = 1e9  # DeepSpeed's stage3_max_live_parameters default: gathered parameters in flight


@dataclass
class Shapes:
    """What the estimate needs to know about the model and one sequence."""

    params: int
    d_model: int
    n_layers: int
    ffn: int
    vocab: int  # logits columns (embedding_size)
    text_vocab: int
    codebook: int
    seq_len: int  # longest sequence: prompt + input image (editing) + output
    text_len: int
    image_span: int

    @classmethod
    def of(cls, config: LLaDAConfig, seq_len: int, text_len: int, image_span: int, text_vocab: int = 126464,
           codebook: int = 8192) -> "Shapes":
        return cls(parameter_count(config), config.d_model, config.n_layers, config.ffn_hidden_size,
                   config.output_size, text_vocab, codebook, seq_len, text_len, image_span)


def sequence_length(output_len: int, image_span: int, prompt_tokens: int = 128, editing: bool = True) -> int:
    """Prompt (template + instruction) + the input image span with its two markers when editing + output."""
    return prompt_tokens + (image_span + 2 if editing else 0) + output_len


@dataclass
class Estimate:
    actor: str
    parts: dict[str, float] = field(default_factory=dict)  # bytes

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def line(self) -> str:
        items = ", ".join(f"{k} {v / GiB:.1f}" for k, v in self.parts.items() if v)
        return f"{self.actor}: {self.total / GiB:.1f} GiB ({items})"


def _block_bytes_per_token(s: Shapes, wbytes: int) -> float:
    """Tensors one block keeps for its backward: norms, q/k/v, attention output, the SwiGLU intermediates."""
    return (9 * s.d_model + 4 * s.ffn) * wbytes + 8 * s.d_model


def _span_bytes(s: Shapes, rows: int, copies: int) -> float:
    """Float32 copies of the restricted span logits (text over the text vocabulary, image over the codebook)."""
    return copies * 4.0 * rows * (s.text_len * s.text_vocab + s.image_span * s.codebook)


def _head_bytes(s: Shapes, rows: int, wbytes: int) -> float:
    """The span heads' logits (``pararl.heads``): output positions only, each over its span's ids."""
    return rows * (s.text_len * s.text_vocab + s.image_span * s.codebook) * wbytes


def _inference_bytes(s: Shapes, rows: int, wbytes: int, copy_rows: int = 0, copies: int = 0) -> float:
    """One forward without gradients: the span logits, and the larger of one block's intermediates over
    the residual stream and the float32 copies made of the logits after the forward (``copies`` of
    ``copy_rows`` rows). The two are never alive together: ``pararl plan`` measures the peak at the larger."""
    per_token = (2 * s.d_model + 4 * s.d_model + 3 * s.ffn) * wbytes
    return _head_bytes(s, rows, wbytes) + max(rows * s.seq_len * per_token, _span_bytes(s, copy_rows, copies))


def adapter_params(config: LLaDAConfig, lora: Any) -> int:
    """Parameters of the LoRA adapters (``pararl.lora``): rank x (inputs + outputs) per adapted linear map."""
    if not lora.enabled:
        return 0
    d, f = config.d_model, config.ffn_hidden_size
    kv = config.kv_heads * (d // config.n_heads)
    shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "attn_out": (d, d), "ff_proj": (d, f),
              "up_proj": (d, f), "ff_out": (f, d)}
    return config.n_layers * sum(lora.rank * sum(shapes[t]) for t in lora.targets)


def learner_rank(s: Shapes, lc: Any, ranks: int, windows: int, adapters: int = 0) -> Estimate:
    """One DeepSpeed rank: ZeRO-partitioned states, one micro-batch's activations, the reference. Under
    LoRA (``adapters`` parameters) the optimizer state and gradients are the adapters' and the reference
    is the base itself."""
    z, n, p = lc.zero_stage, max(1, ranks), s.params
    trained = adapters or p
    w = 2 if lc.precision in ("bf16", "fp16") else 4
    part = lambda nbytes, stage: nbytes / n if z >= stage else nbytes  # noqa: E731
    e = Estimate("learner rank")
    e.parts["weights"] = part(w * (p + adapters), 3)
    e.parts["fp32 master + Adam"] = part((12 if w == 2 else 8) * trained, 1)
    e.parts["gradients"] = part(w * trained, 2) + (part(4 * trained, 1) if w == 2 else 0)  # + fp32 partition (bf16)
    e.parts["ZeRO-3 gathered params"] = min(p, ZERO3_LIVE_PARAMS) * w if z == 3 else 0.0
    rows = lc.micro_batch_size * windows
    tokens = rows * s.seq_len
    if lc.gradient_checkpointing:
        act = s.n_layers * tokens * s.d_model * w + 2 * tokens * _block_bytes_per_token(s, w)
    else:
        act = (s.n_layers + 1) * tokens * _block_bytes_per_token(s, w)
    act += 2 * _head_bytes(s, rows, w) + _span_bytes(s, rows, 2)  # span logits and their gradient, fp32 log-softmax
    reference = uses_reference(lc)
    ref_weights = w * p if reference and not adapters else 0.0  # LoRA: the base with the adapters off
    ref_act = _inference_bytes(s, rows, w, rows, 1) if reference else 0.0
    e.parts["activations (peak)"], resident = activation_peak(lc, act, ref_weights, ref_act)
    if resident is not None:
        e.parts["reference"] = resident
    e.parts["CUDA slack"] = CUDA_SLACK
    return e


def activation_peak(lc: Any, act: float, ref_weights: float, ref_act: float) -> tuple[float, float | None]:
    """A learner rank's peak beside its states, from the update's activations and the reference's weights
    and forward (0 without one), and the reference's weights kept on the GPU all along (None when
    ``reference_offload`` brings them only while its log-probs are computed: they share the peak)."""
    if uses_reference(lc) and lc.reference_offload:
        return max(act, ref_weights + ref_act), None
    return max(act, ref_act), ref_weights


def rollout_worker(s: Shapes, trajectories: int, rows_per_trajectory: int, windows: int, wbytes: int = 2,
                   chunk_rows: int | None = None) -> Estimate:
    """A sampling policy in bf16: the batched sampler's largest forward (``rows_per_trajectory`` rows per
    trajectory: CFG rows included) or one forward of the behaviour log-probs (``chunk_rows`` rows)."""
    e = Estimate("rollout worker")
    e.parts["weights"] = wbytes * s.params
    rows = trajectories * rows_per_trajectory
    sampling = _inference_bytes(s, rows, wbytes, trajectories, 3)  # softmax, cdf, tempered copy
    chunk = min(trajectories * windows, chunk_rows or trajectories * windows)
    logprobs = _inference_bytes(s, chunk, wbytes, chunk, 2)
    e.parts["activations (peak)"] = max(sampling, logprobs)
    e.parts["CUDA slack"] = CUDA_SLACK
    return e


def colocated_rank(train: Estimate, roll: Estimate, offload: bool, gpu: bool) -> list[Estimate]:
    """A colocated rank's two phases on its GPU: the update (the learner rank's estimate), and sampling,
    where the training weights are the sampler's, the gradient buffers stay, and the optimizer state
    is in host memory under ``colocate_offload``."""
    training = Estimate("colocated rank, training", dict(train.parts))
    sampling = Estimate("colocated rank, sampling")
    sampling.parts["weights"] = train.parts["weights"]
    if not (offload and gpu):
        sampling.parts["fp32 master + Adam"] = train.parts["fp32 master + Adam"]
    sampling.parts["gradients"] = train.parts["gradients"]
    sampling.parts["reference"] = train.parts.get("reference", 0.0)
    sampling.parts["activations (peak)"] = roll.parts["activations (peak)"]
    sampling.parts["CUDA slack"] = CUDA_SLACK
    return [training, sampling]


def reward_replica(images: int, image_size: tuple[int, int], weights_bytes: float, top_channels: int = 128) -> Estimate:
    """Image tokenizer + reward models, and the VQ decoder's full-resolution feature maps for a batch."""
    e = Estimate("reward replica")
    e.parts["weights"] = weights_bytes
    e.parts["VQ decode activations"] = images * top_channels * image_size[0] * image_size[1] * 4.0 * 6
    e.parts["CLIP activations"] = 1.0 * GiB
    e.parts["CUDA slack"] = CUDA_SLACK
    return e


def host_memory(s: Shapes, lc: Any, learner_ranks: int, rollout_workers: int, reward_weights: float, replicas: int,
                offloaded: float = 0.0) -> float:
    """Host RAM at start-up, when every actor loads at once: each learner rank reads the policy in
    float32 before DeepSpeed partitions it, an offloaded reference stays in host RAM, rollout workers
    read their copy before moving it to the GPU; ``offloaded``: optimizer state colocated ranks move
    to host memory while they sample."""
    reference = uses_reference(lc) and lc.reference_offload and not lc.lora.enabled
    w = 2 if lc.precision in ("bf16", "fp16") else 4
    per_rank = 4 * s.params + (w * s.params if reference else 0)
    return learner_ranks * per_rank + rollout_workers * 2 * s.params + replicas * reward_weights + offloaded


def preset_shapes(preset: str, text_len: int) -> tuple[int, int, int, int]:
    """(output length, image span, text vocabulary, codebook) of a released layout at 512x512 (32x32 codes),
    for an estimate made without the model folder. -M's come from its format object; -A's format needs
    its tokenizer to exist, so its lengths are written out (its 32 rows of 33: codes plus a row end)."""
    if preset == "mmada-parallel-a":
        return 2 + 1056 + 1 + text_len + 1, 1056, 126356, 8192
    fmt = mmada_m_format()
    return len(fmt.output_ids(text_len)[0]), fmt.image_span_len, fmt.text_vocab_size, fmt.codebook_size


def estimate_run(cfg: Any, config: LLaDAConfig, output_len: int, image_span: int, image_size: tuple[int, int] = (512, 512),
                 reward_weights: float = 2.5 * GiB, prompt_tokens: int = 128, text_vocab: int = 126464,
                 codebook: int = 8192) -> tuple[list[Estimate], float, Shapes]:
    """Per-actor GPU estimates and the host RAM of a run config (``cluster.run_config.RunConfig``)."""
    s = Shapes.of(config, sequence_length(output_len, image_span, prompt_tokens), cfg.sampler.text_len, image_span,
                  text_vocab, codebook)
    c, lc, r = cfg.cluster, cfg.learner, cfg.reward
    windows = replay_rows(cfg)
    prompts = prompts_per_worker(cfg)
    cfg_rows = forward_rows(cfg.sampler)
    wbytes = 2 if lc.precision in ("bf16", "fp16") else 4
    train = learner_rank(s, lc, c.learner_ranks, windows, adapter_params(config, lc.lora))
    roll = rollout_worker(s, prompts * cfg.data.group_size, cfg_rows, windows, wbytes if c.colocate else 2,
                          c.rollout_logprob_chunk_rows)
    reward = reward_replica(r.max_batch_size * r.sampled_steps, image_size, reward_weights)
    if c.colocate:
        gpu = c.learner_gpus > 0
        offloaded = c.learner_ranks * train.parts["fp32 master + Adam"] if c.colocate_offload and gpu else 0.0
        host = host_memory(s, lc, c.learner_ranks, 0, reward_weights, r.replicas, offloaded)
        return [*colocated_rank(train, roll, c.colocate_offload, gpu), reward], host, s
    host = host_memory(s, lc, c.learner_ranks, c.rollout_workers, reward_weights, r.replicas)
    return [train, roll, reward], host, s


def one_node(cfg: Any, estimates: list[Estimate], gpu_bytes: float, node_gpus: int) -> tuple[bool, str]:
    """Whether the run fits one node of ``node_gpus`` GPUs of ``gpu_bytes``, and the line that says why.
    Ray packs fractional GPUs, so a reward replica whose share fits beside a colocated rank's runs on
    that rank's GPU and adds its memory there."""
    from cluster.placement import required

    c, r = cfg.cluster, cfg.reward
    need = required(c, r)["GPU"]
    peak = {e.actor: e.total for e in estimates}
    rank = max(v for k, v in peak.items() if k != "reward replica")
    shared = c.colocate and 0 < r.gpus_per_replica and c.learner_gpus + r.gpus_per_replica <= 1 + 1e-9
    worst = rank + (peak["reward replica"] if shared and r.replicas else 0.0)
    gpus = f"{need:g} of {node_gpus} GPUs"
    if need > node_gpus + 1e-9:
        return False, f"needs {gpus}"
    if worst > gpu_bytes:
        where = "a GPU shared by a colocated rank and a reward replica" if shared else "the largest actor"
        return False, f"{gpus}, but {where} needs {worst / GiB:.1f} GiB of {gpu_bytes / GiB:.0f}"
    return True, f"{gpus}, at most {worst / GiB:.1f} GiB of {gpu_bytes / GiB:.0f} on one GPU" + \
        (" (a colocated rank with a reward replica beside it)" if shared else "")


def prompts_per_worker(cfg: Any) -> int:
    """The most prompts one rollout worker (or colocated rank) samples in a step."""
    return -(-cfg.data.prompts_per_step // cfg.cluster.rollout_workers)


def replay_rows(cfg: Any) -> int:
    """Rows per trajectory in a log-prob forward: its replay windows, each with the guidance's
    unconditional rows beside it when the learner scores under the sampled distribution."""
    windows = rows_per_trajectory(cfg.learner, cfg.reward.sampled_steps, cfg.sampler.steps)
    if cfg.learner.scoring == "sampled":
        windows *= 1 + make_guidance(resolve_sampler(cfg.sampler)).rows
    return windows


def forward_rows(sampler: Any) -> int:
    """Rows per trajectory in the sampler's largest forward: with the -A guidance the two unconditional
    rows go through a forward of their own at image updates; otherwise one rides with the condition."""
    g = make_guidance(resolve_sampler(sampler))
    return max(1 + g.with_cond, len(g.after_text))


def largest_rollout_batch(cfg: Any, s: Shapes, gpu_bytes: float = 80e9) -> int:
    """The most trajectories one rollout worker holds on a GPU of ``gpu_bytes`` with this config's rows."""
    n, windows = 0, replay_rows(cfg)
    while rollout_worker(s, n + 1, forward_rows(cfg.sampler), windows, 2, cfg.cluster.rollout_logprob_chunk_rows).total <= gpu_bytes:
        n += 1
    return n


def markdown_table(estimates: list[Estimate]) -> str:
    keys: list[str] = []
    for e in estimates:
        keys += [k for k in e.parts if k not in keys]
    head = "| actor | " + " | ".join(keys) + " | total |"
    rule = "| --- " * (len(keys) + 2) + "|"
    rows = ["| " + e.actor + " | " + " | ".join(f"{e.parts[k] / GiB:.1f}" if e.parts.get(k) else "-" for k in keys)
            + f" | **{e.total / GiB:.1f}** |" for e in estimates]
    return "\n".join([head, rule, *rows])


def main(argv: list[str] | None = None) -> int:
    """``python -m cluster.memory CONFIG [key=value ...]``: the table for an 8B policy in the layout of
    the config's ``sampler.preset``."""
    import sys

    from cluster.run_config import load_run_config
    from pararl.errors import ConfigError
    from pararl.models.config import llada_8b_config

    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: python -m cluster.memory CONFIG [key=value ...]")
    try:
        cfg = load_run_config(args[0], args[1:])
    except (ConfigError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    preset = cfg.sampler.preset
    if preset not in ("mmada-parallel-a", "mmada-parallel-m"):
        raise SystemExit(f"sampler.preset is {preset!r}: the table is for the released 8B layouts "
                         "(mmada-parallel-a, mmada-parallel-m)")
    out_len, span, vocab, codebook = preset_shapes(preset, cfg.sampler.text_len)
    estimates, host, s = estimate_run(cfg, llada_8b_config(embedding_size=134656), out_len, span,
                                      text_vocab=vocab, codebook=codebook)
    print(f"{preset}: {s.params / 1e9:.2f}B parameters, longest sequence {s.seq_len} tokens (GiB per GPU)\n")
    print(markdown_table(estimates))
    print(f"\nhost RAM at start-up, whole cluster: {host / GiB:.0f} GiB")
    fits, why = one_node(cfg, estimates, 80e9, 8)
    print(f"one node of 8 x 80 GB GPUs: {'fits' if fits else 'does not fit'} ({why})")
    if not cfg.cluster.colocate:
        print(f"largest rollout batch on one 80 GB GPU: {largest_rollout_batch(cfg, s)} trajectories per worker")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
