"""The run plan: a run config expanded, once, into the jobs of every stage — each store, training run, operator
fit, evaluation target and study — which the flows, the torchrun path and the CLI all execute. The same plan as a
table of steps (what `reconlab plan` prints) and `force` live in pipeline/plan_table.py, its checks before any
work in pipeline/checks.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.config import ConfigError, EncoderSpec, OperatorPairSpec, RunConfig, TransformSpec
from pipeline.config_files import resolve_encoder, resolve_entry, spec_file
from pipeline.jobs import EncodeJob, EvalTarget, OperatorJob, SaeJob, TokensJob, TrainJob
from pipeline.models import model_ids, text_towers
from pipeline.stages import captions, encode, evaluate, operators, sae, tokens, train

# the encoder filter: the commands' option and the deployments' parameter, as errors name it
ENCODER_FILTER = "--encoder / encoder_names"
STAGES = ("encode", "train", "operators", "evaluate", "tokens", "sae")
STUDIES = ("tokens", "sae")  # stages that study one encoder's stores through its reconstructor


@dataclass(frozen=True)
class OperatorStep:
    """An operator fit whose reconstructor is known once its encoder is trained (`job(checkpoint)`)."""

    encoder: str
    pair: OperatorPairSpec
    identity_store: Path
    transform_store: Path

    def job(self, cfg: RunConfig, checkpoint: Path) -> OperatorJob:
        return OperatorJob(self.identity_store, self.transform_store, self.pair, checkpoint, cfg.operators)


@dataclass(frozen=True)
class StudyStep:
    """A study of one encoder's stores (token utility, SAE) whose reconstructor is known once it is trained."""

    stage: str  # tokens | sae
    encoder: str
    train_store: Path
    eval_store: Path
    text_train: Path | None = None  # sae on embeddings: the caption stores of the two splits
    text_eval: Path | None = None


@dataclass
class RunPlan:
    cfg: RunConfig
    encode: dict[Path, EncodeJob] = field(default_factory=dict)  # by the store folder each job fills
    train: dict[str, TrainJob] = field(default_factory=dict)  # by encoder name
    operators: list[OperatorStep] = field(default_factory=list)
    evaluate: dict[str, Path] = field(default_factory=dict)  # encoder name -> held-out store
    judges: list[EncoderSpec] = field(default_factory=list)
    studies: dict[str, list[StudyStep]] = field(default_factory=lambda: {stage: [] for stage in STUDIES})
    tokens_judge: EncoderSpec | None = None
    captions: dict[Path, captions.CaptionJob] = field(default_factory=dict)  # caption stores, by folder
    n_images: dict[Path, int] = field(default_factory=dict)  # images each store will hold (before decoding)
    ensured: set[Path] = field(default_factory=set)  # stores already made by whoever executes this plan

    def operator_steps(self, transform_names: list[str] | None = None) -> list[OperatorStep]:
        """The operator fits, optionally only those whose transform is named (by name or tag); naming none that
        exists is an error listing what does."""
        if not transform_names:
            return self.operators
        wanted = set(transform_names)
        steps = [s for s in self.operators if wanted & {s.pair.transform.name, s.pair.transform.tag}]
        if not steps:
            pairs = ", ".join(sorted({s.pair.transform.tag for s in self.operators})) or "none"
            raise ConfigError(
                f"--transform {', '.join(transform_names)} matches no operator pair; pairs: {pairs}"
            )
        return steps

    def without_operators(self) -> RunPlan:
        """This plan less the operators stage and the stores only its fits would read (`--no-operators`)."""
        cfg = self.cfg
        used = {p for job in self.train.values() for p in (job.train_store, job.val_store)}
        used |= {*self.evaluate.values(), *(p for steps in self.studies.values() for s in steps
                                            for p in (s.train_store, s.eval_store))}  # fmt: skip
        kept = {p: j for p, j in self.encode.items()
                if p in used or (j.split in cfg.splits and j.transform in cfg.transforms)}  # fmt: skip
        return replace(self, encode=kept, operators=[], n_images={p: self.n_images[p] for p in kept})

    def one_pass_groups(self, paths) -> list[list[Path]]:
        """`paths` grouped into the stores that one forward pass fills (the feature layers of one encoder on one
        split and transform), in plan order."""
        groups: dict[str, list[Path]] = {}
        for path in dict.fromkeys(paths):
            groups.setdefault(encode.one_pass_key(self.encode[path]), []).append(path)
        return list(groups.values())

    def study_steps(self, stage: str, encoder_names: list[str] | None = None) -> list[StudyStep]:
        """The stage's studies (only those of `encoder_names`); a run config without the stage's section has none,
        and asking for them is an error that says how to add them."""
        if getattr(self.cfg, stage) is None:
            raise ConfigError(f"this run config has no {stage}: section; add `{stage}: {{}}` for the defaults "
                              f"(docs/{stage}.md)")  # fmt: skip
        steps = [s for s in self.studies[stage] if not encoder_names or s.encoder in encoder_names]
        if not steps:
            first = self.cfg.encoders[0]  # the default: a name, an inline spec or an entry {encoder: ...}
            studied = getattr(self.cfg, stage).encoders or [
                getattr(first, "name", getattr(first, "encoder", first))
            ]
            raise ConfigError(f"{ENCODER_FILTER} {', '.join(encoder_names or [])} matches no {stage} study; the config "
                              f"studies {', '.join(studied)} ({stage}.encoders)")  # fmt: skip
        return steps

    def study_job(self, step: StudyStep, checkpoint: Path) -> TokensJob | SaeJob:
        if step.stage == "tokens":
            return TokensJob(
                step.train_store, step.eval_store, checkpoint, self.tokens_judge, self.cfg.tokens
            )
        return SaeJob(
            step.train_store, step.eval_store, checkpoint, self.cfg.sae, step.text_train, step.text_eval
        )

    def eval_targets(self, checkpoints: dict[str, Path]) -> list[EvalTarget]:
        return [EvalTarget(name, store, checkpoints[name]) for name, store in self.evaluate.items()]


