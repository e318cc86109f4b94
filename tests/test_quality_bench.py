"""bench/quality_smollm2.py: the SmolLM2 study's data rules, plan, learning-rate choice and report."""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality_smollm2 as study  # noqa: E402


def _math(question: str, output: str, answer: str) -> dict:
    return {"instruction": question, "input": "", "output": output, "answer": answer}


def test_math_training_drops_test_questions_and_solutions_that_contradict_their_answer():
    tests = [_math("There are 7 crayons . Mary took 3 . How many now ?", "The answer is 4.", "4")]
    pool = [
        _math("There are 7 crayons. Mary took 3. How many now?", "7 - 3 = 4. The answer is 4.", "4.0"),  # a test question
        _math("Sam has 2 pens and buys 5.", "2 + 5 = 7. The answer is 7.", "7.0"),                       # kept
        _math("Ann has 10 cards, gives 4.", "10 - 4 = 6. The answer is 5.", "6.0"),                      # states 5, not 6
        _math("Which is a prime?", "2 is prime. The answer is (C).", "C"),                               # a letter answer
        _math("A farm has 1,200 cows and sells 200.", "1,200 - 200 = 1,000. The answer is 1,000.", "1000"),  # commas
    ]
    kept, counts = study.split_math(pool, tests)
    assert [r["instruction"] for r in kept] == [pool[1]["instruction"], pool[4]["instruction"]]
    assert counts == {"math_data": 5, "in_a_test_set": 1, "unseen_but_inconsistent_or_not_numeric": 2, "clean": 2}
    assert study.stated_answer("so 3 + 4 = 7. The answer is $7.50. Check: the answer is 7.5") == 7.5
    assert study.stated_answer("she has 4 left") is None


def test_srlora_paper_schedule_from_a_target_rank():
    schedule = study.srlora_paper_schedule(200, 16)
    # r' = 0.5 * 16 = 8 pairs; N_switch = (48 - 16) / 8 = 4; interval = 200 / 4 = 50; the switch at 200 is dropped
    assert schedule == {"pairs": 8, "target_rank": 48, "switches": 4, "start_step": 50, "interval": 50, "end_step": 199}
    import selora
    config = selora.SRLoRAConfig(start_step=50, interval=50, end_step=199, pairs_per_recomposition=8)
    assert config.recomposition_steps() == [50, 100, 150]
    assert study.srlora_paper_schedule(300, 32, target_rank=64)["interval"] == 150  # (64 - 32) / 16 = 2 switches


def test_plan_runs_the_sweep_first_then_every_method_once_then_the_extra_seeds():
    table = study.methods(200)
    jobs = study.plan(table, (0, 1, 2))
    kinds = [j["kind"] for j in jobs]
    assert kinds == sorted(kinds, key=["sweep", "base", "test"].index)
    assert len({j["id"] for j in jobs}) == len(jobs)
    assert sum(k == "sweep" for k in kinds) == sum(len(rates) for _, rates in study.SWEEP.values())
    tests = [j for j in jobs if j["kind"] == "test"]
    first_pass = tests[:len(table)]
    assert {j["method"] for j in first_pass} == set(table) and {j["seed"] for j in first_pass} == {0}
    headline = [name for name, m in table.items() if m.headline]
    assert [j["method"] for j in first_pass[:len(headline)]] == headline
    assert sorted((j["method"], j["seed"]) for j in tests[len(table):]) == sorted((n, s) for n in headline for s in (1, 2))
    narrowed = study.plan(table, (0,), only=["LoRA r16"])
    assert [j["kind"] for j in narrowed if j["kind"] != "sweep"] == ["base", "test"]
    # resuming: a finished run is not planned again, whatever file it came from
    assert study.pending_jobs(jobs, [{"id": jobs[0]["id"]}, {"id": "elsewhere"}]) == jobs[1:]


def _sweep(family: str, losses: list[float]) -> list[dict]:
    name, rates = study.SWEEP[family]
    return [{"id": f"{family}{lr}", "kind": "sweep", "method": name, "family": family, "lr": lr, "heldout_loss": loss}
            for lr, loss in zip(rates, losses)]


