"""``make train``: the default ParaRL run on this machine, from nothing to a measured improvement.

Builds (or finds, in a cache folder) the generated world, the SFT warm-up policy and the open_clip
reward trained on the world; fills the run config's paths from them; evaluates the warm-up on
held-out prompts; runs ParaRL on a local Ray; exports the final policy, evaluates it the same way
(same prompts, same seeds: a paired comparison); logs both evaluations to the run's MLflow and writes
``results.json``. The evaluation is a ``pararl eval`` job (``cluster.eval_command``) with the run's
reward and the world's exact checks as judges, so the run also leaves its paired table, eval.json
and HTML report in ``<run_dir>/held-out``.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from cluster.run_config import load_run_config, save_run_config
from pararl.errors import ConfigError
from pararl.files import atomic_write

EVAL_THREADS = 2
EVAL_BATCH = 32  # prompts per sampler call
EVAL_JUDGES = ("reward", "world")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def resolved_overrides(paths: dict, world_models: Sequence[str] = ()) -> list[str]:
    """The run config's paths into the prepared cache; ``world_models``: reward models that read the
    world's file (``shapeworld.rewards``)."""
    kw = paths["clip_kwargs"]
    label = paths["reward_label"]
    return [f"model={paths['model']}", f"data.train={paths['train']}", f"data.eval={paths['eval']}",
            f"data.cache_dir={paths['codes']}", f"reward.stats_file={paths['reward_stats']}",
            f"sampler.text_len={paths['text_len']}", f"reward.models.{label}.name=open_clip",
            *(f"reward.models.{label}.kwargs.{k}={v}" for k, v in kw.items()),
            *(f"reward.models.{m}.kwargs.world={paths['world']}" for m in world_models)]


def split_world(config: str | Path, overrides: Sequence[str], cache_dir: str | Path) -> tuple[Path, list[str], dict]:
    """A config's ``world:`` section (and ``world.*`` overrides) are the world's settings, not the run's:
    (the run config without them, the other overrides, the world settings). An empty section: the
    default world, whose config file is used as it is."""
    from omegaconf import OmegaConf

    raw = OmegaConf.load(config)
    world = OmegaConf.to_container(raw.pop("world", None) or OmegaConf.create({}))
    rest = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key.startswith("world."):
            node = OmegaConf.create(world)
            OmegaConf.update(node, key[6:], OmegaConf.create(f"v: {value}").v)
            world = OmegaConf.to_container(node)
        else:
            rest.append(o)
    if not world:
        return Path(config), rest, {}
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    base = Path(cache_dir) / f"{Path(config).stem}.run.yaml"
    base.write_text(OmegaConf.to_yaml(raw))
    return base, rest, world


def world_prepare_config(seed: int, world: dict):
    """The preparation of the default world, with a config's world settings (UniGRPO's task shares)."""
    from shapeworld.prepare import default_config

    cfg = default_config(seed)
    unknown = sorted(set(world) - {"task_shares", "train_size", "eval_size", "edit_share", "given"})
    if unknown:
        raise ConfigError(f"world settings {unknown} are unknown; known: task_shares, train_size, eval_size, edit_share, given")
    shares = dict(world.get("task_shares") or {})
    from shapeworld.questions import QUESTION_TASKS

    bad = sorted(set(shares) - set(QUESTION_TASKS))
    if bad or sum(shares.values()) > 1 or any(v < 0 for v in shares.values()):
        raise ConfigError(f"world.task_shares {shares}: tasks among {', '.join(QUESTION_TASKS)}, shares >= 0 summing to at most 1")
    return replace(cfg, world=replace(cfg.world, **{k: v for k, v in world.items() if k != "task_shares"}, task_shares=shares))


