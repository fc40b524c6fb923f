"""What the quality benchmark runs (`Settings`, `RegConfig`) and where its results live (`ResultCache`)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHOD_LABELS = {
    "dense": "1. dense fine-tuned (reference)",
    "dense_ft": "1b. dense + S+F more steps (control)",
    "svd": "2. truncated SVD, no training",
    "svd_ft": "3. truncated SVD + fine-tuning",
    "asvd": "4a. ASVD, no training",
    "asvd_ft": "4. ASVD + fine-tuning",
    "ours_pruned": "5a. ours, pruned, before fine-tuning",
    "ours": "5. ours (SVD training + prune + fine-tune)",
    "ours_gradual": "5e. ours, gradual pruning (best gradual config of the sweep)",
    "ours_asvd": "5f. ours, data-aware init (ASVD factors; best such config of the sweep)",
    "ours_householder": "5b. ours, Householder (SVDP)",
    "ours_sttp": "5c. ours, STTP",
    "ours_cur": "5d. ours, CUR",
}
# The other parameterizations of `SVDConfig` that the `parameterizations` stage runs through ours' pipeline ("svd"
# is ours itself).
PARAMETERIZATIONS = ("householder", "sttp", "cur")


# Gradual pruning (`RegConfig.gradual`) starts at this fraction of the S stage and reaches the budget at the fraction
# `RegConfig.prune_end` of it (by default its last step).
GRADUAL_START = 0.2


@dataclass(frozen=True)
class RegConfig:
    """The regularizer settings of "ours" (SVD training); one point of the sweep.

    Args:
        orth_weight (`float`): lambda_o, weight of the orthogonality loss.
        sparsity_weight (`float`): lambda_s, weight of the singular-value sparsity loss.
        sparsity (`str`, defaults to `"hoyer"`): `"l1"`, `"hoyer"` or `"hoyer_square"`.
        s_lr_scale (`float`, defaults to 1.0): Learning rate of the singular values `s` during the regularized
            stage, as a multiple of the learning rate of everything else (1: one learning rate for all).
        distill_alpha (`float`, defaults to 0.0): Weight of the distillation loss from the dense fine-tuned model
            (the common starting point) in both stages of ours (`SVDTrainer(teacher_model=...)`); 0: none.
        gradual (`bool`, defaults to False): Prune gradually to the budget during the S stage
            (`prune_start_step` at `GRADUAL_START` of it, cubic schedule) instead of one cut after it; the S stage
            then runs once per budget.
        budget (`float`, *optional*): The budget a gradual S stage prunes to (set per run by `for_budget`).
        ft_lr_scale (`float`, defaults to 1.0): Learning rate of the F stage (fine-tuning after pruning), as a
            multiple of `Settings.learning_rate`. The S stage does not depend on it, so configs that differ only
            here share their regularized model.
        init (`str`, defaults to `"svd"`): The factors the S stage starts from: `"svd"` (the dense weight's SVD,
            as `svd_factorize_`) or `"asvd"` (the data-aware start of `svd_factorize_(..., input_scales=)`: the SVD
            of ASVD's `W diag(a)`, `a` kept fixed in the layer), whose leading directions are those the layer's
            inputs excite and whose `s` is ASVD's spectrum.
        prune_end (`float`, defaults to 1.0): With `gradual`, the fraction of the S stage at which the pruning
            reaches the budget (`prune_at_step`); below 1 the rest of the S stage trains the pruned model.
        one_schedule (`bool`, defaults to False): With `gradual`, train all S + F steps in one Trainer run (one
            learning-rate schedule) instead of two: the budget is reached at `prune_end` of it, after which the pruned
            model trains with the sparsity term off and `s` at the base rate (`SVDTrainer` does both from
            `prune_at_step`). There is no separate F stage, so `ft_lr_scale` must stay 1.
    """

    orth_weight: float = 0.1
    sparsity_weight: float = 1e-3
    sparsity: str = "hoyer"
    s_lr_scale: float = 1.0
    distill_alpha: float = 0.0
    gradual: bool = False
    budget: float | None = None
    ft_lr_scale: float = 1.0
    init: str = "svd"
    prune_end: float = 1.0
    one_schedule: bool = False

    def __post_init__(self) -> None:
        if self.init not in ("svd", "asvd"):
            raise ValueError(f"init {self.init!r}: use 'svd' or 'asvd'.")
        if not GRADUAL_START < self.prune_end <= 1 or (self.prune_end != 1 and not self.gradual):
            raise ValueError(
                f"prune_end {self.prune_end:g}: a fraction of the S stage in ({GRADUAL_START:g}, 1], for gradual "
                "pruning only (e.g. 0.1:1e-2:100:hoyer:0:gradual:0.3:asvd:0.6)."
            )
        if self.one_schedule and (not self.gradual or self.ft_lr_scale != 1):
            raise ValueError(
                "one_schedule: for gradual pruning with no separate F stage (ft_lr_scale 1), e.g. "
                "0.1:1e-2:100:hoyer:0:gradual:1:asvd:0.6:one."
            )

    def record(self) -> dict[str, Any]:
        """The fields as stored in result files; `ft_lr_scale`, `init`, `prune_end` and `one_schedule` only when set,
        so that the results stored before they existed keep their fingerprints."""
        fields = dataclasses.asdict(self)
        for name, default in (("ft_lr_scale", 1.0), ("init", "svd"), ("prune_end", 1.0), ("one_schedule", False)):
            if fields[name] == default:
                del fields[name]
        return fields

    @property
    def key(self) -> str:
        """A file-name-safe identifier, e.g. `o0.1_hoyer0.001_slr1` (`_kd0.5` appended with distillation,
        `_gradual` with gradual pruning, `_b50` for the budget of a gradual S stage, `_ft0.3` for the F stage's
        learning rate, `_asvd` for the data-aware init, `_end0.6` for `prune_end`, `_one` for `one_schedule`)."""
        key = f"o{self.orth_weight:g}_{self.sparsity}{self.sparsity_weight:g}_slr{self.s_lr_scale:g}"
        key += f"_kd{self.distill_alpha:g}" if self.distill_alpha else ""
        key += "_gradual" if self.gradual else ""
        key += f"_b{round(100 * self.budget)}" if self.budget is not None else ""
        key += f"_ft{self.ft_lr_scale:g}" if self.ft_lr_scale != 1 else ""
        key += "_asvd" if self.init == "asvd" else ""
        key += f"_end{self.prune_end:g}" if self.prune_end != 1 else ""
        return key + ("_one" if self.one_schedule else "")

    @property
    def label(self) -> str:
        """A short human-readable description for tables."""
        text = f"orth {self.orth_weight:g}, {self.sparsity} {self.sparsity_weight:g}, s lr x{self.s_lr_scale:g}"
        text += f", distillation {self.distill_alpha:g}" if self.distill_alpha else ""
        text += ", gradual pruning" if self.gradual else ""
        text += f", budget at {self.prune_end:.0%} of S" if self.prune_end != 1 else ""
        text += ", one schedule (S + F in one run)" if self.one_schedule else ""
        text += f", F lr x{self.ft_lr_scale:g}" if self.ft_lr_scale != 1 else ""
        return text + (", ASVD init" if self.init == "asvd" else "")

    def for_budget(self, budget: float) -> RegConfig:
        """The config of the S stage behind ours at `budget`: per budget when pruning gradually, else shared; the F
        stage's learning rate is not part of it."""
        stage = dataclasses.replace(self, ft_lr_scale=1.0)
        return dataclasses.replace(stage, budget=budget) if self.gradual else stage

    @classmethod
    def parse(cls, spec: str) -> RegConfig:
        """`"orth:sparsity_weight[:s_lr_scale[:sparsity[:distill_alpha[:gradual[:ft_lr_scale[:init[:prune_end[:one]]]]]]]]"`,
        e.g. `"0.1:1e-3"`, `"0.1:1e-2:30"`, `"0.1:1e-2:1000:hoyer:0.5"`, `"0.1:1e-2:1000:hoyer:0.5:gradual"`,
        `"0.1:1e-2:1000:hoyer:0.5::0.3"` (one cut after S, F stage at 0.3 times the learning rate) or
        `"0:1e-2:100:hoyer:0::0.3:asvd"` (data-aware init) or `"0.1:1e-2:100:hoyer:0:gradual:1:asvd:0.6"` (the
        budget reached at 60% of the S stage) or `"0.1:1e-2:100:hoyer:0:gradual:1:asvd:0.6:one"` (S and F in one
        learning-rate schedule)."""
        parts = spec.split(":")
        words_ok = (len(parts) < 6 or parts[5] in ("gradual", "")) and (len(parts) < 10 or parts[9] in ("one", ""))
        if not 2 <= len(parts) <= 10 or not words_ok:
            raise ValueError(
                f"--sweep entry {spec!r}: use orth:sparsity_weight[:s_lr_scale[:sparsity[:distill_alpha[:gradual"
                "[:ft_lr_scale[:init[:prune_end[:one]]]]]]]] (gradual: the word `gradual` or nothing; one: the word "
                "`one` or nothing)."
            )
        kwargs: dict[str, Any] = {"orth_weight": float(parts[0]), "sparsity_weight": float(parts[1])}
        if len(parts) > 2:
            kwargs["s_lr_scale"] = float(parts[2])
        if len(parts) > 3:
            kwargs["sparsity"] = parts[3]
        if len(parts) > 4:
            kwargs["distill_alpha"] = float(parts[4])
        if len(parts) > 5:
            kwargs["gradual"] = parts[5] == "gradual"
        if len(parts) > 6 and parts[6]:
            kwargs["ft_lr_scale"] = float(parts[6])
        if len(parts) > 7 and parts[7]:
            kwargs["init"] = parts[7]
        if len(parts) > 8 and parts[8]:
            kwargs["prune_end"] = float(parts[8])
        if len(parts) > 9:
            kwargs["one_schedule"] = parts[9] == "one"
        return cls(**kwargs)


def effective_config(config: RegConfig, parameterization: str) -> RegConfig:
    """The regularizer config `parameterization` trains with under ours' `config`.

    CUR has no singular values (no sparsity term, no `s` learning rate) and no orthogonality term: it trains with its
    approximation term alone (`SVDConfig.approx_weight`), whatever `config` says. The others use `config`, starting
    from their own factorization of the dense weight (the data-aware init is for `"svd"` only).
    """
    if parameterization == "cur":
        return RegConfig(orth_weight=0.0, sparsity_weight=0.0, sparsity="none", s_lr_scale=1.0)
    return config if parameterization == "svd" else dataclasses.replace(config, init="svd")


@dataclass
class Settings:
    """Everything that decides a result; see `preset` for the values of each task.

    `seed` seeds the data split and the dense model (the common starting point of every method); `seeds` are the
    training seeds (data order, dropout) of every method that trains after it, each run once per seed. Results of
    the training seed equal to `seed` keep their unsuffixed cache names, the others get `@seed<N>`.
    """

    task: str = "minilm"
    budgets: tuple[float, ...] = (0.7, 0.5, 0.3)
    max_length: int = 64
    batch_size: int = 16
    eval_batch_size: int = 64
    seed: int = 42
    seeds: tuple[int, ...] = (42, 43, 44, 45, 46)
    dense_steps: int = 150
    dense_learning_rate: float = 1e-4
    learning_rate: float = 1e-4
    svd_steps: int = 50
    finetune_steps: int = 30
    warmup_ratio: float = 0.1
    calib_batches: int = 64
    asvd_alpha: float = 0.5
    sweep_budget: float = 0.5
    # The sweep screens every config at `seed`; this many of the best are then run at every seed (at the sweep
    # budget, validation and test), and the one with the best mean validation accuracy becomes ours' config.
    finalists: int = 3
    max_examples: int | None = None
    test_fraction: float = 0.25
    image_size: int = 112
    train_size: int = 1000
    eval_size: int = 200
    test_size: int = 500
    default_config: RegConfig = field(default_factory=RegConfig)
    sweep: tuple[RegConfig, ...] = ()

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds}: give one or more distinct training seeds, e.g. --seeds 42 43 44.")

    @property
    def compressed_steps(self) -> int:
        """Training steps of every method that trains after the dense model: S + F."""
        return self.svd_steps + self.finetune_steps

    def fingerprint(self, part: str, seed: int | None = None) -> dict[str, Any]:
        """The settings a result of `part` (`dense`, `svd`, `svd_ft`, `asvd_ft`, `ours`) depends on.

        Args:
            part (`str`): The kind of result.
            seed (`int`, *optional*): Its training seed; recorded (as `train_seed`) only when it differs from
                `self.seed`, so that the results made before `seeds` existed keep their fingerprints.
        """
        keys = ["task", "max_length", "batch_size", "seed", "dense_steps", "dense_learning_rate", "max_examples"]
        if self.task == "dinov2":
            keys += ["image_size", "train_size", "eval_size", "test_size"]
        else:
            keys += ["test_fraction"]
        if part in ("svd_ft", "asvd_ft", "ours"):
            keys += ["learning_rate", "svd_steps", "finetune_steps", "warmup_ratio"]
        if part == "asvd_ft":
            keys += ["calib_batches", "asvd_alpha"]
        found = {k: getattr(self, k) for k in keys}
        return found if seed is None or seed == self.seed else {**found, "train_seed": seed}

    def seed_tag(self, seed: int) -> int | None:
        """`seed` for the cache names of a result trained with it, None for `self.seed` (the historical names)."""
        return None if seed == self.seed else seed


