"""``pararl doctor CONFIG``: what a run needs, checked before any GPU time is spent.

It reads the config, the model folder (config.json, the weights index against the keys and shapes
the config implies, the tokenizer, the detected token format, the image tokenizer, built for real),
the reward models (resolvable, their weight files present; built with ``--load``), the reward
statistics, the training data, and the cluster Ray sees: CPUs and GPUs against what the placement
will ask for, host memory and, where the GPU size is known, each actor's GPU memory estimate
(``cluster.memory``). It joins Ray exactly as a run would (local, or ``cluster.address``) and starts
no actor. Every problem is one line; the exit code is 2 if there is any.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

ACCELERATOR_GIB = {"H100": 80, "H200": 141, "H800": 80, "A100-80G": 80, "A100-40G": 40, "L40S": 48, "L40": 48,
                   "A10G": 24, "L4": 24, "A6000": 48, "B200": 180, "GH200": 96, "V100": 16}
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class Report:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def ok(self, area: str, message: str) -> None:
        print(f"ok       {area}: {message}")

    def note(self, area: str, message: str) -> None:
        print(f"note     {area}: {message}")

    def problem(self, area: str, message: str) -> None:
        line = f"{area}: {message}"
        self.problems.append(line)
        print(f"PROBLEM  {line}")


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="config overrides as dotted key=value")
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="memory of one GPU, when Ray's accelerator type does not say it")
    parser.add_argument("--node-gpus", type=int, default=None,
                        help="GPUs of one node, for the one-node check (default: the largest node Ray sees)")
    parser.add_argument("--load", action="store_true",
                        help="also build the reward models (and check the stats against their identities)")


def doctor_main(args: argparse.Namespace) -> int:
    from cluster.run_config import load_run_config
    from pararl.errors import ConfigError

    report = Report()
    try:
        cfg = load_run_config(args.config, args.overrides)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        report.problem("config", str(err))
        return finish(report)
    report.ok("config", f"{args.config} loads")
    model = check_model(cfg, report)
    models = check_reward(cfg, report, getattr(args, "load", False))
    check_stats(cfg, report, models)
    check_data(cfg, report)
    check_cluster(cfg, report, model, getattr(args, "gpu_memory_gb", None), getattr(args, "node_gpus", None))
    return finish(report)


def finish(report: Report) -> int:
    n = len(report.problems)
    print(f"pararl doctor: {n} problem{'s' if n != 1 else ''}" if n else "pararl doctor: ready")
    return 2 if n else 0


# -- the model folder ------------------------------------------------------------------------------
def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the checkpoint's tensors, read from the safetensors headers only."""
    from safetensors import safe_open

    from pararl.models.loading import weight_files

    shapes = {}
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes



def check_model(cfg: Any, report: Report) -> dict[str, Any]:
    """What the cluster check needs to know about the model (config, format, image tokenizer)."""
    import torch

    from pararl.models import CheckpointError, LLaDAModelLM, parameter_count, read_config

    found: dict[str, Any] = {}
    if not cfg.model:
        report.problem("model", "config key 'model' is not set")
        return found
    folder = Path(cfg.model)
    if not folder.is_dir():
        report.problem("model", f"model folder {folder} does not exist")
        return found
    try:
        config = found["config"] = read_config(folder)
        n = parameter_count(config)
        report.ok("model", f"config.json: model_type {config.model_type}, "
                           + (f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M") + " parameters")
    except CheckpointError as err:
        report.problem("model", str(err))
        return found
    try:
        shapes = tensor_shapes(folder)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in LLaDAModelLM(config).state_dict().items()}
        missing = sorted(set(expected) - set(shapes))
        extra = sorted(set(shapes) - set(expected))
        wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
        for what, keys in (("missing tensors", missing), ("unexpected tensors", extra), ("tensors of the wrong shape", wrong)):
            if keys:
                report.problem("model", f"weights: {len(keys)} {what}, e.g. {', '.join(keys[:3])}")
        if not (missing or extra or wrong):
            report.ok("model", f"weights: {len(shapes)} tensors with the names and shapes config.json implies")
    except (CheckpointError, OSError) as err:
        report.problem("model", f"weights: {err}")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        report.ok("model", f"tokenizer: {type(tokenizer).__name__}, {len(tokenizer)} tokens")
    except (OSError, ValueError) as err:
        report.problem("model", f"tokenizer: cannot load it from {folder}: {err}")
        return found
    from pararl.detect import detect

    try:
        detection = detect(folder, tokenizer)
    except (CheckpointError, ValueError) as err:
        report.problem("model", f"format: {err}")
        return found
    fmt = found["fmt"] = detection.fmt
    for line in detection.how:
        report.ok("model", line)
    if fmt.vocab_size > config.output_size:
        report.problem("model", f"format {fmt.name!r} needs {fmt.vocab_size} ids, the policy's head has {config.output_size}")
    found["image_weights"] = folder_bytes(Path(detection.image_tokenizer.get("path", "")))
    try:
        from pararl.bundle import check_image_tokenizer
        from pararl.image_tokenizers import build_image_tokenizer

        image_tokenizer = found["image_tokenizer"] = build_image_tokenizer(detection.image_tokenizer, device="cpu")
        check_image_tokenizer(fmt, image_tokenizer, folder)
        report.ok("model", f"image tokenizer {detection.image_tokenizer['type']!r}: {image_tokenizer.codebook_size} codes, "
                           f"{image_tokenizer.image_size[0]}x{image_tokenizer.image_size[1]} pixels")
    except (CheckpointError, OSError, ValueError, TypeError, ImportError) as err:
        report.problem("model", f"image tokenizer {detection.image_tokenizer}: {err}")
    return found


def folder_bytes(path: Path) -> float:
    if path.is_file():
        return float(path.stat().st_size)
    if path.is_dir():
        return float(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))
    return 0.0


