"""Where the one-shot commands take the AWS region from, and where the daemon does not.

``upload``, ``check-dataset`` and ``verify --manifest`` use ``--region``, then their
config file's ``[s3] region``, then ``AWS_REGION``, ``AWS_DEFAULT_REGION``, the
profile's ``region``, then us-east-1 (``s3.region.region_from_environment`` for the
last four); a configuration without a region gives the daemon us-east-1 whatever the
environment. What goes on the wire is in ``test_upload_command.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cpg_daemon.core.config import GALLERY_BUCKET, load_config
from cpg_daemon.s3.region import region_for, region_from_environment

AWS_CONFIG = """\
[default]
region = ap-south-1

[profile lab]
region = eu-west-2

[profile no-region]
output = json
"""


@pytest.mark.parametrize(
    ("environment", "profile", "expected"),
    [
        ({}, "", "ap-south-1"),  # the default profile's
        ({}, "lab", "eu-west-2"),  # the profile's
        ({"AWS_PROFILE": "lab"}, "", "eu-west-2"),  # the profile AWS_PROFILE names
        ({}, "no-region", "us-east-1"),  # a profile without one: the gallery's region
        ({}, "missing", "us-east-1"),  # no such profile: the credentials will say so
        ({"AWS_DEFAULT_REGION": "ca-central-1"}, "lab", "ca-central-1"),
        ({"AWS_REGION": "us-west-1", "AWS_DEFAULT_REGION": "ca-central-1"}, "lab", "us-west-1"),
        ({"AWS_REGION": "", "AWS_DEFAULT_REGION": "ca-central-1"}, "", "ca-central-1"),
    ],
)
def test_the_region_comes_from_where_the_aws_cli_looks(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    environment: dict[str, str],
    profile: str,
    expected: str,
) -> None:
    config = tmp_path / "aws-config"
    config.write_text(AWS_CONFIG, encoding="utf-8")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.delenv("AWS_DEFAULT_REGION")  # set by the suite's isolated environment
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert region_from_environment(profile) == expected


def test_without_any_of_them_it_is_us_east_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    assert region_from_environment() == "us-east-1"


def test_the_gallerys_bucket_is_reached_in_us_east_1_whatever_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A contributor in Europe with AWS_REGION=eu-west-1 for their own work: staging and
    its Access Grants are in us-east-1; their own bucket is where the environment says."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert region_for(GALLERY_BUCKET) == "us-east-1"
    assert region_for("lab-own-bucket") == "eu-west-1"


def test_the_daemons_configuration_keeps_us_east_1_whatever_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's grants are in us-east-1: a login's AWS_REGION must not move them."""
    monkeypatch.setenv("AWS_REGION", "eu-west-2")
    path = tmp_path / "config.toml"
    path.write_text('[credentials]\nsource = "environment"\n', encoding="utf-8")
    assert load_config(path).s3.region == "us-east-1"
    # The one-shot commands ask for "" (not named) and look further themselves.
    assert load_config(path, default_region="").s3.region == ""
    path.write_text('[s3]\nregion = "eu-central-1"\n', encoding="utf-8")
    assert load_config(path, default_region="").s3.region == "eu-central-1"
    assert load_config(path).s3.region == "eu-central-1"
