"""Keys, secrets and tokens stay out of everything that is stored or shown.

A job spec travels inside the Ray job's entrypoint, which anyone who can list the cluster's jobs reads
in clear, so a spec that holds a credential is refused before it is submitted. Credentials reach the
object store another way: the nodes' environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
GOOGLE_APPLICATION_CREDENTIALS), instance roles or workload identity, a credentials file, or a profile
name. A local run may still be given credentials on the command line; they are never written to
run.json, Parquet metadata or a log.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

#: Option names whose values are credentials (fsspec's s3fs, gcsfs, adlfs and botocore spellings).
SECRET_NAME = re.compile(
    r"(^|_)(key|secret|token|password|passwd|credential|credentials|sas|signature|private|auth)(_|$)"
    r"|^(aws_access_key_id|aws_secret_access_key|aws_session_token|account_key|connection_string|"
    r"client_secret|sas_token|secret_access_key|access_key|session_token)$", re.IGNORECASE)
#: Values of a secret-named option that only name where credentials are (gcsfs' token modes).
REFERENCES = {"anon", "google_default", "cache", "cloud", "browser"}

HOW = ("give credentials through the nodes' environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
       "GOOGLE_APPLICATION_CREDENTIALS), instance roles or workload identity, a credentials file, or a profile "
       "name (storage_options: {profile: NAME})")


def _is_reference(value: Any) -> bool:
    """A value that names credentials without holding them: a token mode, or a path to a credentials file."""
    return isinstance(value, bool) or value is None or (
        isinstance(value, str) and (value in REFERENCES or value.endswith(".json") and "{" not in value))


def find_secrets(obj: Any, where: str = "storage_options") -> list[str]:
    """Dotted names of every credential held in a mapping (nested mappings and lists included)."""
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            name = f"{where}.{k}"
            if isinstance(v, (dict, list)):
                found += find_secrets(v, name)
            elif SECRET_NAME.search(str(k)) and not _is_reference(v):
                found.append(name)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += find_secrets(v, f"{where}[{i}]")
    return found


def url_password(url: str) -> bool:
    """Whether a URL carries a password in its user part (https://user:pass@host/...)."""
    try:
        return urlsplit(url).password is not None
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """The URL with its password replaced by '***', to name it in an error."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def spec_secrets(spec: dict[str, Any]) -> list[str]:
    """Every place a job spec holds a credential: storage options, and URLs with a password in them."""
    found = find_secrets(spec.get("storage_options") or {})
    found += [k for k in ("source", "output", "out", "manifest", "platemap")
              if isinstance(spec.get(k), str) and url_password(spec[k])]
    return found