def encoder_specs(
    cfg: RunConfig, config_path: Path | None, names: list[str] | None = None, field: str = ENCODER_FILTER
) -> list[EncoderSpec]:
    """The config's encoders, or those of them that `names` select (with field ENCODER_FILTER, a filter: a name the
    config does not have is an error; other callers may name encoders outside `encoders:`); each checked against
    its weights' architecture, layer and width now, not after hours of other encoders."""
    # an encoder listed twice, or as the layer another entry reads, is one encoder (load_run_config: same spec)
    specs = list({s.name: s for ref in cfg.encoders for s in resolve_entry(ref, config_path)}.values())

    def selected(spec: EncoderSpec, name: str) -> bool:
        """The encoder of that name and its layers (NAME.L-1, NAME.last); a layer's own name, that layer."""
        return spec.name == name or spec.name.startswith(f"{name}.")

    if names:
        unknown = sorted(n for n in set(names) if not any(selected(s, n) for s in specs))
        if field == ENCODER_FILTER:  # a filter: the config's encoders, or those only its later stages name
            elsewhere = set(named_by_stages(cfg))
            for name in unknown:  # the config's encoders listed, not every spec reconlab ships
                if name not in elsewhere:
                    raise ConfigError(
                        f"field `{field}`: '{name}' is not an encoder of {config_path or 'the config'} (it has "
                        f"{', '.join(s.name for s in specs)}); add it to `encoders:` there to encode it"
                    )
                resolve_entry(name, config_path, field)
            unknown = []
        specs += [s for n in unknown for s in resolve_entry(n, config_path, field)]
        specs = [s for s in specs if any(selected(s, n) for n in names)]
    for spec in specs:
        try:
            model_ids.check_architecture(spec)
            model_ids.check_layer_and_width(spec)
        except ConfigError as e:  # "fix X in its YAML": which one
            raise type(e)(f"{spec_file(spec.name, config_path, cfg.encoders)}: {e}") from None
    return specs


def named_by_stages(cfg: RunConfig) -> list[str]:
    """Encoders that operators, evaluate and the studies name, in order, once each (some outside `encoders:`)."""
    study_names = [n for stage in STUDIES if getattr(cfg, stage) for n in getattr(cfg, stage).encoders or []]
    return list(
        dict.fromkeys((*(cfg.operators.encoders or []), *(cfg.evaluate.encoders or []), *study_names))
    )


def jobs_from_config(cfg: RunConfig, config_path: Path | None, encoder_names: list[str] | None = None):
    """Every (split, encoder, transform) store a run config asks for, optionally only some encoders."""
    return [
        EncodeJob(cfg.store_root, cfg.dataset, split, cfg.subset, spec, transform, cfg.store, cfg.encode)
        for spec in encoder_specs(cfg, config_path, encoder_names)
        for split in cfg.splits
        for transform in cfg.transforms
    ]


