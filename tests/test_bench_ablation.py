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
  # Results of another network layout are neither resumed nor merged.
  real_fields = ablation.network_fields
  monkeypatch.setattr(ablation, "network_fields",
                      lambda d: dict(real_fields(d), num_groups=32))
  assert ablation.load_cached("digits", budgets["digits"], "_quick") == {}
  monkeypatch.setattr(ablation, "network_fields", real_fields)

  ablation.write_table(budgets, "_quick")
  table = (tmp_path / "ablation_quick.md").read_text()
  row = next(line for line in table.splitlines() if "| velocity, IS |" in line)
  cells = [c.strip() for c in row.split("|")[1:-1]]
  assert cells == ["digits", "velocity, IS", "600", "2.500 +- 0.030", "2.750 +- 0.030", "-",
                   "2.250", "-", "-"]
  assert "baseline: per-pixel categorical" in table
  assert "network: channels 32, num_groups 8" in table
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


def test_paired_difference_and_its_standard_error():
  a, b = [3.0, 2.0, 4.5, 1.0], [2.5, 2.0, 3.5, 1.5]
  mean, se = ablation.paired(a, b)
  d = [0.5, 0.0, 1.0, -0.5]  # by hand: mean 0.25, sample sd sqrt(0.41667), n = 4
  assert mean == pytest.approx(sum(d) / 4)
  assert se == pytest.approx((sum((x - 0.25) ** 2 for x in d) / 3) ** 0.5 / 2)


def test_settings_run_as_two_processes_keep_each_others_results(tmp_path, monkeypatch):
  # Two processes share ablation_<data>_long.json: each saves the entries it ran, read
  # at start or not, and neither may drop the other's.
  monkeypatch.setattr(ablation, "RESULTS", str(tmp_path))
  monkeypatch.setattr(ablation, "_plot", lambda *a: None)
  monkeypatch.setattr(ablation, "_plot_paired", lambda *a: None)
  budget = ablation.BUDGETS["long"]["photo_patches"]
  first = {"baselines": {}}
  second = {"baselines": {}}  # both loaded before either finished a setting
  first["velocity, IS"] = {"steps": 1, "curve": [], "eval": {}}
  ablation.save_dataset("photo_patches", first, budget, "_long")
  second["velocity, IS, train u-deq"] = {"steps": 2, "curve": [], "eval": {}}
  ablation.save_dataset("photo_patches", second, budget, "_long")
  cached = ablation.load_cached("photo_patches", budget, "_long")
  assert set(cached) == {"baselines", "velocity, IS", "velocity, IS, train u-deq"}
  assert "velocity, IS" in second  # the saving process learns the other's entries


def test_long_photo_budget_curve_points_survive_a_killed_run(tmp_path, monkeypatch):
  # train_with_curve reuses the points a killed run measured and trains only the rest.
  trained, measured = [], []
  monkeypatch.setattr(ablation.run, "train", lambda c, w: trained.append(c.training.num_steps))
  monkeypatch.setattr(ablation.dj, "load", lambda w: None)

  def point(model, images, budget, step):
    measured.append(step)
    return {"step": step, "bpd": 1.0}

  monkeypatch.setattr(ablation, "curve_point", point)
  budget = dict(ablation.BUDGETS["long"]["photo_patches"], steps=30, interval=10)
  config = ablation.make_config("photo_patches", "velocity, IS", budget)
  workdir = str(tmp_path)
  ablation._save_curve(workdir, [{"step": 10, "bpd": 2.0}])  # what the killed run left
  curve = ablation.train_with_curve(config, workdir, None, budget)
  assert trained == [20, 30] and measured == [20, 30]
  assert [c["step"] for c in curve] == [10, 20, 30] and curve[0]["bpd"] == 2.0
  assert ablation._load_curve(workdir) == curve and config.training.num_steps == 30


