"""The ablation benchmark's bookkeeping: equal budgets, result cache and the README table."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import ablation  # noqa: E402


def _flatten(d, prefix=""):
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


@pytest.mark.parametrize("dataset", sorted(ablation.DATASETS))
@pytest.mark.parametrize("setting", sorted(ablation.SETTINGS))
def test_settings_differ_only_in_their_technique(dataset, setting):
  budget = ablation.BUDGETS["full"][dataset]
  base = _flatten(ablation.make_config(dataset, "velocity, IS", budget).to_dict())
  this = _flatten(ablation.make_config(dataset, setting, budget).to_dict())
  changed = {k for k in base if base[k] != this[k]}
  assert changed == {k for k, v in ablation.SETTINGS[setting].items() if base[k] != v}
  assert this["training.num_steps"] == budget["steps"]
  assert this["training.checkpoint_every"] == budget["interval"]


def test_cache_is_keyed_by_budget_and_table_marks_missing_cells(tmp_path, monkeypatch):
  monkeypatch.setattr(ablation, "RESULTS", str(tmp_path))
  budgets = {"digits": dict(ablation.BUDGETS["quick"]["digits"]),
             "photo_patches": dict(ablation.BUDGETS["quick"]["photo_patches"])}
  entry = {"bpd": 2.5, "bpd_stderr": 0.03, "sde_bpd": 2.25}
  per = {"baselines": {"per-pixel categorical": {"bpd": 2.41, "bpd_stderr": 0.02}},
         "velocity, IS": {"steps": 600, "curve": [{"step": 200, "bpd": 3.0,
                                                   "bpd_stderr": 0.1}],
                          "eval": {"tn_K1": entry, "u_K1": dict(entry, bpd=2.75)}}}
  ablation.save_dataset("digits", per, budgets["digits"], "_quick")
  assert (tmp_path / "convergence_digits_quick.png").exists()
  assert ablation.load_cached("digits", budgets["digits"], "_quick") == per
  other = dict(budgets["digits"], steps=601)
  assert ablation.load_cached("digits", other, "_quick") == {}
  assert ablation.load_cached("photo_patches", budgets["photo_patches"], "_quick") == {}
  more_evals = dict(budgets["digits"], evals=ablation.ALL_EVALS[:1])
  assert ablation.load_cached("digits", more_evals, "_quick") == per

  ablation.write_table(budgets, "_quick")
  table = (tmp_path / "ablation_quick.md").read_text()
  row = next(line for line in table.splitlines() if "| velocity, IS |" in line)
  cells = [c.strip() for c in row.split("|")[1:-1]]
  assert cells == ["digits", "velocity, IS", "600", "2.500 +- 0.030", "2.750 +- 0.030", "-",
                   "2.250", "-", "-"]
  assert "baseline: per-pixel categorical" in table
  assert "photo_patches" not in table  # nothing cached for it


def test_steps_to_reach_is_the_first_checkpoint_at_or_below_the_target():
  curve = [{"step": 500, "bpd": 3.0}, {"step": 1000, "bpd": 2.4},
           {"step": 1500, "bpd": 2.5}, {"step": 2000, "bpd": 2.2}]
  assert ablation.steps_to_reach(curve, 2.4) == 1000
  assert ablation.steps_to_reach(curve, 2.3) == 2000
  assert ablation.steps_to_reach(curve, 2.1) is None


def test_every_budget_trains_to_its_last_curve_point():
  # train_with_curve stops at multiples of the interval: a remainder would go untrained.
  for name, budgets in ablation.BUDGETS.items():
    for dataset, budget in budgets.items():
      assert dataset in ablation.DATASETS, (name, dataset)
      assert budget["steps"] % budget["interval"] == 0, (name, dataset)
      assert set(map(tuple, budget["evals"])) <= set(ablation.ALL_EVALS), (name, dataset)
  assert ablation.LONG_SETTING in ablation.SETTINGS
  assert ablation.LONG_SETTING not in ablation.FINETUNE_FROM