def build(
    cfg: RunConfig,
    config_path: Path | None = None,
    encoder_names: list[str] | None = None,
    image_counts: dict[str, int] | None = None,
) -> RunPlan:
    """The jobs of every stage, for all the config's encoders or only `encoder_names`. `image_counts` (images per
    split): plan without reading the dataset, for estimates; stores then have placeholder folders."""
    run = RunPlan(cfg)
    base = {}

    def locate(job: EncodeJob) -> tuple[Path, int]:
        if image_counts is None:
            try:
                records, _, path = encode.plan(job)
            except ConfigError as e:  # the dataset's files: named with the config that points at them
                raise ConfigError(f"{config_path or 'the run config'}: {e}") from None
            return path, len(records)
        if job.split not in image_counts:
            raise ConfigError(f"no image count for split '{job.split}': pass --images {job.split}=N")
        n = min(image_counts[job.split], job.subset.max_images or image_counts[job.split])
        return Path(f"(unlisted) {job.encoder.name}__{job.split}__{job.transform.tag}"), n

    for job in jobs_from_config(cfg, config_path, encoder_names):
        path, n = locate(job)
        run.encode[path], run.n_images[path] = job, n
        if job.transform == TransformSpec():
            base.setdefault(job.encoder.name, job)

    def store(name: str, split: str, transform: TransformSpec = TransformSpec()) -> Path:
        job = replace(base[name], split=split, transform=transform)
        path = next((p for p, j in run.encode.items() if j == job), None)
        if path is None:
            path, n = locate(job)
            run.encode[path], run.n_images[path] = job, n
        return path

    # Operators and evaluation may name encoders outside `encoders:`; those get only the stores they need.
    extra = [
        n for n in named_by_stages(cfg) if n not in base and (encoder_names is None or n in encoder_names)
    ]
    for spec in (
        encoder_specs(cfg, config_path, extra, "operators / evaluate / tokens / sae .encoders")
        if extra
        else []
    ):
        identity = EncodeJob(cfg.store_root, cfg.dataset, cfg.train.train_split, cfg.subset, spec,
                             TransformSpec(), cfg.store, cfg.encode)  # fmt: skip
        base[spec.name] = identity
    for name in base:
        run.train[name] = TrainJob(
            store(name, cfg.train.train_split), store(name, cfg.train.val_split), cfg.train
        )
    ops = cfg.operators
    default = [resolve_entry(cfg.encoders[0], config_path)[0].name]  # the paper fits one encoder's operators
    for name in [n for n in (ops.encoders or default) if n in base]:  # (those outside an -e filter: skipped)
        for pair in (p for spec in ops.pairs for p in spec.expand()):
            run.operators.append(
                OperatorStep(name, pair, store(name, ops.split), store(name, ops.split, pair.transform))
            )
    for name in base:
        if not cfg.evaluate.encoders or name in cfg.evaluate.encoders:
            run.evaluate[name] = store(name, cfg.evaluate.split)
    run.judges = [resolve_encoder(name, config_path, "evaluate.judges") for name in cfg.evaluate.judges]
    for stage in STUDIES:
        study = getattr(cfg, stage)
        for name in [n for n in (study.encoders or default) if n in base] if study else []:
            step = StudyStep(stage, name, store(name, study.train_split), store(name, study.split))
            if stage == "sae" and study.inputs == "embeddings":
                step = replace(
                    step,
                    text_train=caption_store(run, step.train_store),
                    text_eval=caption_store(run, step.eval_store),
                )
            run.studies[stage].append(step)
    if cfg.tokens:
        judge = cfg.tokens.judge or (cfg.evaluate.judges[0] if cfg.evaluate.judges else None)
        run.tokens_judge = resolve_encoder(judge, config_path, "tokens.judge") if judge else None
    return run


def caption_store(run: RunPlan, image_store: Path) -> Path:
    """The caption store of an image store's split (same dataset, subset and encoder), added to the plan."""
    job = run.encode[image_store]
    text_towers.check_has_text_tower(job.encoder, "sae.inputs: embeddings: sae.encoders")
    caption_job = captions.CaptionJob(run.cfg.store_root, job.dataset, job.split, job.subset, job.encoder,
                                      device=job.options.device)  # fmt: skip
    path = captions.plan(caption_job)[2]
    run.captions[path] = caption_job
    return path


STUDY_RUNNERS = {"tokens": tokens.run, "sae": sae.run}


def execute(run: RunPlan, with_operators: bool = True, progress: bool = False) -> dict:
    """Every job of the plan in this process, in stage order, without an orchestrator: what `reconlab run` does
    when everything is cached (each stage returns its finished artifact at once), and the baseline of
    benchmarks/orchestration.py."""
    cfg = run.cfg
    stores = [
        result
        for group in run.one_pass_groups(run.encode)
        for result in encode.run_layers([run.encode[path] for path in group], progress=progress)
    ]
    trained = {name: train.run(job, progress=progress) for name, job in run.train.items()}
    steps = run.operators if with_operators else []
    fitted = [operators.run(s.job(cfg, trained[s.encoder].checkpoint)) for s in steps]
    targets = run.eval_targets({name: result.checkpoint for name, result in trained.items()})
    judges = evaluate.load_judges(run.judges, cfg.evaluate.device)
    report = evaluate.run(targets, cfg.evaluate, judges, progress=progress)
    for caption_job in run.captions.values():
        captions.run(caption_job, progress=progress)
    studies = {stage: [STUDY_RUNNERS[stage](run.study_job(s, trained[s.encoder].checkpoint), progress=progress)
                       for s in run.studies[stage]] for stage in STUDIES}  # fmt: skip
    return {
        "stores": stores,
        "trained": trained,
        "operators": fitted,
        "evaluation": report,
        **studies,
    }
