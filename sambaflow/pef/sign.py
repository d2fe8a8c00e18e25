"""Signed PEFs: an HMAC-SHA256 over the manifest, in the member `signature.json`.

The manifest records every other member's SHA-256 and size, and loading checks each member against
it, so the MAC over the manifest's bytes covers every member. With a key configured
(`--sign-key FILE` or `$SAMBAFLOW_SIGN_KEY`) the loader checks the MAC before it parses anything
else, and refuses unsigned PEFs.

Your own key (the notebook-trust model of Jupyter): with no key configured, `compile` signs every
PEF with a per-user key, `$XDG_CONFIG_HOME/sambaflow/pef.key` (default `~/.config/sambaflow/`),
made on first use with mode 0600; loading checks a PEF that says it was signed by that key, and
it loads without the native-code warning. An unsigned PEF, or one signed by another key, warns
as before (no key configured) or is refused (a key configured). The key never leaves the machine:
for PEFs shared between machines or users, configure a shared key with --sign-key.

Key file: at least 32 random bytes, either as 64 or more hex digits (surrounding whitespace is
ignored) or raw; mode 0600 or stricter (never readable by group or others). Make one with
`(umask 077; python -c "import secrets; print(secrets.token_hex(32))" > pef.key)`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import string
from dataclasses import dataclass
from typing import Any

from sambaflow.errors import SambaArgumentError, SambaPefError

SIGNATURE = "signature.json"
KEY_ENV = "SAMBAFLOW_SIGN_KEY"
ALGORITHM = "hmac-sha256"
MIN_KEY_BYTES = 32
MAX_KEY_FILE = 4096
MAX_SIGNATURE_BYTES = 4096
_DOMAIN = b"sambaflow-pef-signature-v1\0"

TRUST_NOTE = (
    "Loading a PEF that holds native code (compiled backend binaries) runs that code in your "
    "process: load only PEFs from sources you trust. PEFs you compile are signed with your own key "
    "and load silently; to share PEFs, sign them with a shared key (compile --sign-key FILE) and "
    "load them with it (run --sign-key FILE, or SAMBAFLOW_SIGN_KEY=FILE)."
)


@dataclass(frozen=True)
class SigningKey:
    secret: bytes
    source: str

    @property
    def key_id(self) -> str:
        """A public name of the key (not the key): lets an error say which key signed a PEF."""
        return hmac.new(self.secret, b"sambaflow key id", hashlib.sha256).hexdigest()[:16]


def key_path(explicit: str | None = None) -> str | None:
    """The key file to use: `explicit` (from --sign-key), else $SAMBAFLOW_SIGN_KEY, else None."""
    return explicit or os.environ.get(KEY_ENV, "").strip() or None


USER_KEY_FILE = "pef.key"


def user_key_path() -> str:
    """Where this user's own key lives: `$XDG_CONFIG_HOME/sambaflow/pef.key`, else
    `~/.config/sambaflow/pef.key` (a user with no home: in the temporary folder, by uid)."""
    config = os.environ.get("XDG_CONFIG_HOME", "").strip()
    if not os.path.isabs(config):  # the XDG spec: a relative value is to be ignored
        home = os.path.expanduser("~")
        config = os.path.join(home, ".config") if os.path.isabs(home) else ""
    if not config:
        import tempfile

        config = os.path.join(tempfile.gettempdir(), f"sambaflow-config-{os.getuid()}")
    return os.path.join(config, "sambaflow", USER_KEY_FILE)


def user_key(create: bool = False) -> SigningKey | None:
    """This user's own key; None when it does not exist yet (and not `create`), or cannot be made
    (a read-only home: compile then writes unsigned PEFs, as before)."""
    path = user_key_path()
    if not os.path.exists(path):
        if not create:
            return None
        try:
            _create_key(path)
        except OSError:
            return None
    return load_key(path)


def _create_key(path: str) -> None:
    """32 random bytes as hex, mode 0600, in a 0700 folder; two processes making it at once both
    end up with the one that was linked first."""
    import secrets
    import tempfile

    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".pef.key.", dir=folder)  # mode 0600
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)  # never replaces a key another process made meanwhile
        except FileExistsError:
            pass
    finally:
        os.unlink(temporary)


def signed_by(signature: bytes | None, key: SigningKey) -> bool:
    """The signature says `key` made it (a claim only: `verify` checks it)."""
    fields = read_signature(signature)
    return fields is not None and fields["key_id"] == key.key_id


def load_key(path: str | None) -> SigningKey | None:
    """The signing key in file `path` (None: no key), after checking its mode and length."""
    if path is None:
        return None
    try:
        info = os.stat(path)
    except OSError as exc:
        raise SambaArgumentError(
            f"signing key file '{path}' cannot be read ({exc.strerror}): fix --sign-key / {KEY_ENV}"
        ) from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_KEY_FILE:
        raise SambaArgumentError(
            f"signing key '{path}' is not a regular file of at most {MAX_KEY_FILE} bytes"
        )
    if info.st_mode & 0o077:
        raise SambaArgumentError(
            f"signing key '{path}' is accessible by group or others (mode {stat.S_IMODE(info.st_mode):04o}): "
            f"run `chmod 600 {path}` (and make a new key if others may have read it)"
        )
    with open(path, "rb") as handle:
        return SigningKey(_key_bytes(handle.read(), path), path)


def _key_bytes(data: bytes, path: str) -> bytes:
    text = data.strip()
    if len(text) >= 2 * MIN_KEY_BYTES and len(text) % 2 == 0 and _is_hex(text):
        return bytes.fromhex(text.decode())
    if len(data) < MIN_KEY_BYTES or _is_hex(text):
        raise SambaArgumentError(
            f"signing key '{path}' is too short (or an odd number of hex digits): write at least "
            f"{MIN_KEY_BYTES} random bytes, e.g. "
            f'`(umask 077; python -c "import secrets; print(secrets.token_hex(32))" > {path})`'
        )
    return data


def _is_hex(text: bytes) -> bool:
    return bool(text) and all(chr(c) in string.hexdigits for c in text)


def sign(manifest: bytes, key: SigningKey) -> bytes:
    """The `signature.json` member for a PEF whose manifest is `manifest` (its exact bytes)."""
    mac = hmac.new(key.secret, _DOMAIN + manifest, hashlib.sha256).hexdigest()
    return json.dumps({"algorithm": ALGORITHM, "key_id": key.key_id, "mac": mac}, indent=1).encode()


def read_signature(data: bytes | None) -> dict[str, Any] | None:
    """The signature's fields, or None when absent or unreadable (for display; not a check)."""
    try:
        value = json.loads(data) if data is not None else None
    except (UnicodeDecodeError, ValueError):
        return None
    fields = ("algorithm", "key_id", "mac")
    ok = isinstance(value, dict) and all(isinstance(value.get(f), str) for f in fields)
    return {f: value[f] for f in fields} if ok else None


def verify(manifest: bytes, signature: bytes | None, key: SigningKey, path: str) -> None:
    """Raise SambaPefError unless `signature` is `key`'s MAC of `manifest`."""
    if signature is None:
        raise SambaPefError(
            f"'{path}' is not signed, and a signing key is configured ({key.source}): only signed "
            f"PEFs are loaded. Recompile it with --sign-key (or {KEY_ENV}), or, for a PEF you trust, "
            f"run without a key"
        )
    fields = read_signature(signature)
    if fields is None or fields["algorithm"] != ALGORITHM:
        raise SambaPefError(
            f"'{path}': its {SIGNATURE} is malformed or not {ALGORITHM}: do not run it; recompile"
        )
    if fields["key_id"] != key.key_id:
        raise SambaPefError(
            f"'{path}' was signed with another key (key id {fields['key_id']}; {key.source} has key id "
            f"{key.key_id}): load it with the key it was signed with, or recompile it"
        )
    expected = hmac.new(key.secret, _DOMAIN + manifest, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, fields["mac"]):
        raise SambaPefError(
            f"'{path}': the signature does not match its contents: the PEF was changed after it was "
            "signed. Do not run it; recompile it from source"
        )