# -- reward models, statistics, data ---------------------------------------------------------------
def path_like(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith(("/", "./", "~")) or value.endswith(WEIGHT_SUFFIXES))


def check_reward(cfg: Any, report: Report, load: bool) -> dict[str, Any]:
    from reward import REWARD_MODELS, build_reward_model
    from reward.base import import_object
    from reward.config import check_reward_config

    built: dict[str, Any] = {}
    try:
        check_reward_config(cfg.reward)
    except ValueError as err:
        report.problem("reward", str(err))
        return built
    for label, m in cfg.reward.models.items():
        where = f"reward model {label!r} ({m.name})"
        if m.name not in REWARD_MODELS:
            try:
                import_object(m.name)
            except ValueError as err:
                report.problem("reward", f"{where}: {err}")
                continue
        files = {k: v for k, v in m.kwargs.items() if path_like(v)}
        absent = {k: v for k, v in files.items() if not Path(v).expanduser().exists()}
        for key, value in absent.items():
            report.problem("reward", f"{where}: kwargs.{key} {value} does not exist")
        if m.name == "open_clip" and "config_file" not in m.kwargs:
            import open_clip

            if m.kwargs.get("model", "ViT-B-32") not in open_clip.list_models():
                report.problem("reward", f"{where}: open_clip knows no model {m.kwargs.get('model')!r} (add config_file)")
        if absent:
            continue
        if load:
            try:
                built[label] = build_reward_model(m.name, dict(m.kwargs, **({"device": "cpu"} if "device" in m.kwargs else {})))
                report.ok("reward", f"{where}: built, identity {built[label].identity}")
            except Exception as err:  # noqa: BLE001 - any failure to build is the finding
                report.problem("reward", f"{where}: cannot be built: {err}")
        else:
            report.ok("reward", f"{where}: resolvable" + (f", files present: {', '.join(files.values())}" if files else ""))
    return built


def check_stats(cfg: Any, report: Report, built: dict[str, Any]) -> None:
    from reward.stats import RewardStatsError, load_stats

    labels = [label for label, m in cfg.reward.models.items() if m.standardize]
    if not labels:
        return
    try:
        table = load_stats(cfg.reward.stats_file)
    except RewardStatsError as err:
        report.problem("stats", str(err))
        return
    for label in labels:
        entry = table.get(label)
        if entry is None:
            report.problem("stats", f"{cfg.reward.stats_file} has no entry for reward model {label!r}; rerun `pararl reward-stats`")
        elif label in built and entry.identity != built[label].identity:
            report.problem("stats", f"{cfg.reward.stats_file}: {label!r} was measured with {entry.identity!r}, "
                                    f"the configured model is {built[label].identity!r}; rerun `pararl reward-stats`")
        else:
            report.ok("stats", f"{label!r}: mean {entry.mean:.4f}, Z {entry.std:.4f} over {entry.count} pairs")


def check_data(cfg: Any, report: Report) -> None:
    from pararl.data import read_records

    for key in ("train", "eval"):
        path = getattr(cfg.data, key)
        if path is None:
            if key == "train":
                report.problem("data", "config key 'data.train' is not set")
            continue
        try:
            records = read_records(path)
            report.ok("data", f"data.{key}: {len(records)} records in {path}")
        except (FileNotFoundError, ValueError) as err:
            report.problem("data", f"data.{key}: {err}")


