"""The keys of `results/<scale>/summary.json` are a contract (README, "Public API"): this file holds the documented
list, and the committed results must carry every one of them with a value of the documented kind."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EVAL_FIELDS = ("clean_acc", "fgsm.ensemble_acc", "pgd.ensemble_acc", "pgd.best_single_acc", "pgd.best_single_source",
               "apgd.ensemble_acc", "square_acc", "transfer_from_ann_acc", "strong.robust_acc", "strong.whitebox_acc",
               "strong.converged")
DOCUMENTED = (
    "scale", "dataset", "T",
    "ann.clean.clean_acc", "ann.clean.pgd_acc_train_eps", "ann.pgd_at.clean_acc", "ann.pgd_at.pgd_acc_train_eps",
    "ann.pgd_at.pgd_acc_test_eps", "snn.converted.clean_acc", "snn.finetuned.clean_acc",
    "snn.finetuned.pgd_acc_train_eps", "snn.from_clean_ann.pgd_acc_train_eps",
    "eval.n_images", "eval.protocol",
    *(f"eval.snn.{m}.{f}" for m in ("finetuned", "e2e_at", "snn_rat") for f in EVAL_FIELDS),
    "eval.snn.e2e_at.train_time_s", "eval.snn.snn_rat.train_time_s", "eval.snn.finetuned.strong.single_source_acc",
    "eval.ann.pgd_at.pgd_acc", "eval.ann.pgd_at.apgd_acc", "eval.ann.pgd_at.square_acc",
    "eval.ann.pgd_at.strong.robust_acc",
)


def _committed(scale: str) -> dict:
    path = ROOT / "results" / scale / "summary.json"
    if not path.is_file():
        pytest.skip(f"no committed {scale} results")
    return json.loads(path.read_text())


@pytest.mark.parametrize("scale", ["ci", "cpu"])
def test_the_committed_summary_keeps_every_documented_key(scale):
    s = _committed(scale)
    missing = [k for k in DOCUMENTED if k not in s]
    assert not missing, f"documented summary keys missing from results/{scale}/summary.json: {missing}"
    for k in DOCUMENTED:
        v = s[k]
        if k.endswith(("_acc", "_eps", "train_time_s")):
            assert isinstance(v, float) and v == v, (k, v)  # floats, never NaN
            if k.endswith(("_acc", "_eps")):
                assert 0.0 <= v <= 1.0, (k, v)
        elif k.endswith("converged"):
            assert isinstance(v, bool), (k, v)
    assert s["scale"] == scale and s["eval.protocol"] == "strong" and isinstance(s["T"], int)
    for family, section in (("ablation.", "ablations"), ("ood.", "ood")):  # documented as families; at scale cpu
        if (ROOT / "results" / scale / f"{section}.json").is_file():  # these sections are later sittings
            assert any(k.startswith(family) for k in s), family
    if scale == "ci":
        assert all((ROOT / "results" / scale / f"{sec}.json").is_file() for sec in ("ablations", "ood"))
    assert all(isinstance(v, float) for k, v in s.items() if k.startswith("ablation.") and k.endswith("strong_acc"))


def test_the_readme_documents_the_key_families():
    text = (ROOT / "README.md").read_text()
    for k in ("ann.clean.clean_acc", "snn.converted.clean_acc", "eval.n_images", "eval.protocol", "eval.snn.e2e_at.*",
              "eval.snn.snn_rat.*", "eval.snn.finetuned.strong.single_source_acc", "eval.ann.pgd_at.strong.robust_acc",
              "ablation.*", "ood.*"):
        assert f"`{k}`" in text, k