def preset(task: str) -> Settings:
    """The default settings of `task`: `minilm` (the real run), `tiny` (CI smoke run) or `dinov2`."""
    sweep = tuple(RegConfig.parse(s) for s in DEFAULT_SWEEP)
    if task == "minilm":
        return Settings(task="minilm", sweep=sweep)
    if task == "tiny":
        return Settings(
            task="tiny",
            budgets=(0.5,),
            max_length=32,
            batch_size=4,
            eval_batch_size=16,
            dense_steps=3,
            dense_learning_rate=1e-3,
            learning_rate=1e-3,
            svd_steps=2,
            finetune_steps=2,
            calib_batches=2,
            max_examples=60,
            seeds=(42,),
            sweep=(
                RegConfig(0.1, 1e-3),
                RegConfig(0.01, 1e-2, s_lr_scale=10.0),
                RegConfig(0.1, 1e-2, s_lr_scale=10.0, distill_alpha=0.5, gradual=True),
                RegConfig(0.0, 1e-2, s_lr_scale=10.0, ft_lr_scale=0.3, init="asvd"),
                # Reaches the budget at S's last step: the sparsity term stays on in every step (and in the last log).
                RegConfig(0.1, 1e-2, s_lr_scale=10.0, gradual=True, init="asvd", one_schedule=True),
            ),
        )
    if task == "dinov2":
        return Settings(task="dinov2", dense_steps=300, calib_batches=16, sweep=())
    raise ValueError(f"Unknown task {task!r}: use minilm, tiny or dinov2.")