def eval_job(cfg, world: str, samples: int, prompts: int | None = None, folder: str | Path | None = None):
    """The before/after evaluation as a ``pararl eval`` job (in the run folder's ``held-out/`` unless
    ``folder``): the run's reward and the world's exact checks as judges, the run's seed for the
    per-prompt seeds, the warm-up as baseline, the first ``prompts`` held-out prompts (the run's
    ``train.eval_prompts`` unless given)."""
    from cluster.eval_command import EvalJob
    from pararl.data import read_records

    prompts = cfg.train.eval_prompts if prompts is None else prompts
    judges = {**cfg.evaluation.judges, "world": {"world": world}}
    evaluation = replace(cfg.evaluation, samples=samples, prompts=prompts, seed=cfg.seed,
                         batch_prompts=EVAL_BATCH, workers=0, judges=judges)
    records = read_records(cfg.data.eval)[:prompts]
    # the eval's MLflow run goes beside the training's (experiment <name>-eval)
    uri = cfg.tracking.tracking_uri or f"sqlite:///{(Path(cfg.run_dir) / 'mlflow.db').resolve()}"
    run = replace(cfg, evaluation=evaluation, tracking=replace(cfg.tracking, tracking_uri=uri))
    return EvalJob(run, {"baseline": cfg.model}, records, list(EVAL_JUDGES), Path(folder or Path(cfg.run_dir) / "held-out"))


def held_out(job, tag: str) -> tuple[dict, dict]:
    """One model's figures (``shapeworld.judge.world_figures``) and their values per sample, sampled and
    judged as ``pararl eval`` does (what is on disk already is not done again)."""
    import time

    from cluster.eval_command import judge_model, sample_model
    from cluster.evaluate import sample_key
    from reward.judges import RewardJudge
    from shapeworld.judge import world_figures, world_values
    from shapeworld.prepare import torch_threads

    start = time.perf_counter()
    with torch_threads(EVAL_THREADS):  # the same sums on any core count, like the preparation's
        sample_model(job, tag)
        judged = {name: judge_model(job, tag, name) for name in job.judges}
    keys = [sample_key(i, k) for i in range(len(job.records)) for k in range(job.cfg.evaluation.samples)]
    tasks = [job.records[int(key.split("-")[0])].task for key in keys]
    judgments = {name: [by_key[key] for key in keys] for name, by_key in judged.items()}
    steps = RewardJudge.steps_for(job.cfg.reward, job.cfg.sampler.steps)
    figures = {**world_figures(tasks, judgments), "steps": steps, "seconds": time.perf_counter() - start}
    return figures, world_values(tasks, judgments, keys)


def changes(before: dict, after: dict) -> dict:
    """Each figure's paired change after - before over the samples both have, with its 95% interval."""
    from cluster.eval_command import paired

    return {figure: paired(after[figure], before[figure]) for figure in before if figure in after}


ROWS = (("exact alignment", "aligned"), ("mean reward", "reward"), ("follows the prompt", "follows"),
        ("t2i follows", "t2i_follows"), ("understand correct", "understand_correct"), ("reason correct", "reason_correct"))


def summary_table(before: dict, after: dict, change: dict, cfg, out: dict, run_dir: Path) -> str:
    """What a user reads last: before/after with standard errors, the paired change with its 95%
    interval, and where the results and pictures are."""
    lines = [f"\nParaRL default run (seed {cfg.seed}): held-out {before['n']} samples, the same prompts and seeds "
             "before and after", f"{'':20} {'warm-up':>15} {'after ParaRL':>15} {'change [95% interval]':>26}"]
    for label, key in ROWS:
        if key in before and key in after:
            b, a, d = before[key], after[key], change.get(key, {})
            interval = f"[{d.get('lo', float('nan')):+.3f}, {d.get('hi', float('nan')):+.3f}]"
            lines.append(f"{label:20} {b:>7.3f} ± {before.get(key + '_se', float('nan')):.3f} "
                         f"{a:>7.3f} ± {after.get(key + '_se', float('nan')):.3f} {a - b:>+8.3f} {interval:>17}")
    db = run_dir.resolve() / "mlflow.db"
    lines += [f"results:  {run_dir / 'results.json'}", f"report:   {run_dir / 'held-out' / 'report.html'}",
              f"MLflow:   .venv/bin/mlflow ui --backend-store-uri sqlite:///{db}",
              f"          experiment {cfg.tracking.experiment!r}, run {out['run_id']}: per-step curves under Model "
              "metrics (reward.mean, eval.*), snapshot grids under Artifacts > snapshots/"]
    return "\n".join(lines)


