"""Train a reward probe on collected data and evaluate it on held-out prompts.

Reads collections written by ``launch/probe_collect.py`` (training prompts; a ``--val_fraction`` of them,
split by prompt, selects the checkpoint) and held-out collections (other prompts) for the reported metrics.
Writes the probe file (weights + normalisation + base model, transformer fingerprint, capture step, blocks,
feature set, metrics) and a metrics JSON beside it; an existing probe file is replaced only with
``--overwrite true``::

    python launch/probe_train.py --train_data runs/probe/train --test_data runs/probe/test \\
        --capture_step 2 --out runs/probe/probe-step2.pt
    python launch/probe_train.py ... --features attention --rank_weight 0   # an ablation
    python launch/probe_train.py ... --aux_targets shapes/objects shapes/extras shapes/relation  # auxiliary heads
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from probe.data import read_manifest
from probe.features import feature_config
from probe.train import FitConfig, train_from_collections
from rl.ablation import json_safe
from rl.config_help import ConfigParser
from rl.config_parse import check_flags, split_config_flag
from rl.paths import repository_hint
from rl.user_errors import run_cli


def _option(default, help: str = "", factory=None):
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainArgs:
    """Command-line options (also valid as keys of a ``--config`` YAML)."""

    train_data: list[str] = _option(None, "training collection directories", lambda: ["runs/probe/train"])
    test_data: list[str] = _option(None, "held-out collection directories (other prompts)", lambda: ["runs/probe/test"])
    capture_step: int | None = _option(
        None, "k: which stored capture to train on (default: the data's only one; data of several needs it)"
    )
    features: str = _option("combined", "feature set: attention, x0, combined, latents or all (probe/features.py)")
    reward_key: str | None = _option(None, 'a reward component such as "shapes/score" (default: the total)')
    val_fraction: float = _option(0.1, "share of training prompts held out for checkpoint selection")
    steps: int = _option(1500, "optimizer steps")
    batch_groups: int = _option(16, "prompt groups per batch")
    lr: float = _option(1e-3, "AdamW learning rate (cosine decay)")
    weight_decay: float = _option(1e-4, "AdamW weight decay")
    rank_weight: float = _option(1.0, "weight of the within-group pairwise ranking loss (0: MSE only)")
    aux_targets: list[str] = _option(
        None,
        "reward components the probe also learns to predict, one auxiliary head each (e.g. shapes/objects "
        "shapes/extras shapes/relation); only training reads them",
        list,
    )
    aux_weight: float = _option(0.5, "weight of the auxiliary heads' MSE")
    low_score_weight: float = _option(2.0, "MSE weight of rollouts below the low_score_quantile (oversampling)")
    low_score_quantile: float = _option(0.25, "reward quantile defining low scores")
    select_metric: str | None = _option(
        "within_group_srcc",
        "validation metric that picks the checkpoint: pcc, srcc, auc, within_group_srcc, top_half_recall or regret "
        "(the lowest)",
    )
    eval_every: int = _option(100, "validation interval (steps)")
    # Width 16: ~110k parameters, a probe file under 0.5 MB (width 32: ~380k, 1.5 MB).
    width: int = _option(16, "CNN width")
    group_relative: bool = _option(False, "also feed each rollout's deviation from its group mean (probe/model.py)")
    seed: int = _option(0, "split, init and batch order")
    out: str = _option("runs/probe/probe.pt", "probe file; the metrics JSON is written beside it (.json)")
    overwrite: bool = _option(False, "replace an existing --out probe file (and its .json)")
    threads: int = _option(0, "torch CPU threads (0: torch's default)")


def collection_steps(directory: str) -> list[int]:
    """The capture steps a collection holds (its manifest.json).

    Raises:
        FileNotFoundError: no collection there, naming the folder and how to make one.
    """
    if not (Path(directory) / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{directory} holds no probe data (no manifest.json){repository_hint(directory)}; collect it with "
            f"python launch/probe_collect.py --config <run config> --out {directory}"
        )
    return sorted(read_manifest(directory)["capture_steps"])


def resolve_capture_step(capture_step: int | None, directories: list[str]) -> int:
    """``capture_step``, or the data's only one when not given; checked against every collection.

    Raises:
        ValueError: a step the data lacks, or none given for data of several, naming the data's steps.
    """
    steps = {directory: collection_steps(directory) for directory in directories}
    shared = sorted(set.intersection(*(set(s) for s in steps.values())))
    held = ", ".join(f"{directory}: {s}" for directory, s in steps.items())
    if capture_step is None:
        if len(shared) == 1:
            return shared[0]
        raise ValueError(
            f"the data has capture steps {shared} ({held}): pass --capture_step with one of them"
            if shared
            else f"the collections share no capture step ({held}); collect them with the same --capture_steps"
        )
    if capture_step not in shared:
        raise ValueError(
            f"--capture_step {capture_step}: the data has capture steps {shared} ({held}); pass --capture_step "
            "with one of them, or collect that step (launch/probe_collect.py --capture_steps)"
        )
    return capture_step


def main(argv: list[str] | None = None) -> None:
    argv = split_config_flag(list(sys.argv[1:] if argv is None else argv))
    check_flags(argv, [f.name for f in dataclasses.fields(TrainArgs)])
    (args,) = ConfigParser((TrainArgs,), description=__doc__, allow_abbrev=False).parse_args_and_config(argv)
    feature_config(args.features)  # an unknown feature set, named before the data is read
    out = Path(args.out)
    if not args.overwrite and (existing := [p for p in (out, out.with_suffix(".json")) if p.exists()]):
        raise ValueError(
            f"{existing[0]} exists; choose another --out, or pass --overwrite true to replace it (a shipped probe "
            "under assets/probe/ is committed: write new ones under runs/)"
        )
    args.capture_step = resolve_capture_step(args.capture_step, [*args.train_data, *args.test_data])
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    fit_config = FitConfig(
        steps=args.steps,
        batch_groups=args.batch_groups,
        lr=args.lr,
        weight_decay=args.weight_decay,
        rank_weight=args.rank_weight,
        aux_weight=args.aux_weight,
        low_score_quantile=args.low_score_quantile,
        low_score_weight=args.low_score_weight,
        eval_every=args.eval_every,
        select_metric=args.select_metric,
        seed=args.seed,
    )
    probe, report = train_from_collections(
        args.train_data,
        args.test_data,
        args.capture_step,
        args.features,
        fit_config,
        model_kwargs={"width": args.width, "group_relative": args.group_relative},
        val_fraction=args.val_fraction,
        reward_key=args.reward_key,
        aux_keys=args.aux_targets,
        progress=True,
    )
    probe.save(out)
    summary = {
        "probe": str(out),
        "capture_step": args.capture_step,
        "features": args.features,
        "auc_label": "real reward > median real reward of the test set",
        "test": report.test,
        "validation": report.validation,
        "train_rollouts": report.train_rollouts,
        "test_rollouts": report.test_rollouts,
        "args": dataclasses.asdict(args),
    }
    out.with_suffix(".json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))  # NaN: null
    metrics = report.test
    print(
        f"held-out ({report.test_rollouts} rollouts): pcc {metrics['pcc']:.3f} srcc {metrics['srcc']:.3f} "
        f"auc {metrics['auc']:.3f} within-group srcc {metrics['within_group_srcc']:.3f} "
        f"top-half recall {metrics['top_half_recall']:.3f} regret {metrics['regret']:.4f} "
        f"(random {metrics['regret_random']:.4f}) -> {out}"
    )


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