# -- the cluster -----------------------------------------------------------------------------------
def gpu_memory_gib(resources: dict[str, float], given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "--gpu-memory-gb"
    types = [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]
    sizes = {ACCELERATOR_GIB[t] for t in types if t in ACCELERATOR_GIB}
    if len(sizes) == 1:
        return sizes.pop(), f"Ray accelerator type {', '.join(types)}"
    return None, f"unknown (accelerator types {types or 'none'}; pass --gpu-memory-gb)"


def check_cluster(cfg: Any, report: Report, model: dict[str, Any], gpu_memory_gb: float | None,
                  node_gpus: int | None = None) -> None:
    import ray

    from cluster.placement import required, stage_needs, start_ray

    c, r = cfg.cluster, cfg.reward
    started = not ray.is_initialized()
    try:
        start_ray(c)
    except Exception as err:  # noqa: BLE001 - ConnectionError, RuntimeError, ...: the finding is that Ray is not there
        report.problem("cluster", f"cannot join Ray at {c.address or 'a new local instance'}: {err}")
        return
    try:
        have = ray.cluster_resources()
        need = required(c, r)
        stages = stage_needs(c, r)
        for kind in ("CPU", "GPU"):
            why = " + ".join(f"{count} {stage} x {each[kind]:g}" for stage, (count, each) in stages.items())
            if need[kind] > have.get(kind, 0) + 1e-9:
                report.problem("cluster", f"the config needs {need[kind]:g} {kind}s ({why}), the cluster has {have.get(kind, 0):g}")
            else:
                report.ok("cluster", f"{need[kind]:g} of {have.get(kind, 0):g} {kind}s ({why})")
        for kind in sorted(set(need) - {"CPU", "GPU"}):  # custom resources: where the config places its stages
            if need[kind] > have.get(kind, 0) + 1e-9:
                report.problem("cluster", f"the config needs {need[kind]:g} of resource {kind!r}, the cluster has "
                                          f"{have.get(kind, 0):g}: start nodes with `ray start --resources` that hold it")
            else:
                report.ok("cluster", f"{need[kind]:g} of {have.get(kind, 0):g} of resource {kind!r}")
        if cfg.learner.device == "cuda" and c.learner_gpus <= 0:
            report.problem("cluster", "learner.device=cuda but cluster.learner_gpus=0: the learner ranks would get no GPU")
        if "config" not in model:
            report.note("memory", "no estimate: the model's config.json is not readable")
            return
        check_memory(cfg, report, model, have, gpu_memory_gb, node_gpus or largest_node_gpus())
    finally:
        if started:
            ray.shutdown()


def largest_node_gpus() -> int:
    import ray

    return int(max((n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]), default=0))


def check_memory(cfg: Any, report: Report, model: dict[str, Any], have: dict[str, float], gpu_memory_gb: float | None,
                 node_gpus: int) -> None:
    """Each actor's GPU estimate against its share of a GPU, host RAM against Ray's, and whether the run
    fits one node (a colocated config must)."""
    from cluster.memory import GiB, estimate_run, one_node, preset_shapes

    c, r = cfg.cluster, cfg.reward
    fmt = model.get("fmt")
    if fmt is not None:
        out_len, span = len(fmt.output_ids(cfg.sampler.text_len)[0]), fmt.image_span_len
        vocab, codebook = fmt.text_vocab_size, fmt.codebook_size
    else:
        out_len, span, vocab, codebook = preset_shapes("mmada-parallel-a", cfg.sampler.text_len)
    tok = model.get("image_tokenizer")
    reward_weights = model.get("image_weights", 0.0) + sum(
        Path(v).expanduser().stat().st_size for m in r.models.values() for v in m.kwargs.values()
        if path_like(v) and Path(v).expanduser().is_file())
    estimates, host, _ = estimate_run(cfg, model["config"], out_len, span, tok.image_size if tok else (512, 512),
                                      reward_weights or 2.5 * GiB, text_vocab=vocab, codebook=codebook)
    per_gpu, source = gpu_memory_gib(have, gpu_memory_gb)
    for e in estimates:
        share = r.gpus_per_replica if e.actor == "reward replica" else (
            c.rollout_gpus if e.actor == "rollout worker" else c.learner_gpus)
        if share <= 0:
            report.ok("memory", f"{e.actor} runs on CPU (estimate on a GPU would be {e.total / GiB:.1f} GiB)")
        elif per_gpu is None:
            report.note("memory", f"{e.line()}; GPU size {source}")
        elif e.total > per_gpu * GiB * min(1.0, share):
            report.problem("memory", f"{e.actor} needs about {e.total / GiB:.1f} GiB of GPU memory, its "
                                     f"{min(1.0, share):g} GPU has {per_gpu * min(1.0, share):.0f} GiB "
                                     f"({source}): {e.line()}")
        else:
            report.ok("memory", f"{e.line()} of {per_gpu:.0f} GiB per GPU ({source})")
    if per_gpu is not None and node_gpus:
        fits, why = one_node(cfg, estimates, per_gpu * GiB, node_gpus)
        line = f"one node of {node_gpus} GPUs of {per_gpu:.0f} GiB: {'fits' if fits else 'does not fit'} ({why})"
        (report.ok if fits else report.problem if c.colocate else report.note)("memory", line)
    ram = have.get("memory", 0)
    if ram and host > ram:
        report.problem("memory", f"actors load about {host / GiB:.0f} GiB of host RAM at start-up, Ray offers {ram / GiB:.0f} GiB")
    else:
        report.ok("memory", f"host RAM at start-up about {host / GiB:.0f} GiB (Ray offers {ram / GiB:.0f} GiB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pararl doctor", description=__doc__.splitlines()[0])
    add_doctor_arguments(parser)
    return doctor_main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