# orth_weight:sparsity_weight:s_lr_scale. The singular values' learning rate comes first: under Adam a step moves s by
# about lr whatever the regularizer weight, so at one learning rate for all (s lr x1) the sparsity term cannot move the
# spectrum in a few dozen steps; the weights are then swept at the rate that does (x1000).
DEFAULT_SWEEP = (
    "0.1:1e-2:1",
    "0.1:1e-2:100",
    "0.1:1e-2:1000",
    "0.1:1e-3:1000",
    "0.1:1e-1:1000",
    "0.1:1e-2:1000:hoyer:0.5",
    "0.1:1e-2:1:hoyer:0:gradual",
    "0.1:1e-2:1000:hoyer:0:gradual",
    "0.1:1e-2:1000:hoyer:0.5:gradual",
    # The F stage's learning rate: 30 steps at the full rate from a pruned model that is already trained can undo
    # more than they recover (the S stages are the rows above, reused).
    "0.1:1e-2:1000:hoyer:0.5::0.3",
    "0.1:1e-2:1000:hoyer:0::0.3",
    "0.1:1e-2:100:hoyer:0::0.3",
    "0.1:1e-2:1000:hoyer:0:gradual:0.3",
    # Data-aware init: ours' S stage in the basis of ASVD's factors, s = ASVD's spectrum (row 5f).
    "0.1:1e-2:100:hoyer:0::0.3:asvd",
    "0.1:1e-2:100:hoyer:0:::asvd",
    "0.1:1e-2:100:hoyer:0::0.1:asvd",
    "0.1:1e-2:1000:hoyer:0::0.3:asvd",
    "0.1:1e-2:100:hoyer:0:gradual:0.3:asvd",
    "0.1:1e-2:1000:hoyer:0:gradual:0.3:asvd",
    # Less drift in the S stage (s lr x10, or no sparsity term: a gradual cut of ASVD's spectrum while training), and
    # the F stage at the full rate after a gradual cut.
    "0.1:0:1:hoyer:0:gradual:0.3:asvd",
    "0.1:1e-2:10:hoyer:0:gradual:0.3:asvd",
    "0.1:1e-2:100:hoyer:0:gradual:1:asvd",
    # The budget reached at 60% of the S stage: its last 20 steps train the pruned model (where the cut costs much,
    # as on DINOv2, 30 F steps at 0.3x do not recover it).
    "0.1:1e-2:100:hoyer:0:gradual:0.3:asvd:0.6",
    "0.1:1e-2:100:hoyer:0:gradual:1:asvd:0.6",
    # S and F in one learning-rate schedule (`RegConfig.one_schedule`; the budget reached at 60% of it, s back at the
    # base rate from there): on DINOv2 a second schedule restarted from a trained model costs more than it recovers.
    "0.1:1e-2:100:hoyer:0:gradual:1:asvd:0.6:one",
    "0.1:0:1:hoyer:0:gradual:1:asvd:0.6:one",
)


