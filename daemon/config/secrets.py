"""What counts as a secret in the config, and how it is masked.

Secrets never reach a log line, an error line, ``config show``, ``/status`` or a
support bundle: the API token, any key whose name says secret, and the password of
a URL (``https://user:password@host``, as S3-compatible endpoints are sometimes
given: ``daemon/urls.py``).
"""

from __future__ import annotations

import re

SECRET_KEYS = frozenset({"api.token"})
# Words that make a key a secret, alone or inside a name (MINIO_SECRET_KEY, private_key, api-token),
# in the config (a mistyped key included) and in the text a support bundle gathers.
SECRET_KEY_WORDS = (
    # "token" but not "tokenizer" (lm.tokenizer names a file, and was masked in its error lines).
    r"token(?!i[sz])|secret|password|passwd|passphrase|credentials?|cookie|session|private[_-]?key|"
    r"api[_-]?key|access[_-]?key|auth(?:orization)?"
)
_SECRET_WORDS = re.compile(SECRET_KEY_WORDS, re.IGNORECASE)


def is_secret_key(path: str) -> bool:
    """A dotted key that holds, or looks as though it holds, a secret."""
    return path in SECRET_KEYS or bool(_SECRET_WORDS.search(path.rsplit(".", 1)[-1]))