def test_paired_table_rows_from_per_image_values():
  budget = ablation.BUDGETS["long"]["photo_patches"]
  def bound(values):
    return {"bpd": sum(values) / len(values), "bpd_stderr": 0.1, "nfe_mean": 100.0,
            "per_image": values}
  point = {"step": 2000, "tn": bound([3.0, 3.2, 3.1]), "u": bound([2.9, 3.0, 3.1]),
           "sde": bound([2.5, 2.6, 2.7]), "sample_nfe": 300.0}
  final = {"tn_K1": dict(bound([3.0, 3.0, 3.0]), sde_per_image=[2.0, 2.0, 2.0]),
           "u_K1": bound([2.0, 2.5, 3.0])}
  per = {"baselines": {"Gaussian mixture (u-deq)": dict(bound([2.0, 2.0, 2.0]))},
         "velocity, IS": {"curve": [point], "eval": final}}
  lines = "\n".join(ablation.paired_lines("photo_patches", per, budget))
  row = next(line for line in lines.splitlines() if line.startswith("| velocity, IS | 2000"))
  cells = [c.strip() for c in row.split("|")[1:-1]]
  assert cells[4] == "+0.100 +- 0.058"  # differences 0.1, 0.2, 0.0 (sd 0.1, n = 3)
  assert cells[6] == "+0.500 +- 0.058" and cells[7] == "100 / 100" and cells[8] == "300"
  assert "| bin-centre tn - bin-centre u | +0.500 +- 0.289 |" in lines
  assert "| velocity, IS tn - Gaussian mixture | +1.000 +- 0.000 |" in lines
  assert "| velocity, IS: tn - ELBO | +1.000 +- 0.000 |" in lines


def test_paired_differences_of_the_final_models_are_per_image_means():
  """The final-model rows of the table are means +- standard errors of per-image
  differences (checked here against numbers worked out by hand)."""
  a, b = [1.0, 2.0, 4.0], [0.5, 1.0, 3.0]  # differences 0.5, 1.0, 1.0: mean 5/6
  se = (((0.5 - 5 / 6) ** 2 + 2 * (1 / 6) ** 2) / 2) ** 0.5 / 3 ** 0.5
  per = {"eps, uniform t": {"eval": {"tn_K1": {"bpd": 7 / 3, "per_image": b,
                                               "sde_per_image": b, "nfe_mean": 100.0}}},
         "velocity, IS": {"eval": {"tn_K1": {"bpd": 2.5, "per_image": a,
                                             "sde_per_image": b, "nfe_mean": 90.0}}}}
  lines = ablation.final_lines(per, {"test_images": 3})
  row = next(l for l in lines if l.startswith("| velocity, IS tn - eps, uniform t tn |"))
  assert row == f"| velocity, IS tn - eps, uniform t tn | +{5 / 6:.3f} +- {se:.3f} |"
  assert any(l.startswith("| velocity, IS: tn - ELBO |") for l in lines)
  assert ablation._pm((0.0021, 0.0003)) == "+0.0021 +- 0.0003"  # no "+- 0.000"


def test_compare_results_ignores_only_timing_and_commit(tmp_path, capsys, monkeypatch):
  """bench/compare_results.py: a file that differs in wall time and commit only is
  identical; one changed digit of a bits/dim is a difference (exit 1)."""
  import json

  import compare_results

  row = {"steps": 600, "train_seconds": 12.0, "commit": "abc",
         "eval": {"tn": {"bpd": 2.1501, "wall_s": 3.0}}}
  old, same, changed = (tmp_path / n for n in ("old.json", "same.json", "changed.json"))
  old.write_text(json.dumps({"results": {"s": row}}))
  same.write_text(json.dumps({"results": {"s": {**row, "train_seconds": 99.0, "commit": "d",
                                                 "eval": {"tn": {"bpd": 2.1501,
                                                                 "wall_s": 9.0}}}}}))
  changed.write_text(json.dumps({"results": {"s": {**row, "eval": {"tn": {"bpd": 2.1502}}}}}))
  for new, status, word in ((same, 0, "identical"), (changed, 1, "differs in eval")):
    monkeypatch.setattr(sys, "argv", ["compare_results.py", str(old), str(new)])
    assert compare_results.main() == status
    assert word in capsys.readouterr().out
