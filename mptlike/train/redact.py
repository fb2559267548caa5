"""Keep credentials out of everything a run writes: run_dir/config.yaml, the W&B run config, logs.

A key whose last name part is a credential word (`api_key`, `wandb_token`, `password`, ...) has its
value replaced, and so does any string that contains the value of a credential environment
variable (WANDB_API_KEY, HF_TOKEN, ...). `max_new_tokens` and similar counts are not credentials:
only the whole last part of a key name counts (`token`, not `tokens`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"
# Also the names fsspec back ends take in data.storage_options: s3fs `key`/`secret`/`token`, botocore's
# `aws_secret_access_key`/`aws_access_key_id`/`aws_session_token`, adlfs `account_key`.
SECRET_KEY = re.compile(r"(^|[_.-])(api_?key|token|secret|password|passwd|secret_access_key|access_key_id|"
                        r"account_key)$|^key$", re.IGNORECASE)
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_MIN_SECRET_LEN = 8  # shorter environment values would redact ordinary words


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    return [env[name] for name in SECRET_ENV if len(env.get(name, "")) >= _MIN_SECRET_LEN]


def redact(value: Any, secrets: list[str] | None = None, *, key: str = "") -> Any:
    """A copy of a config tree (dicts, lists, scalars) with credentials replaced by REDACTED."""
    secrets = secret_values() if secrets is None else secrets
    if key and SECRET_KEY.search(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, secrets, key=str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, secrets) for v in value)
    if isinstance(value, str) and any(s in value for s in secrets):
        return REDACTED
    return value
