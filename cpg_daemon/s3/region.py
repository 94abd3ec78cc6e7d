"""The AWS region a one-shot command uses when neither its flags nor its configuration
file name one: where the AWS CLI looks.

``AWS_REGION``, then ``AWS_DEFAULT_REGION``, then the profile's ``region`` (in
``~/.aws/config``, or ``AWS_CONFIG_FILE``), then us-east-1, the gallery's region; for the
gallery's own bucket always us-east-1 (``region_for``). The
daemon does not look here: its region is its configuration's, or us-east-1, whatever
the environment of whoever started it (``core.config.load_config``).
"""

from __future__ import annotations

import os

import botocore.exceptions
import botocore.session

from cpg_daemon.core.config import DEFAULT_REGION, GALLERY_BUCKET

__all__ = ["region_for", "region_from_environment"]


def region_for(bucket: str, profile: str = "") -> str:
    """The region to reach ``bucket`` in: the gallery's staging bucket is in us-east-1
    (its Access Grants too), whatever the environment says (a contributor in Europe
    with AWS_REGION=eu-west-1 set for their own work); any other bucket's is the
    environment's (``region_from_environment``)."""
    if bucket == GALLERY_BUCKET:
        return DEFAULT_REGION
    return region_from_environment(profile)


def region_from_environment(profile: str = "") -> str:
    """The region for ``profile`` ("": ``AWS_PROFILE``'s, else the default profile's).

    Blocking: reads the AWS config file. A profile that does not exist gives
    us-east-1 here; the credentials say what is wrong with it.
    """
    region = os.environ.get("AWS_REGION", "")
    if region:
        return region
    # botocore's own resolution: AWS_DEFAULT_REGION, then the profile's region.
    session = botocore.session.Session(profile=profile or None)
    try:
        region = session.get_config_variable("region") or ""
    except botocore.exceptions.BotoCoreError:  # no such profile, an unreadable file
        region = ""
    return region or DEFAULT_REGION
