"""Artifact addresses that cannot go stale: every field a stage's builder reads is covered by the stage's address
(recorded by running the builders on a `RecordingConfig`), and changing any field changes exactly the addresses of
the stages that depend on it."""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from rsnn_paper.config import (LEGACY_VALUES, STAGE_GROUPS, UNKEYED_FIELDS, Config, RecordingConfig, get_config,
                               keyed_fields, stage_key)
from rsnn_paper.store import ArtifactStore

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import _tiny_data  # noqa: E402

STAGES = tuple(STAGE_GROUPS)
ALL = frozenset(STAGES)
ANN_CHAIN = frozenset({"ann", "convert", "finetune"})

#: For every Config field, the stages whose address must change when it changes (a stage built on another's artifact
#: changes with its parent). Every field is listed exactly once; a new field fails the test until it is placed here.
EXPECTED: dict[frozenset, tuple[str, ...]] = {
    frozenset(): ("scale", "device", "workers", "out_dir", "snapshot_every",  # how and where a run is made, what it keeps
                  "test_dataset", "n_test", "sweep_T_max", "n_sweep", "eps_test", "eval_pgd_steps", "eval_batch_size",
                  "n_eval", "apgd_steps", "square_queries", "eps_curve", "strong_steps", "strong_restarts",
                  "strong_targets", "strong_sources", "conv_sources", "conv_tol", "conv_rounds", "ablation_alphas", "ablation_T",
                  "ablation_ann_objectives", "n_ablation", "ood_severities", "n_ood", "headline_seeds", "n_budget",
                  "e2e_full_attacks", "curve_claims"),  # evaluation
    ALL: ("seed", "dataset", "n_train", "n_val", "arch", "width", "channels_last", "eps_train", "val_attack_steps",
          "n_val_eval"),
    ANN_CHAIN: ("ann_epochs", "ann_batch_size", "ann_lr", "ann_momentum", "ann_weight_decay", "ann_cutout",
                "train_attack_steps", "trades_beta", "mart_beta"),
    frozenset({"convert", "finetune"}): ("T_search", "search_batches", "search_batch_size", "percentile",
                                         "percentile_method", "search_fresh_batches", "threshold_scale",
                                         "bn_calib_batches"),
    frozenset({"convert", "finetune", "e2e"}): ("T",),
    frozenset({"finetune"}): ("ft_objective", "ft_adversary", "ft_epochs", "ft_n_train", "ft_batch_size", "ft_lr",
                              "ft_momentum", "ft_weight_decay", "ft_eps", "ft_alpha", "ft_beta", "ft_pgd_steps",
                              "learn_thresholds", "ft_bn_init"),
    frozenset({"e2e"}): ("e2e_epochs", "e2e_batch_size", "e2e_lr", "e2e_weight_decay", "e2e_attack_steps",
                         "e2e_n_train", "rat_beta"),
}
EXPECTED_BY_FIELD = {f: stages for stages, names in EXPECTED.items() for f in names}
FIELDS = [f.name for f in dataclasses.fields(Config)]


def test_the_table_lists_every_field_once():
    listed = [f for names in EXPECTED.values() for f in names]
    assert sorted(listed) == sorted(FIELDS), (set(FIELDS) ^ set(listed), len(listed), len(set(listed)))


def _changed(name: str, value):
    "A different value of field `name` of the same type (enough for an address: stage_key validates nothing)."
    if value is None:
        return 7
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "_changed"
    if isinstance(value, tuple):
        return value + (value[0],) if value else (1,)
    raise TypeError(f"no changed value for {name}={value!r}")


def _keys(cfg: Config) -> dict[str, tuple]:
    "The addresses of every stage under `cfg`, each built on its parent's address under the same `cfg`."
    out = {"ann": (), "convert": (), "finetune": (), "e2e": ()}
    for obj in ("clean", "pgd_at"):
        a = stage_key(cfg, "ann", objective=obj)
        c = stage_key(cfg, "convert", parent=a)
        out["ann"] += (a,)
        out["convert"] += (c,)
        out["finetune"] += (stage_key(cfg, "finetune", parent=c),)
    out["e2e"] = tuple(stage_key(cfg, "e2e", baseline=b) for b in ("e2e_at", "snn_rat"))
    return out


@pytest.mark.parametrize("scale", ["ci", "paper"])
@pytest.mark.parametrize("name", FIELDS)
def test_a_field_changes_the_addresses_of_exactly_its_stages(scale, name):
    cfg = get_config(scale)
    before = _keys(cfg)
    after = _keys(dataclasses.replace(cfg, **{name: _changed(name, getattr(cfg, name))}))
    changed = {s for s in STAGES if after[s] != before[s]}
    assert changed == EXPECTED_BY_FIELD[name], f"{name}: changes {sorted(changed)}"
    assert changed == {s for s in STAGES if name in keyed_fields(s)}  # the table agrees with the stage groups


