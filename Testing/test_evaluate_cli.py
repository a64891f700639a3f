"""`fob evaluate` on the real data (a small subset so it stays fast): table, JSON, Markdown section."""

from __future__ import annotations

import json

import pytest

from FoBSegmentLib.cli import main
from FoBSegmentLib.model.generator import FoBPromptGenerator


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