def test_learning_rate_is_chosen_on_held_out_loss_only_when_the_family_sweep_is_complete():
    lora = study.SWEEP["lora"][1]
    partial = _sweep("lora", [1.2, 1.1])
    assert study.choose_lr(partial, "lora") is None
    job = {"kind": "test", "method": "LoRA r8", "family": "lora", "seed": 0, "lr": None, "id": "t"}
    assert study.ready(job, partial) is None
    records = _sweep("lora", [1.2, 1.1, float("nan")])  # the largest rate diverged: never chosen
    assert study.choose_lr(records, "lora") == {"lr": lora[1], "losses": dict(zip(lora, [1.2, 1.1, records[2]["heldout_loss"]])),
                                                  "at_edge": False}
    assert study.ready(job, records)["lr"] == lora[1]
    assert study.choose_lr(_sweep("lora", [0.9, 1.0, 1.1]), "lora")["at_edge"]
    diverged = study.ready(job, _sweep("lora", [float("nan")] * 3))
    assert diverged["lr"] is None and "diverged" in diverged["skip"]
    assert study.ready({**job, "kind": "sweep"}, []) is not None  # sweep and base runs never wait


def _test_run(method: str, seed: int, math_loss: float, accuracy: float, trainable: int = 1000) -> dict:
    tasks = {t: {"kind": "math", "n": 300, "accuracy": accuracy, "answer_loss": math_loss, "seconds": 1.0}
             for t in study.MATH_SETS}
    tasks.update({t: {"kind": "choice", "n": 200, "accuracy": 0.5, "answer_loss": 0.2, "seconds": 1.0}
                  for t in study.CHOICE_SETS})
    return {"id": f"{method}{seed}", "kind": "test", "method": method, "family": "lora", "seed": seed, "lr": 1e-3,
            "trainable": trainable, "tasks": tasks, "loss_curve": [[s, 2.0 - s / 200] for s in range(1, 201)],
            "recompositions": [], "train_seconds": 20.0, "eval_seconds": 30.0, "wall_seconds": 60.0}


def test_report_tables_give_seed_means_and_spreads_and_the_comparisons_the_verdicts_need():
    records = [_test_run("LoRA r16", s, loss, acc) for s, loss, acc in ((0, 1.0, 0.10), (1, 1.2, 0.20), (2, 1.1, 0.30))]
    records += [_test_run("SeLoRA_W r16 50%", 0, 1.5, 0.05, trainable=500)]
    records += _sweep("lora", [1.2, 1.1, 1.3])
    text = study.tables(records, 200)
    lora_row = next(line for line in text.splitlines() if line.startswith("| LoRA r16 |"))
    assert "| 1,000 | 3 | 0.001 |" in lora_row
    assert "0.200 ± 0.100" in lora_row and "**1.100 ± 0.100**" in lora_row  # accuracy and math loss over 3 seeds
    assert "| SeLoRA_W r16 50% | 500 | 1 |" in text and "**1.500**" in text
    curve_row = [line for line in text.splitlines() if line.startswith("| LoRA r16 | 3 |")][-1]  # the last table
    assert "| 1.522 ± 0.000 |" in curve_row and "| 1.022 ± 0.000 |" in curve_row  # mean of steps 91-100, 191-200
    comparison = study.comparisons(records, 200)
    row = next(line for line in comparison.splitlines() if line.startswith("| same rank, half the parameters |"))
    assert "+0.400 (larger std 0.100)" in row and "-0.150 (larger std 0.100)" in row and "1 vs 3" in row
    assert "**1.1000**" in study.sweep_table(records)  # the chosen rate is marked
    assert study.stat([1.0]) == "1.000" and study.stat([]) == "-" and study.stat([1.0, float("nan")]) == "1.000"


def test_report_fills_only_the_marked_sections_and_names_a_missing_one():
    doc = "intro\n<!-- smollm2:tables -->\nold\n<!-- /smollm2:tables -->\nkept\n"
    assert study.fill(doc, {"tables": "new\n"}) == "intro\n<!-- smollm2:tables -->\nnew\n<!-- /smollm2:tables -->\nkept\n"
    with pytest.raises(SystemExit, match="smollm2:sweep"):
        study.fill(doc, {"sweep": "x\n"})
    quality_md = (Path(__file__).resolve().parents[1] / "docs" / "quality.md").read_text()
    study.fill(quality_md, {name: "x\n" for name in ("sweep", "tables", "comparisons", "timing")})


