"""The stages of the quality benchmark: dense reference, baselines, sweep, ours; each result cached on disk."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hf_svd_compress import SVDConfig, activation_scales, prune_, svd_factorize_, truncate_
from hf_svd_compress.layers.linalg import dense_weight
from hf_svd_compress.pipeline import TaskSetup

from .asvd import asvd_factorize_, normalize_columns_, target_names
from .core import collator, energy_kept, evaluate_splits, export_stats, factored_stats, file_stats, load_task, train
from .settings import GRADUAL_START, PARAMETERIZATIONS, RegConfig, ResultCache, Settings, effective_config, result_name

# Plain truncated SVD: no regularizer at any point (factors then train freely).
# The allocation of every stored result: one energy threshold for all layers (before the greedy default existed).
BASELINE_CONFIG = SVDConfig(orth_weight=0.0, sparsity=None, prune_allocation="threshold")
REGULARIZED_FILE = "model.safetensors"


def log(message: str) -> None:
    print(f"[quality] {message}", flush=True)


class Bench:
    """Runs and caches every result of one task under `root`.

    Args:
        settings (`Settings`): What to run.
        root (`Path`): Cache folder of this task (results, the dense model, the regularized models).
        force (`bool`): Recompute results of the stages that run instead of reusing them.
        keep_exports (`bool`): Keep each exported `save_compressed` folder (deleted after measuring otherwise).
    """

    def __init__(self, settings: Settings, root: Path, force: bool = False, keep_exports: bool = False) -> None:
        self.settings, self.root, self.keep_exports = settings, Path(root), keep_exports
        self.cache = ResultCache(self.root, force)
        self._setup: TaskSetup | None = None

    # ------------------------------------------------------------------------------------------------ helpers

    @property
    def dense_dir(self) -> Path:
        return self.root / "dense" / "model"

    def setup(self) -> TaskSetup:
        """Data and the dense fine-tuned model (loaded once; run the dense stage first)."""
        if self._setup is None:
            if not (self.dense_dir / "config.json").is_file():
                raise FileNotFoundError(f"No dense model in {self.dense_dir}: run `--stage dense` first.")
            self._setup = load_task(self.settings, self.dense_dir, self.root)
            self._setup.model.to("cuda" if torch.cuda.is_available() else "cpu")
        return self._setup

    def fresh_dense(self) -> torch.nn.Module:
        return copy.deepcopy(self.setup().model)

    def fingerprint(self, part: str, seed: int | None = None, **extra: Any) -> dict[str, Any]:
        """Settings of `part` trained with `seed`, plus the creation time of the dense model it starts from."""
        dense = self.cache.load("dense", self.settings.fingerprint("dense"), ignore_force=True)
        return {**self.settings.fingerprint(part, seed), "dense_created": dense and dense["created"], **extra}

    def name(
        self, method: str, budget: float | None = None, config: RegConfig | None = None, seed: int | None = None
    ) -> str:
        """Cache name of a result; `seed` None (untrained) or `settings.seed` keeps the historical name."""
        return result_name(method, budget, config, None if seed is None else self.settings.seed_tag(seed))

    def cached(self, name: str, fingerprint: dict[str, Any], splits: tuple[str, ...]) -> dict[str, Any] | None:
        result = self.cache.load(name, fingerprint)
        return result if result is not None and all(s in result for s in splits) else None

    def record(
        self, name: str, fingerprint: dict[str, Any], model: torch.nn.Module, splits: tuple[str, ...], **info: Any
    ) -> dict[str, Any]:
        """Evaluate, export, measure and store the result `name` of `model`."""
        start = time.perf_counter()
        result = {"name": name, **info, **evaluate_splits(model, self.setup(), self.settings, splits)}
        result.update(factored_stats(model))
        result.update(export_stats(model, self.root / "exports" / name, keep=self.keep_exports))
        result["eval_export_s"] = round(time.perf_counter() - start, 1)
        result["created"] = time.time()
        accuracy = ", ".join(f"{s} acc {result[s]['accuracy']:.4f}" for s in splits)
        log(f"{name}: {accuracy}, {result['params_total']:,} params, budget {result['budget_realized']:.3f}")
        return self.cache.save(name, fingerprint, result)

    # -------------------------------------------------------------------------------------------------- dense

    def run_dense(self) -> dict[str, Any]:
        """Stage 1: fine-tune the pretrained model densely, save it (`save_pretrained`) and score it."""
        fingerprint = self.settings.fingerprint("dense")
        cached = self.cache.load("dense", fingerprint)
        if cached is not None and (self.dense_dir / "config.json").is_file():
            log(f"dense: cached (test acc {cached['test']['accuracy']:.4f})")
            return cached
        s = self.settings
        log(f"dense: fine-tuning {s.dense_steps} steps (batch {s.batch_size}, lr {s.dense_learning_rate:g})")
        setup = load_task(s, None, self.root)
        training = train(setup.model, setup, s, s.dense_steps, s.dense_learning_rate)
        setup.model.save_pretrained(self.dense_dir)
        if setup.processing_class is not None:
            setup.processing_class.save_pretrained(self.dense_dir)
        result = self._dense_result("dense", "dense", setup.model, setup, ("val", "test"), training)
        self._setup = None  # later stages load the saved model
        return self.cache.save("dense", fingerprint, result)

    def run_dense_control(self, seed: int) -> dict[str, Any]:
        """Control: the dense model trained S + F more steps with `seed`, as the compressed ones are (the noise of
        training)."""
        name, fingerprint = self.name("dense_ft", seed=seed), self.fingerprint("svd_ft", seed)
        cached = self.cached(name, fingerprint, ("test",))
        if cached is not None:
            log(f"{name}: cached")
            return cached
        steps = self.settings.compressed_steps
        log(f"{name}: training the dense model {steps} more steps (seed {seed})")
        model = self.fresh_dense()
        training = train(model, self.setup(), self.settings, steps, self.settings.learning_rate, seed=seed)
        result = self._dense_result(name, "dense_ft", model, self.setup(), ("test",), training)
        return self.cache.save(name, fingerprint, {**result, "seed": seed})

    def _dense_result(
        self, name: str, method: str, model: torch.nn.Module, setup: TaskSetup, splits: tuple[str, ...], training: dict
    ) -> dict[str, Any]:
        result = {"name": name, "method": method, "budget": 1.0, "train": training}
        result.update(evaluate_splits(model, setup, self.settings, splits))
        result.update(file_stats(self.dense_dir / "model.safetensors"))  # same architecture, same size
        dense_params = _target_params(model)
        result.update(params_factored=dense_params, params_factored_dense=dense_params, budget_realized=1.0)
        result["created"] = time.time()
        log(f"{name}: " + ", ".join(f"{k} acc {result[k]['accuracy']:.4f}" for k in splits))
        return result

    # ---------------------------------------------------------------------------------------------- baselines

    def run_baselines(self) -> None:
        """Methods 2-4 at every budget, and the dense control; the trained ones at every seed."""
        for seed in self.settings.seeds:
            self.run_dense_control(seed)
        for budget in self.settings.budgets:
            self.run_svd(budget)
            self.run_asvd(budget)

    def run_svd(self, budget: float) -> None:
        """Methods 2 and 3: truncated SVD of the dense weights (global energy threshold), then fine-tuning."""
        self._truncate_and_finetune("svd", budget, lambda model: svd_factorize_(model, BASELINE_CONFIG))

    def run_asvd(self, budget: float) -> None:
        """Method 4: activation-aware SVD truncated to the budget, then fine-tuning (plus its untrained score)."""
        scales = self.asvd_scales()
        alpha = self.settings.asvd_alpha
        self._truncate_and_finetune(
            "asvd", budget, lambda model: asvd_factorize_(model, BASELINE_CONFIG, scales, alpha), normalize_columns_
        )

    def _truncate_and_finetune(
        self,
        method: str,
        budget: float,
        factorize: Callable[[torch.nn.Module], Any],
        after_truncate: Callable[[torch.nn.Module], Any] | None = None,
    ) -> None:
        """The untrained result (seed-independent) and one fine-tuned result per seed, from one truncation."""
        plain, plain_print = self.name(method, budget), self.baseline_fingerprint(method)
        ft = {seed: self.name(f"{method}_ft", budget, seed=seed) for seed in self.settings.seeds}
        ft_prints = {seed: self.baseline_fingerprint(f"{method}_ft", seed) for seed in self.settings.seeds}
        do_plain = self.cached(plain, plain_print, ("test",)) is None
        seeds = [seed for seed in ft if self.cached(ft[seed], ft_prints[seed], ("test",)) is None]
        if not do_plain and not seeds:
            log(f"{plain}, {', '.join(ft.values())}: cached")
            return
        start = time.perf_counter()
        model = factorize(self.fresh_dense())
        prune_(model, budget=budget, allocation="threshold")
        energy = energy_kept(model)
        truncate_(model)
        if after_truncate is not None:
            after_truncate(model)
        info = {"budget": budget, "energy_kept": energy}
        if do_plain:
            info_plain = {**info, "method": method, "train": {"steps": 0, "wall_s": 0.0}}
            self.record(plain, plain_print, model, ("test",), **info_plain)
        steps = self.settings.compressed_steps
        for i, seed in enumerate(seeds):
            tuned = model if i == len(seeds) - 1 else copy.deepcopy(model)  # every seed starts from the truncation
            log(f"{ft[seed]}: fine-tuning {steps} steps (seed {seed})")
            training = train(tuned, self.setup(), self.settings, steps, self.settings.learning_rate, seed=seed)
            info_ft = {**info, "method": f"{method}_ft", "seed": seed, "train": training}
            self.record(ft[seed], ft_prints[seed], tuned, ("test",), **info_ft)
        log(f"{method} @ {budget:.0%}: {time.perf_counter() - start:.0f} s")

    def asvd_scales(self) -> dict[str, torch.Tensor]:
        """Per-layer mean |input| over the calibration batches, computed once and cached (`asvd_scales.pt`)."""
        path = self.root / "asvd_scales.pt"
        fingerprint = self.fingerprint("asvd_ft")
        if path.is_file() and (not self.cache.force or "asvd_scales" in self.cache.fresh):
            stored = torch.load(path)
            if stored["settings"] == fingerprint:
                return stored["scales"]
        s = self.settings
        log(f"asvd: activation statistics over {s.calib_batches} calibration batches of {s.batch_size}")
        setup = self.setup()  # mean |x| (alpha 1): asvd_factorize_ applies the exponent
        scales = activation_scales(
            setup.model, setup.train_dataset, BASELINE_CONFIG, collator(setup), s.batch_size, s.calib_batches, 1.0
        )
        torch.save({"settings": fingerprint, "scales": scales}, path)
        self.cache.fresh.add("asvd_scales")
        return scales

    # --------------------------------------------------------------------------------------------------- ours

    def regularized_dir(self, config: RegConfig, seed: int, parameterization: str = "svd") -> Path:
        tag = self.settings.seed_tag(seed)
        key = effective_config(config, parameterization).key  # CUR: one model whatever ours' config
        key = key if parameterization == "svd" else f"{parameterization}_{key}"
        return self.root / "regularized" / (key if tag is None else f"{key}@seed{tag}")

    def regularized_name(self, config: RegConfig, seed: int, parameterization: str = "svd") -> str:
        """`regularized@<config>` for ours, `regularized_<parameterization>` for the others (one config each)."""
        if parameterization == "svd":
            return self.name("regularized", None, config, seed)
        return self.name(f"regularized_{parameterization}", None, None, seed)

    def regularized_fingerprint(self, config: RegConfig, seed: int, parameterization: str = "svd") -> dict[str, Any]:
        """Fingerprint of the regularized model (ours' unchanged; the others add their parameterization)."""
        reg = effective_config(config, parameterization)
        if parameterization == "svd":
            found = self.fingerprint("ours", seed, config=reg)
            # "start": the data-aware layers keep `a` as a buffer (s = ASVD's spectrum); the results of the former
            # start (`V = diag(a)^-1 V'` with unit columns, no buffer) do not count.
            return {**found, **self.asvd_fingerprint(), "start": "input_scale"} if reg.init == "asvd" else found
        factor = _svd_config(reg, parameterization)
        extra = {"approx_weight": factor.approx_weight} if parameterization == "cur" else {}
        return self.fingerprint("ours", seed, config=reg, parameterization=parameterization, **extra)

    def run_regularized(self, config: RegConfig, seed: int, parameterization: str = "svd") -> dict[str, Any]:
        """Training at full rank with the regularizers of `config` for `svd_steps` steps with `seed`, in
        `parameterization` (CUR: its approximation term only), saved once and pruned to every budget."""
        name = self.regularized_name(config, seed, parameterization)
        fingerprint = self.regularized_fingerprint(config, seed, parameterization)
        cached = self.cache.load(name, fingerprint)
        folder = self.regularized_dir(config, seed, parameterization)
        if cached is not None and (folder / REGULARIZED_FILE).is_file():
            return cached
        s, reg = self.settings, effective_config(config, parameterization)
        steps = self.s_stage_steps(reg)
        log(f"{name} [{parameterization}, {reg.label}]: {steps} steps with the regularizers (seed {seed})")
        model = self.factorize_for_s_stage(reg, parameterization)
        training = train(
            model,
            self.setup(),
            s,
            steps,
            s.learning_rate,
            reg,
            sparsity_on=True,
            s_lr_scale=reg.s_lr_scale,
            keep_s_lr=not reg.one_schedule,  # the two-schedule results were trained with s at its rate to S's end
            seed=seed,
            pruning=self.gradual_pruning(reg),
            **self.distillation(reg),
        )
        folder.mkdir(parents=True, exist_ok=True)
        # The state dict under the in-memory names: `save_pretrained` renames some modules on the way out
        # (DINOv2 / ViT `attention.q_proj` -> `attention.attention.query` in transformers 5.x).
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / REGULARIZED_FILE)
        result = {"name": name, "method": "regularized", "config": reg, "seed": seed, "train": training}
        if parameterization != "svd":
            result["parameterization"] = parameterization
        return self.cache.save(name, fingerprint, {**result, "created": time.time()})

    def factorize_for_s_stage(self, config: RegConfig, parameterization: str = "svd") -> torch.nn.Module:
        """A copy of the dense model factored at full rank as `config.init` says: the SVD, or the library's
        data-aware start from ASVD's calibration statistics (`svd_factorize_(..., input_scales=)`; the layers then
        hold `a` as their `input_scale` buffer, which the saved regularized model includes)."""
        scales = None
        if config.init == "asvd" and parameterization == "svd":
            scales = {n: a.pow(self.settings.asvd_alpha) for n, a in self.asvd_scales().items()}
        return svd_factorize_(self.fresh_dense(), _svd_config(config, parameterization), input_scales=scales)

    def asvd_fingerprint(self) -> dict[str, Any]:
        """The settings the ASVD factors depend on (beyond the dense model's)."""
        asvd = self.fingerprint("asvd_ft")
        return {k: asvd[k] for k in ("calib_batches", "asvd_alpha")}

    def s_stage_steps(self, config: RegConfig) -> int:
        """Steps of ours' S stage: `svd_steps`, or all S + F steps when `config.one_schedule` (no F stage then)."""
        return self.settings.compressed_steps if config.one_schedule else self.settings.svd_steps

    def gradual_pruning(self, config: RegConfig) -> dict[str, Any] | None:
        """`SVDTrainingArguments` fields of a gradual S stage: from `GRADUAL_START` of it to `config.prune_end` of it
        (by default its last step), to the budget, with the ranks of `prune_(model, budget=b)` (no rounding) as for
        every other method."""
        if config.budget is None:
            return None
        steps = self.s_stage_steps(config)
        start = min(steps - 1, round(GRADUAL_START * steps))
        end = max(start + 1, min(steps, round(config.prune_end * steps)))
        return dict(prune_start_step=start, prune_at_step=end, prune_budget=config.budget, prune_rank_multiple=1)

    def distillation(self, config: RegConfig) -> dict[str, Any]:
        """`train` keywords for `config`'s distillation: the dense fine-tuned model (untouched) as the teacher."""
        if not config.distill_alpha:
            return {}
        return {"teacher": self.setup().model, "distill_alpha": config.distill_alpha}

    def load_regularized(self, config: RegConfig, seed: int, parameterization: str = "svd") -> torch.nn.Module:
        """The saved regularized model: the dense model factored at full rank, then its trained state loaded."""
        model = self.factorize_for_s_stage(effective_config(config, parameterization), parameterization)
        path = self.regularized_dir(config, seed, parameterization) / REGULARIZED_FILE
        model.load_state_dict(load_file(path, device=str(self.setup().model.device)), strict=True)
        return model

    def ours_fingerprint(
        self, config: RegConfig, budget: float, seed: int, regularized: dict[str, Any], parameterization: str = "svd"
    ) -> dict[str, Any]:
        """Fingerprint of ours at `budget`: its S stage's, the creation time of the `regularized` model it prunes,
        and the F stage's learning rate when it is not the common one."""
        stage = config.for_budget(budget)
        found = {
            **self.regularized_fingerprint(stage, seed, parameterization),
            "regularized_created": regularized["created"],
        }
        return found if config.ft_lr_scale == 1 else {**found, "ft_lr_scale": config.ft_lr_scale}

    def ours_names(self, config: RegConfig, budget: float, seed: int, parameterization: str = "svd") -> dict[str, str]:
        """Result names of ours at `budget`: `ft` (fine-tuned) and, for "svd" only, `pruned` (before fine-tuning).

        The other parameterizations are named `ours_<parameterization>@<budget>`: one config each, in the fingerprint.
        """
        if parameterization == "svd":
            return {
                "pruned": self.name("ours_pruned", budget, config, seed),
                "ft": self.name("ours", budget, config, seed),
            }
        return {"ft": self.name(f"ours_{parameterization}", budget, None, seed)}

    def run_ours(
        self,
        config: RegConfig,
        budget: float,
        seed: int,
        splits: tuple[str, ...] = ("test",),
        parameterization: str = "svd",
    ) -> dict[str, Any]:
        """Prune the regularized model of `seed` (in `parameterization`) to `budget`, then fine-tune `finetune_steps`
        steps (sparsity off) with `seed`."""
        stage = config.for_budget(budget)  # the S stage behind this result
        regularized = self.run_regularized(stage, seed, parameterization)
        fingerprint = self.ours_fingerprint(config, budget, seed, regularized, parameterization)
        names = self.ours_names(config, budget, seed, parameterization)
        cached = self.cached(names["ft"], fingerprint, splits)
        if cached is not None and ("pruned" not in names or self.cached(names["pruned"], fingerprint, ("test",))):
            log(f"{names['ft']}: cached")
            return cached
        start, reg = time.perf_counter(), effective_config(config, parameterization)
        model = self.load_regularized(stage, seed, parameterization)
        prune_(model, budget=budget, allocation="threshold")  # after a gradual S stage: already there, masks unchanged
        info = {"budget": budget, "config": reg, "seed": seed, "energy_kept": energy_kept(model)}
        truncate_(model)
        if "pruned" in names:
            pruned = {**info, "method": "ours_pruned", "train": {"steps": 0, "wall_s": 0.0}}
            self.record(names["pruned"], fingerprint, model, ("test",), **pruned)
        steps = 0 if reg.one_schedule else self.settings.finetune_steps  # one schedule: S had the F steps
        log(f"{names['ft']}: fine-tuning {steps} steps (seed {seed})")
        lr = self.settings.learning_rate * config.ft_lr_scale
        training = train(model, self.setup(), self.settings, steps, lr, reg, seed=seed, **self.distillation(reg))
        method = "ours" if parameterization == "svd" else f"ours_{parameterization}"
        result = self.record(names["ft"], fingerprint, model, splits, **info, method=method, train=training)
        log(f"{method} @ {budget:.0%} [{reg.label}]: {time.perf_counter() - start:.0f} s")
        return result

    def run_sweep(self) -> RegConfig:
        """Ours at the sweep budget for every config of the sweep (validation and test) trained with
        `settings.seed` (the screen; one seed bounds the compute), then the `settings.finalists` best of them at
        every seed; returns the best (`best_config`)."""
        budget = self.settings.sweep_budget
        for config in self.settings.sweep:
            self.run_ours(config, budget, self.settings.seed, ("val", "test"))
        for config in self.finalists():
            for seed in self.settings.seeds:
                self.run_ours(config, budget, seed, ("val", "test"))
        return self.best_config()

    def finalists(self) -> list[RegConfig]:
        """The `settings.finalists` best configs of the screen (validation accuracy at `settings.seed`, then loss)."""
        ranked = sorted(self.sweep_results(), key=lambda r: (-r["val"]["accuracy"], r["val"]["loss"]))
        return [r["config"] for r in ranked[: self.settings.finalists]]

    def finalist_scores(self) -> dict[RegConfig, dict[str, float]]:
        """Mean validation accuracy and loss over every seed of each finalist whose seeds have all been run."""
        scores, budget = {}, self.settings.sweep_budget
        for config in self.finalists():
            found = []
            for seed in self.settings.seeds:
                stored = self.stored_regularized(config, budget, seed)
                name = self.name("ours", budget, config, seed)
                found.append(stored and self.cache.load(name, stored[1], ignore_force=True))
            if all(r is not None and "val" in r for r in found):
                scores[config] = {k: sum(r["val"][k] for r in found) / len(found) for k in ("accuracy", "loss")}
        return scores

    def stored_regularized(
        self, config: RegConfig, budget: float, seed: int, parameterization: str = "svd"
    ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The stored regularized model behind ours at `budget` and `seed`, and the fingerprint of ours' results
        pruned from it; None when it is not stored (whatever `--force` says)."""
        stage = config.for_budget(budget)
        regularized = self.cache.load(
            self.regularized_name(stage, seed, parameterization),
            self.regularized_fingerprint(stage, seed, parameterization),
            ignore_force=True,
        )
        if regularized is None:
            return None
        return regularized, self.ours_fingerprint(config, budget, seed, regularized, parameterization)

    def sweep_results(self) -> list[dict[str, Any]]:
        """The stored sweep results (ours at the sweep budget, with a validation score, seed `settings.seed`)."""
        results, budget = [], self.settings.sweep_budget
        for config in self.settings.sweep:
            stored = self.stored_regularized(config, budget, self.settings.seed)
            if stored is None:
                continue
            regularized, fingerprint = stored
            name = result_name("ours", budget, config)
            result = self.cache.load(name, fingerprint, ignore_force=True)
            pruned = self.cache.load(name.replace("ours@", "ours_pruned@"), fingerprint, ignore_force=True)
            if result is not None and "val" in result:
                results.append({**result, "config": config, "pruned": pruned, "regularized": regularized})
        return results

    def best_config(self, gradual: bool | None = None, init: str | None = None) -> RegConfig | None:
        """The best sweep config; None without a sweep.

        Among the finalists whose seeds have all been run: the best mean validation accuracy over the seeds (ties:
        lower mean validation loss). Otherwise (no finalist of the kind asked for): the best of the screen at
        `settings.seed`, by the same rule. `gradual` True / False: only configs that prune gradually / at once after
        S; `init`: only those that start from these factors (`RegConfig.init`).
        """
        results = self.sweep_results()
        configs = [
            r["config"]
            for r in results
            if (gradual is None or r["config"].gradual == gradual) and (init is None or r["config"].init == init)
        ]
        if not configs:
            return None
        scores = self.finalist_scores()
        if not any(c in scores for c in configs):
            scores = {r["config"]: r["val"] for r in results}
        ranked = [c for c in configs if c in scores]
        return max(ranked, key=lambda c: (scores[c]["accuracy"], -scores[c]["loss"]))

    def run_ours_all(self, config: RegConfig) -> None:
        """Ours at every seed and budget with `config` (the sweep's result is reused for its seed and budget)."""
        for seed in self.settings.seeds:
            for budget in self.settings.budgets:
                self.run_ours(config, budget, seed)

    def run_parameterizations(self, config: RegConfig) -> None:
        """Ours' pipeline in every other parameterization (`PARAMETERIZATIONS`) with `config`, at every budget, at
        the first training seed only (bounds the compute)."""
        for parameterization in PARAMETERIZATIONS:
            for budget in self.settings.budgets:
                self.run_ours(config, budget, self.settings.seeds[0], parameterization=parameterization)

    # ------------------------------------------------------------------------------------------------- table

    def baseline_fingerprint(self, method: str, seed: int | None = None) -> dict[str, Any]:
        """Fingerprint of a baseline result: `svd`, `svd_ft`, `asvd` (untrained ASVD) or `asvd_ft` (with `seed`)."""
        if method == "asvd":
            return {**self.fingerprint("svd"), **self.asvd_fingerprint()}
        return self.fingerprint(method, seed)

    def collect(self, config: RegConfig, extra: dict[str, RegConfig | None] | None = None) -> list[dict[str, Any]]:
        """Every stored result of the table for the current settings and seeds (missing ones are left out).

        Each row gets `seed`: its training seed, None for the results that do not train after the dense model.
        `extra` maps a row of ours (`ours_gradual`: 5e, `ours_asvd`: 5f) to its config: its fine-tuned results are
        added under that method, unless the config is `config` itself (None: no such row).
        """
        rows = [self._load("dense", self.settings.fingerprint("dense"), None)]
        for seed in self.settings.seeds:
            rows.append(self._load(self.name("dense_ft", seed=seed), self.fingerprint("svd_ft", seed), seed))
        for budget in self.settings.budgets:
            for method in ("svd", "asvd"):
                rows.append(self._load(self.name(method, budget), self.baseline_fingerprint(method), None))
            for method in ("svd_ft", "asvd_ft"):
                for seed in self.settings.seeds:
                    fingerprint = self.baseline_fingerprint(method, seed)
                    rows.append(self._load(self.name(method, budget, seed=seed), fingerprint, seed))
        for seed in self.settings.seeds:
            rows += self._collect_ours(config, seed)
            for method, other in (extra or {}).items():
                if other is not None and other != config:
                    found = [r for r in self._collect_ours(other, seed) if r and r["method"] == "ours"]
                    rows += [{**r, "method": method} for r in found]
        for parameterization in PARAMETERIZATIONS:
            rows += self._collect_ours(config, self.settings.seeds[0], parameterization)
        return [row for row in rows if row is not None]

    def _collect_ours(
        self, config: RegConfig, seed: int, parameterization: str = "svd"
    ) -> list[dict[str, Any] | None]:
        """Ours (pruned for "svd", and fine-tuned) at every budget from the regularized model of `seed` (one per
        budget when pruning gradually)."""
        rows = []
        for budget in self.settings.budgets:
            stored = self.stored_regularized(config, budget, seed, parameterization)
            if stored is None:
                continue
            regularized, fingerprint = stored
            for name in self.ours_names(config, budget, seed, parameterization).values():
                result = self._load(name, fingerprint, seed)
                rows.append(None if result is None else {**result, "regularized": regularized})
        return rows

    def _load(self, name: str, fingerprint: dict[str, Any], seed: int | None) -> dict[str, Any] | None:
        """A stored result (whatever `--force` says) tagged with its training seed, or None."""
        result = self.cache.load(name, fingerprint, ignore_force=True)
        return None if result is None else {**result, "seed": seed}


def _svd_config(config: RegConfig, parameterization: str = "svd") -> SVDConfig:
    """The factorization config of `parameterization` with the regularizers of `config` (CUR: none of them; its
    approximation term keeps the `SVDConfig` default weight)."""
    if parameterization == "cur":
        return SVDConfig(parameterization="cur", orth_weight=0.0, sparsity=None, prune_allocation="threshold")
    return SVDConfig(
        parameterization=parameterization,
        prune_allocation="threshold",
        orth_weight=config.orth_weight,
        sparsity=config.sparsity,
        sparsity_weight=config.sparsity_weight,
    )


def _target_params(model: torch.nn.Module) -> int:
    """Dense parameters `sum m n` of the layers the benchmark factors."""
    modules = dict(model.named_modules())
    return sum(dense_weight(modules[n]).numel() for n in target_names(model, BASELINE_CONFIG))
