"""`mmssl report` (eval/report.py): results gathered from hand-written JSON files in two fake run
directories, rows and numbers in the Markdown, excluded folders, skipped files counted, PNGs written."""
from __future__ import annotations

import json
from pathlib import Path

from mmssl.eval.report import build_report, collect, main_report


def _summary(acc: float, std: float, lo: float, hi: float, prefix: str = "") -> dict:
    k = prefix + "accuracy"
    return {k: acc, f"{k}_std": std, f"{k}_ci95": [lo, hi], f"{k}_per_seed": [acc - std, acc + std]}


def _write(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def _runs(root: Path) -> tuple[Path, Path]:
    a, b = root / "speech-run", root / "image-run"
    _write(a / "config.yaml", "modality:\n  speech: {preset: speech-synth}\nobjective:\n  name: hubert\n"
                              "trainer:\n  max_steps: 300\n")
    # the run stopped early: the last logged step wins over trainer.max_steps
    (a / "metrics.jsonl").write_text('{"step": 10, "loss": 3.0}\n{"step": 200, "loss": 2.0}\n{"step": 2')
    _write(a / "probe" / "linear_probe.json", {  # the core probe: no "evaluator" key
        "accuracy": 0.602, "random_init_accuracy": 0.394, "features_baseline_accuracy": 0.55, "layer": -1,
        "pool": "mean", "n_train": 2000, "modality": "speech"})
    fractions = [{"label_fraction": 0.1, "n_train": 200, **_summary(0.5, 0.02, 0.45, 0.55),
                  **_summary(0.3, 0.01, 0.27, 0.33, "random_init_")},
                 {"label_fraction": 1.0, "n_train": 2000, **_summary(0.6, 0.01, 0.57, 0.63),
                  **_summary(0.36, 0.015, 0.33, 0.39, "random_init_")}]
    _write(a / "eval" / "layer_probe.json", {
        "evaluator": "layer_probe", "modality": "speech", "seeds": 2, "label_fractions": fractions,
        **_summary(0.6, 0.01, 0.57, 0.63), **_summary(0.36, 0.015, 0.33, 0.39, "random_init_"),
        "layer_names": ["block0", "block1", "block2"], "layer_weights": [0.5, 0.125, 0.375],
        "random_init_layer_weights": [0.25, 0.5, 0.25], "per_layer_accuracy": [0.61, 0.58, 0.62],
        "random_init_per_layer_accuracy": [0.37, 0.35, 0.38],
        "best_single_layer": {"layer": "block2", "accuracy": 0.62}})
    _write(a / "eval" / "broken.json", '{"evaluator": "knn", "accuracy": 0.4')  # cut short: unreadable
    _write(a / "checkpoints" / "last" / "eval.json", {"evaluator": "knn", "accuracy": 0.999,
                                                       "random_init_accuracy": 0.1})
    _write(a / "encoders" / "speech" / "config.json", {"modality": "speech"})

    _write(b / "config.yaml", "modality:\n  image: {}\nobjective:\n  name: mae\ntrainer:\n  max_steps: 600\n")
    _write(b / "knn" / "knn.json", {"evaluator": "knn", "modality": "image", "seeds": 1, "k": 20,
                                     "label_fractions": [{"label_fraction": 1.0, "n_train": 5000,
                                                          **_summary(0.41, 0.0, 0.38, 0.44),
                                                          **_summary(0.3, 0.0, 0.27, 0.33, "random_init_")}],
                                     **_summary(0.41, 0.0, 0.38, 0.44), **_summary(0.3, 0.0, 0.27, 0.33, "random_init_")})
    _write(b / "ft" / "finetune.json", {"evaluator": "finetune", "modality": "image"})  # partial: no accuracy
    _write(b / "data" / "meta.json", {"classes": ["a", "b"]})  # not a result at all
    _write(b / "heads" / "x.json", "not json")  # excluded folder: never read
    return a, b


def test_report_rows_numbers_and_plots(tmp_path: Path) -> None:
    a, b = _runs(tmp_path)
    md = build_report([a, b], tmp_path / "rep")
    text = md.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    body = {tuple(c.strip() for c in line.strip("|").split("|")) for line in rows[1:] if "layer weight" not in line
            and "single-layer" not in line and not line.startswith("| |")}
    assert ("image-run", "image", "mae", "600", "knn", "k 20", "1", "5000", "1", "0.410 [0.380, 0.440]",
            "0.300 [0.270, 0.330]", "+0.110", "knn/knn.json") in body
    assert ("speech-run", "speech", "hubert", "200", "layer_probe", "best single layer block2 0.620", "0.1", "200", "2",
            "0.500 ± 0.020 [0.450, 0.550]", "0.300 ± 0.010 [0.270, 0.330]", "+0.200", "eval/layer_probe.json") in body
    assert ("speech-run", "speech", "hubert", "200", "layer_probe", "best single layer block2 0.620", "1", "2000", "2",
            "0.600 ± 0.010 [0.570, 0.630]", "0.360 ± 0.015 [0.330, 0.390]", "+0.240", "eval/layer_probe.json") in body
    assert ("speech-run", "speech", "hubert", "200", "linear_probe",
            "layer -1, pool mean, classical features 0.550", "1", "2000", "1", "0.602", "0.394", "+0.208",
            "probe/linear_probe.json") in body
    assert len(body) == 4  # nothing from checkpoints/, encoders/, heads/ or data meta
    assert "0.999" not in text
    # the layer-weight table
    assert "| layer weight | 0.500 | 0.125 | 0.375 |" in text
    assert "| single-layer accuracy, random init | 0.370 | 0.350 | 0.380 |" in text
    # skipped files are counted and named, not fatal
    assert "2 skipped" in text and "2 files skipped" in text
    assert "broken.json`: unreadable JSON" in text and "finetune.json`: partial: no accuracy, random_init_accuracy" in text
    for png in ("layer_accuracy.png", "label_fractions.png", "pretrained_vs_random.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 0 and f"]({png})" in text


def test_malformed_json_is_skipped_and_missing_runs_counted(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    _write(run / "eval" / "linear_probe.json", "[1, 2")
    _write(run / "eval" / "knn.json", {"evaluator": "knn", "accuracy": 0.5, "random_init_accuracy": 0.2,
                                       "label_fractions": [{"label_fraction": 0.1}]})
    results, skipped = collect([run, tmp_path / "missing"])
    assert results == []
    assert sorted(why for _, why in skipped) == ["not a directory", "partial: malformed label_fractions",
                                                 "unreadable JSON (JSONDecodeError)"]
    md = main_report([run, tmp_path / "missing"], tmp_path / "rep")
    assert "3 files skipped" in md.read_text() and "## Results" not in md.read_text()
    assert not list((tmp_path / "rep").glob("*.png"))  # nothing to plot
    assert str(md) in capsys.readouterr().out
    # a result whose per-layer lists are garbage still gives its row, without a layer table or plot
    _write(run / "lp" / "layer_probe.json", {"evaluator": "layer_probe", "accuracy": 0.5, "random_init_accuracy": 0.2,
                                             "layer_names": ["block0"], "per_layer_accuracy": ["x"],
                                             "layer_weights": [1.0, 2.0]})
    text = build_report([run], tmp_path / "rep2").read_text()
    assert "| 0.500 | 0.200 | +0.300 | lp/layer_probe.json |" in text and "Layer-weighted" not in text
    assert sorted(p.name for p in (tmp_path / "rep2").glob("*.png")) == ["pretrained_vs_random.png"]


def test_results_outside_a_run_find_it_through_their_encoder(tmp_path: Path) -> None:
    a, _ = _runs(tmp_path)
    out = tmp_path / "elsewhere"
    _write(out / "knn.json", {"evaluator": "knn", "modality": "speech", "encoder": str(a / "encoders" / "speech"),
                              "accuracy": 0.5, "random_init_accuracy": 0.25})
    (res,), skipped = collect([out])
    assert not skipped and (res.run.name, res.run.objective, res.run.steps) == ("elsewhere", "hubert", "200")
    assert res.rows == [{"label_fraction": 1.0, "n_train": None, "accuracy": 0.5, "random_init_accuracy": 0.25}]


def test_retrieval_results_get_their_own_table(tmp_path: Path) -> None:
    run = tmp_path / "clip-run"
    keys = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")
    rec = {"evaluator": "retrieval", "modalities": ["image", "text"], "n_items": 1000, "n_captions": 180,
           **{k: 0.5 + i / 100 for i, k in enumerate(keys)}, **{f"random_init_{k}": 0.01 for k in keys}}
    _write(run / "eval" / "retrieval.json", rec)
    _write(run / "other" / "retrieval.json", {"evaluator": "retrieval", "i2t_R@1": 0.3})  # partial: left out
    results, skipped = collect([run])
    assert results == [] and skipped == []  # recalls are not accuracies: not in the accuracy table
    md = build_report([run], tmp_path / "rep").read_text()
    assert "## Retrieval" in md and "| clip-run | image+text | 1000 | 180 | 0.500 / 0.010 | 0.510 / 0.010 |" in md
    assert md.count("| clip-run | image+text") == 1
