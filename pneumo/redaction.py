"""Credentials out of everything shown or stored: URL user-info, password query parameters, secret env values."""

from __future__ import annotations

import os
import re

# Environment variables whose values are secrets wherever they turn up (error text, URIs, logs).
SECRET_ENV: tuple[str, ...] = (
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_CLIENT_CERT_PATH",
)
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|passwd|pwd|token|secret|access_token|sig|signature|"
                           r"x-amz-signature|x-amz-security-token)=)[^&\s#]*")


def redact(text: str) -> str:
    """``text`` with every URL's user-info, password-like query values and secret env values replaced by ``***``."""
    text = _SECRET_QUERY.sub(r"\1***", _USERINFO.sub("***@", str(text)))
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def has_credentials(uri: str) -> bool:
    """Whether a URI carries user-info or a password-like query parameter."""
    return redact(uri) != uri
