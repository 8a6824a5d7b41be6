"""Version policies (Triton's latest / all / specific) and what a store scan sees as published."""

from __future__ import annotations

import pytest

from service.version_policy import parse_version_policy
from service.reloader import scan_store

VERSIONS = [1, 2, 3, 5]


@pytest.mark.parametrize("policy,model,chosen", [
    ("latest", "m", [5]), ("latest:2", "m", [3, 5]), ("latest:9", "m", VERSIONS), ("all", "m", VERSIONS),
    ("specific:1,3", "m", [1, 3]), ("specific:1,3", "other", [1, 3]), ("specific: 4", "m", []),
    ("specific:m=2,5;n=1", "m", [2, 5]), ("specific:m=2,5;n=1", "n", [1]),
    ("specific:m=2,5;n=1", "other", [5]),  # named nowhere: its latest
    ("specific:m=2;1,3", "other", [1, 3]),  # a part without NAME= is everyone else's
])
def test_policies_choose(policy, model, chosen):
    assert parse_version_policy(policy)(model, VERSIONS) == chosen
    assert parse_version_policy(policy)(model, []) == []


@pytest.mark.parametrize("policy", ["latest:0", "latest:-1", "newest", "specific:", "specific:a,b", "specific:=1",
                                    "specific:m=1,,2", "specific:m=x"])
def test_bad_policies_are_refused_by_name(policy):
    with pytest.raises(ValueError, match="policy"):
        parse_version_policy(policy)


def test_scan_skips_staging_and_half_published_folders(tmp_path):
    for path in ("m/1", "m/2", "m/notaversion", ".staging/m-3", ".checkpoints/x"):
        (tmp_path / path).mkdir(parents=True)
        (tmp_path / path / "manifest.json").write_text("{}")
    (tmp_path / "m" / "4").mkdir()  # being copied in: no manifest yet
    (tmp_path / "m" / "4" / "model.onnx").write_bytes(b"x")
    scan = scan_store(tmp_path)
    assert {name: sorted(versions) for name, versions in scan.items()} == {"m": [1, 2]}
    before = scan["m"][2]
    (tmp_path / "m" / "2" / "model.onnx").write_bytes(b"new file")
    assert scan_store(tmp_path)["m"][2] != before  # a changed folder has a new fingerprint