def test_legacy_values_keep_the_old_addresses():
    # a knob keyed after artifacts were stored enters the address only off its legacy value
    for name, legacy in LEGACY_VALUES.items():
        cfg = get_config("ci", **{name: legacy})
        payload_free = _keys(cfg)
        assert _keys(cfg.replace(**{name: legacy})) == payload_free
        assert _keys(cfg.replace(**{name: _changed(name, legacy)})) != payload_free


TINY = Config(scale="ci", device="cpu", arch="vgg11", width=1 / 16, ann_epochs=1, ann_batch_size=32,
              train_attack_steps=1, T_search=2, search_batches=1, search_batch_size=16, bn_calib_batches=1, T=2,
              ft_epochs=1, ft_n_train=32, ft_batch_size=16, ft_pgd_steps=1, e2e_epochs=1, e2e_n_train=32,
              e2e_batch_size=16, e2e_attack_steps=1, val_attack_steps=1, n_val_eval=16)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The fields each stage's builder reads, recorded over its branches (every ANN objective and baseline, both
    threshold-search and BN-start variants, every finetuning adversary), each build forced (no cached artifact)."""
    from rsnn_paper.ann import ANN_OBJECTIVES, build_ann
    from rsnn_paper.baselines import BASELINES, build_e2e
    from rsnn_paper.conversion import build_converted
    from rsnn_paper.finetune import build_finetuned
    torch.set_num_threads(1)
    store = ArtifactStore(tmp_path_factory.mktemp("artifacts"))
    data = _tiny_data(64)
    train, val = data, data.subset(range(32))
    splits = (train, val, data.subset(range(16)))
    reads = {s: set() for s in STAGES}
    for obj in ANN_OBJECTIVES:
        rec = RecordingConfig(TINY)
        ann, ameta = build_ann(rec, obj, store, splits, force=True, progress=False)
        reads["ann"] |= rec.reads
    for fresh in (True, False):
        rec = RecordingConfig(TINY.replace(search_fresh_batches=fresh))
        conv, cmeta = build_converted(rec, ann, ameta["key"], train, store, force=True, progress=False)
        reads["convert"] |= rec.reads
    for changes in (dict(), dict(ft_adversary="pgd", ft_bn_init="reset", ft_objective="at"), dict(ft_objective="none")):
        rec = RecordingConfig(TINY.replace(**changes))
        build_finetuned(rec, conv, cmeta["key"], train, val, store, force=True, progress=False)
        reads["finetune"] |= rec.reads
    for kind in BASELINES:
        rec = RecordingConfig(TINY)
        build_e2e(rec, kind, store, splits, force=True, progress=False)
        reads["e2e"] |= rec.reads
    return reads


def test_every_field_a_stage_reads_is_in_its_address(recorded):
    for stage, reads in recorded.items():
        assert reads, f"nothing recorded for {stage}"
        missing = reads - keyed_fields(stage) - set(UNKEYED_FIELDS)
        assert not missing, (f"the {stage} builder reads {sorted(missing)} but its address does not cover them: add "
                             f"them to STAGE_FIELDS (and to LEGACY_VALUES with the value stored artifacts were built "
                             f"with)")


def test_the_table_agrees_with_what_the_stages_read(recorded):
    for stage, reads in recorded.items():
        for name in reads - set(UNKEYED_FIELDS):
            assert stage in EXPECTED_BY_FIELD[name], (stage, name)
    # the builders do read the settings they are known to depend on (the recording works through calls)
    assert {"ann_lr", "trades_beta", "mart_beta", "seed", "arch"} <= recorded["ann"]
    assert {"T_search", "percentile", "percentile_method", "bn_calib_batches"} <= recorded["convert"]
    assert {"ft_alpha", "ft_bn_init", "ft_adversary", "n_val_eval"} <= recorded["finetune"]
    assert {"rat_beta", "e2e_attack_steps", "T"} <= recorded["e2e"]


def test_the_recorder_catches_an_unkeyed_read():
    rec = RecordingConfig(get_config("ci"))
    assert stage_key(rec, "ann", objective="clean") == stage_key(get_config("ci"), "ann", objective="clean")
    assert rec.reads == set()  # the address's own reads are not the stage's
    _ = rec.eps_test, rec.to_dict()
    assert rec.reads == {"eps_test"} and not rec.reads <= keyed_fields("finetune")
