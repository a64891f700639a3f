"""`fob models list | download | verify` through FoBSegmentLib.cli.main."""

from __future__ import annotations

import pytest
from test_weights import PAYLOAD, Server, write_registry

from FoBSegmentLib.cli import main


def test_models_list_exits_zero(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("FOB_MODELS_JSON", raising=False)
    assert main(["models", "list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("sam-vit-h", "sam-vit-l", "sam-vit-b", "medsam", "fob-lite"):
        assert name in out
    assert "not downloaded" in out and str(tmp_path / "weights") in out


def test_models_download_and_verify(capsys, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    with Server() as srv:
        monkeypatch.setenv("FOB_MODELS_JSON", str(write_registry(tmp_path, srv.url)))
        assert main(["models", "download", "test-model", "--cache-dir", str(cache), "--no-progress"]) == 0
    assert (cache / "weights" / "w.bin").read_bytes() == PAYLOAD
    assert main(["models", "list", "--cache-dir", str(cache)]) == 0
    assert "present" in capsys.readouterr().out
    assert main(["models", "verify", "--cache-dir", str(cache)]) == 0
    assert "test-model: OK size and SHA-256 verified" in capsys.readouterr().out
    # a corrupted byte of the same length is caught only by the hash
    data = bytearray(PAYLOAD)
    data[1000] ^= 0xFF
    (cache / "weights" / "w.bin").write_bytes(bytes(data))
    assert main(["models", "verify", "test-model", "--cache-dir", str(cache)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_models_errors_are_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("FOB_MODELS_JSON", raising=False)
    assert main(["models", "download", "no-such-model", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fob: error: unknown model 'no-such-model'") and "\n" not in err
    assert main(["models", "download", "fob-authors", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no download URL" in err and "\n" not in err
    with pytest.raises(SystemExit):
        main(["models", "download"])  # NAME is required: argparse usage error


def test_shipped_default_model_matches_its_registry_entry() -> None:
    """The registry records the shipped model's size and SHA-256, so a retrained file must update it."""
    from FoBSegmentLib.cli import main

    assert main(["models", "verify", "fob-lite"]) == 0