def test_results_from_several_calls_merge_with_the_later_file_winning(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(json.dumps({"id": "x", "v": 1}) + "\n" + json.dumps({"id": "y", "v": 1}) + "\n")
    second.write_text(json.dumps({"id": "x", "v": 2}) + "\n")
    merged = {r["id"]: r["v"] for r in study.read_results([first, second, tmp_path / "missing.jsonl"])}
    assert merged == {"x": 2, "y": 1}


def test_every_planned_run_resolves_to_a_valid_recipe_config():
    settings = study.Settings(model_preset="tiny_llama")
    study.validate(study.plan(study.methods(settings.steps), settings.seeds), settings)


def test_srlora_study_plans_its_headline_seeds_first_with_valid_configs_and_counts_steps_to_lora_final_loss():
    study.use_study("srlora")
    try:
        settings = study.Settings(**study.STUDY_SETTINGS["srlora"], model_preset="tiny_llama")
        jobs = study.plan(study.methods(settings.steps), settings.seeds)
        tests = [j for j in jobs if j["kind"] == "test"]
        headline = {name for name, m in study.methods(settings.steps).items() if m.headline}
        assert [j["method"] in headline for j in tests] == sorted((j["method"] in headline for j in tests), reverse=True)
        assert len([j for j in tests if j["method"] == "SRLoRA r4 (paper)"]) == 3 and not any(j["kind"] == "base" for j in jobs)
        one_each = list({(j["kind"], j["method"]): j for j in jobs}.values())
        study.validate(one_each, settings)  # every row at 800 steps, and the sweep's 300-step runs
        sweep = study.train_overrides({**jobs[0], "lr": 1e-3}, study.methods(800)[jobs[0]["method"]], settings, Path("/x"))
        assert "train.max_steps=300" in sweep
        lora = [_test_run("LoRA r4", s, 1.0, 0.1) for s in (0, 1)]  # training loss 2 - s/200: 1.0 at step 200
        slower = [{**_test_run("SRLoRA r4 (paper)", 0, 1.0, 0.1), "loss_curve": [[s, 2.2 - s / 200] for s in range(1, 201)]}]
        assert study.steps_to_reach(lora, 1.5) == [105, 105]  # the 10-step mean of steps 96-105 is 1.5
        table = study.convergence(lora + slower, 200)
        assert "| SRLoRA r4 (paper) | 1 | 1.223 | never (0 of 1 reach 1.022) |" in table
    finally:
        study.use_study("main")


def _mini_source(root: Path) -> Path:
    """A miniature LLM-Adapters folder: consistent math problems and two-label choice sets."""
    problems = [_math(f"Sam has {a} pens and buys {b} more. How many pens?", f"{a} + {b} = {a + b}. The answer is {a + b}.",
                      str(a + b)) for a in range(1, 9) for b in range(1, 5)]
    folders = {"math_data.json": problems[:20]}
    for i, name in enumerate(("AddSub", "SingleEq", "MultiArith", "gsm8k")):
        folders[f"{name}/test.json"] = problems[20 + 3 * i:23 + 3 * i]
    choice = [{"instruction": f"Is {n} even? Answer format: true/false", "input": "",
               "output": f"the correct answer is {str(n % 2 == 0).lower()}", "answer": str(n % 2 == 0).lower()}
              for n in range(12)]
    for folder in ("boolq", "ARC-Easy", "openbookqa"):
        folders[f"{folder}/train.json"], folders[f"{folder}/test.json"] = choice[:8], choice[8:]
    for name, records in folders.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(records))
    return root


def test_smoke_runs_the_pipeline_on_the_tiny_model_and_reports_every_row_and_column(tmp_path):
    study.main(["smoke", "--work", str(tmp_path / "work"), "--source", str(_mini_source(tmp_path / "source")),
                "--only", "LoRA r16"])
    results = study.read_results([tmp_path / "work" / "study" / "results.jsonl"])
    assert sorted(r["kind"] for r in results) == ["base", "sweep", "test", "test"]
    sections = (tmp_path / "work" / "docs" / "quality" / "smollm2" / "tables.md").read_text().split("## ")[1:]
    assert [s.split("\n")[0] for s in sections] == ["sweep", "tables", "comparisons", "timing"]
    rows = [line.split(" | ") for line in sections[1].splitlines() if line.startswith("| ")]
    widths = {len(study.MATH_SETS) * 2 + 6, len(study.CHOICE_SETS) * 2 + 2, 3 + 4}  # the three tables' columns
    assert {len(row) for row in rows} == widths
    assert [row[0] for row in rows if len(row) == max(widths)] == ["| method", f"| {study.BASE_ROW}", "| LoRA r16"]
    assert "| LoRA r16 | 2 |" in sections[1] and "| lora (LoRA r16) | 0.0005: **" in sections[0]
    for record in results:
        values = [record.get("heldout_loss")] if record["kind"] == "sweep" else \
            [t[k] for t in record["tasks"].values() for k in ("accuracy", "answer_loss")]
        assert values and all(math.isfinite(v) for v in values)
    assert (tmp_path / "work" / "docs" / "quality" / "smollm2" / "accuracy_vs_params.png").stat().st_size > 5000