class ResultCache:
    """One JSON file per result under `root`, tagged with the settings that produced it.

    Args:
        root (`Path`): The cache folder (created on first write).
        force (`bool`): Ignore what is stored (results are recomputed and overwritten).
    """

    def __init__(self, root: Path, force: bool = False) -> None:
        self.root, self.force = Path(root), force
        self.fresh: set[str] = set()  # written by this process: reused even under --force

    def path(self, name: str) -> Path:
        return self.root / "results" / f"{name}.json"

    def load(self, name: str, fingerprint: dict[str, Any], ignore_force: bool = False) -> dict[str, Any] | None:
        """The stored result `name` if it was made with `fingerprint` (and `--force` is off), else `None`."""
        path = self.path(name)
        stale = self.force and not ignore_force and name not in self.fresh
        if stale or not path.is_file():
            return None
        data = json.loads(path.read_text())
        if data.get("settings") != _jsonable(fingerprint):
            print(f"[quality] {path.name}: stored with other settings, not reused", flush=True)
            return None
        return data

    def save(self, name: str, fingerprint: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        data = {**result, "settings": _jsonable(fingerprint)}
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_json(data))
        self.fresh.add(name)
        return json.loads(path.read_text())

    def all_results(self) -> list[dict[str, Any]]:
        """Every stored result, whatever its settings."""
        folder = self.root / "results"
        return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def result_name(
    method: str, budget: float | None = None, config: RegConfig | None = None, seed: int | None = None
) -> str:
    """File stem of a result, e.g. `ours@50@o0.1_hoyer0.001_slr1` or, trained with seed 43, `...@seed43`."""
    name = method if budget is None else f"{method}@{round(budget * 100)}"
    name = name if config is None else f"{name}@{config.key}"
    return name if seed is None else f"{name}@seed{seed}"


def to_json(data: Any) -> str:
    """`data` as indented JSON; dataclasses become dicts, paths strings, NaN null."""
    return json.dumps(data, indent=2, default=_default)


def _default(value: Any) -> Any:
    if isinstance(value, RegConfig):
        return value.record()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"Not JSON serializable: {type(value).__name__}")


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(data, default=_default))
