"""`fob evaluate` on the real data (a small subset so it stays fast): table, JSON, Markdown section."""

from __future__ import annotations

import json

import pytest

from FoBSegmentLib.cli import main
from FoBSegmentLib.model import FoBPromptGenerator


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    FoBPromptGenerator.from_config(image_size=64).save(path)
    return path


def test_evaluate_synapse_fold_writes_json_and_markdown(data_dir, small_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FOB_DATA", str(data_dir))
    out = tmp_path / "res.json"
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nkept text\n\n<!-- propagation:start -->\nother section\n<!-- propagation:end -->\n")
    argv = ["evaluate", "--dataset", "synapse", "--folds", "0", "--organs", "2", "--methods", "oracle", "coarse",
            "fob", "--model", str(small_model), "--segmenter", "grabcut", "--json", str(out),
            "--markdown", str(md), "--quiet", "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "right kidney" in printed and "oracle" in printed and "mean" in printed
    rep = json.loads(out.read_text())
    res = rep["datasets"]["synapse"]
    assert res["folds"] == [{"index": 0, "support": "synapse_ct/5", "queries": ["synapse_ct/1"],
                             "train": ["synapse_ct/7", "synapse_ct/11", "synapse_ct/15"]}]
    for m in ("oracle", "coarse", "fob"):
        assert 0.0 <= res["dice"][m]["right kidney"] <= 1.0
    # Oracle prompts with GrabCut on a real CT kidney: a working segmenter, and the upper bound here.
    assert res["dice"]["oracle"]["right kidney"] > 0.7
    assert res["dice"]["oracle"]["right kidney"] >= res["dice"]["fob"]["right kidney"]
    assert {r["query"] for r in res["records"]} == {"synapse_ct/1"}
    text = md.read_text()
    assert "kept text" in text and "other section" in text and "<!-- fob-protocol:start -->" in text
    # Rewriting replaces the section instead of appending a second one.
    from FoBSegmentLib.evaluate.report import markdown_report, write_section

    write_section(md, markdown_report(rep).replace("right kidney", "RK"))
    text = md.read_text()
    assert text.count("<!-- fob-protocol:start -->") == 1 and "| RK |" in text and "other section" in text
    # Reports of separate runs (e.g. one per dataset in parallel) merge without re-evaluating.
    other = dict(rep, datasets={"chaos": dict(res, title="copy")})
    (tmp_path / "other.json").write_text(json.dumps(other))
    merged = tmp_path / "merged.json"
    assert main(["evaluate", "--from-json", str(out), str(tmp_path / "other.json"), "--json", str(merged),
                 "--markdown", str(md)]) == 0
    assert sorted(json.loads(merged.read_text())["datasets"]) == ["chaos", "synapse"]
    assert "### copy" in md.read_text()
    (tmp_path / "bad.json").write_text("{}")
    assert main(["evaluate", "--from-json", str(tmp_path / "bad.json")]) == 2
    assert main(["evaluate", "--from-json", str(tmp_path / "missing.json")]) == 2


def test_setting2_models_per_fold_and_organ_are_checked_for_the_excluded_organ(data_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    """`--model` with {fold} and {organ}: each test organ gets its own model, and the report says,
    from the models' training summaries, whether the organ was excluded and the queries held out."""
    import shutil

    monkeypatch.setenv("FOB_DATA", str(data_dir))
    monkeypatch.setenv("FOB_CACHE", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    # A real (2-step) Setting II run without the right kidney, on fold 0's training volumes.
    assert main(["train", "--data", str(data_dir / "synapse_ct"), "--setting", "2", "--exclude-organs", "2",
                 "--steps", "2", "--threads", "1", "--quiet", "--fold", "0",
                 "--model-config", '{"image_size": 64}', "--out", str(runs / "fold0_organ2.safetensors")]) == 0
    summary = json.loads((runs / "fold0_organ2.train.json").read_text())
    assert summary["training_items"] == ["synapse_ct/7", "synapse_ct/11", "synapse_ct/15"]
    for suffix in (".safetensors", ".train.json"):  # the left kidney's "model" saw left-kidney labels
        shutil.copy(runs / f"fold0_organ2{suffix}", runs / f"fold0_organ3{suffix}")
    out, md = tmp_path / "res.json", tmp_path / "RESULTS.md"
    argv = ["evaluate", "--dataset", "synapse", "--folds", "0", "--organs", "2", "--methods", "fob",
            "--model", str(runs / "fold{fold}_organ{organ}.safetensors"), "--json", str(out), "--quiet",
            "--threads", "1", "--markdown", str(md), "--section", "heldout-setting2"]
    assert main(argv) == 0
    held = json.loads(out.read_text())["datasets"]["synapse"]["held_out"]
    assert held == {"0": {"queries_in_training": [], "settings": {"right kidney": 2},
                          "test_organ_excluded": {"right kidney": True}}}
    text = md.read_text()
    assert "<!-- heldout-setting2:start -->" in text and "Setting II, one model per fold and test organ; held out" in text
    assert main(argv[:6] + ["3"] + argv[7:]) == 0
    held = json.loads(out.read_text())["datasets"]["synapse"]["held_out"]["0"]
    assert held["test_organ_excluded"] == {"left kidney": False}
    assert "test organ NOT excluded in 1 of 1 models" in md.read_text()
    assert md.read_text().count("<!-- heldout-setting2:start -->") == 1
    capsys.readouterr()
    assert main(argv[:6] + ["4"] + argv[7:]) == 2  # no spleen model: said before anything is evaluated
    assert "1 per-fold model(s) missing" in capsys.readouterr().err
    assert main(argv[:-2] + ["--section", "Bad Name"]) == 2
    assert "section name" in capsys.readouterr().err
    assert main(["evaluate", "--dataset", "isic", "--model", str(runs / "fold{fold}_organ{organ}.safetensors")]) == 2
    assert "{organ}" in capsys.readouterr().err


def test_evaluate_rejects_bad_input(small_model, tmp_path, capsys):
    assert main(["evaluate", "--dataset", "isic", "--protocol", "fob", "--model", str(small_model)]) == 2
    assert "volume dataset" in capsys.readouterr().err
    assert main(["evaluate", "--methods", "magic", "--model", str(small_model)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["evaluate", "--dataset", "chaos", "--data", str(tmp_path / "none")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "missing.safetensors"), "--organs", "2"]) == 2


def test_protocol_propagation_is_dispatched(monkeypatch):
    prop = pytest.importorskip("FoBSegmentLib.evaluate.propagation")
    seen = {}

    def fake_run(args):
        seen["protocol"] = args.protocol
        return 0

    monkeypatch.setattr(prop, "run", fake_run)
    assert main(["evaluate", "--protocol", "propagation", "--dataset", "chaos"]) == 0
    assert seen == {"protocol": "propagation"}