def default_run(config: str | Path = DEFAULT_CONFIG, overrides: Sequence[str] = (), cache_dir: str = ".cache/pararl-default",
                eval_samples: int = 2, prepare_cfg=None) -> dict:

    from cluster.eval_command import run_eval
    from cluster.tracking import Tracker
    from cluster.train import check_run_dir, train
    from learner.export import export_policy
    from pararl.bundle import load_codecs
    from rollout.sample_command import save_sampler_settings
    from shapeworld.prepare import default_config, prepare_default

    config, overrides, world = split_world(config, overrides, cache_dir)
    first = load_run_config(config, overrides)
    done = [name for name in ("results.json", "final-policy") if (Path(first.run_dir) / name).exists()]
    if done:  # refused before any work, and nothing of the finished run is touched
        raise ConfigError(f"{first.run_dir} holds a finished default run ({', '.join(done)}); choose another with "
                         f'make train ARGS="run_dir=runs/NAME", or remove {first.run_dir}')
    check_run_dir(first)
    seed = first.seed
    # the statistics measured as `pararl reward-stats` would measure them on this run's config
    base = world_prepare_config(seed, world) if world else default_config(seed)
    prepare_cfg = replace(prepare_cfg or base, stats_texts=first.reward.stats_texts)
    folder = f"seed{seed}" if not world else f"{Path(config).stem.removesuffix('.run')}-seed{seed}"
    paths = prepare_default(Path(cache_dir) / folder, seed=seed, cfg=prepare_cfg)  # one cache per world and seed
    world_models = [label for label, m in first.reward.models.items() if m.name.startswith("shapeworld.rewards:")]
    cfg = load_run_config(config, [*resolved_overrides(paths, world_models), *overrides])
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = save_run_config(cfg, run_dir / "config.yaml")

    prompts = cfg.train.eval_prompts
    print(f"evaluating the warm-up policy on {prompts} held-out prompts x {eval_samples} samples")
    job = eval_job(cfg, paths["world"], eval_samples)
    before, before_values = held_out(job, "baseline")
    out = train(resolved, [] if not cfg.train.resume else ["train.resume=true"])
    final = run_dir / "final-policy"
    export_policy(cfg.learner.checkpoint.folder, final)
    load_codecs(cfg.model).save(final)  # tokenizer, format, image tokenizer beside the exported weights
    save_sampler_settings(final, cfg.sampler)  # `pararl sample` on it samples as the run did
    print("evaluating the ParaRL policy on the same prompts and seeds")
    job.models["model"] = str(final)
    after, after_values = held_out(job, "model")
    change = changes(before_values, after_values)
    run_eval(job)  # the paired table, eval.json, report.html and the eval's MLflow run

    tracker = Tracker(run_dir, cfg.tracking.experiment, cfg.name, cfg.tracking.tracking_uri, run_id=out["run_id"])
    tracker.log_metrics({f"eval/before/{k}": v for k, v in before.items() if isinstance(v, (int, float))}, step=0)
    tracker.log_metrics({f"eval/after/{k}": v for k, v in after.items() if isinstance(v, (int, float))}, step=out["state"].step)
    tracker.finish()
    results = {"before": before, "after": after, "change": change, "run_dir": str(run_dir.resolve()), "run_id": out["run_id"],
               "prepare": {k: paths[k] for k in ("model", "train", "eval", "reward_stats")}}
    atomic_write(run_dir / "results.json", json.dumps(results, indent=1, default=str))
    print(summary_table(before, after, change, cfg, out, run_dir))
    return results
