"""OpenPGP through GnuPG (python-gnupg), with a keyring the gateway owns.

The keyring lives under `d_root/state/gnupg` and is rebuilt at every start from the configuration: the gateway's
own secret key and the public keys of the address book, nothing else. Each start builds it in a directory of its
own (`run-<ns>`) and retires the ones earlier runs left: their gpg-agent and any gpg still running there are
stopped first, then the directory is removed. A gateway that was killed leaves its agent running, and an agent
removes its sockets when it sees its home go; a fresh directory keeps that from ever touching the new keyring.
The user's default keyring is never touched (GNUPGHOME is always set). Signatures are accepted only when made by the fingerprint the address book
holds for the sending partner; GnuPG's web of trust plays no part (`--trust-model always` for encryption to keys
we imported ourselves).

GnuPG's agent needs a short socket path: when the home is long, the agent's sockets go to a short directory under
/tmp, tied to the home by a hash (`--homedir` still points at the real home).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gnupg

log = logging.getLogger(__name__)


class PgpError(ValueError):
    """An OpenPGP operation failed; the message is safe to show an operator."""


@dataclass(frozen=True)
class KeyInfo:
    """What the address-book check needs to know about a public key file."""

    fingerprint: str
    uids: tuple[str, ...]
    expires: float | None
    capabilities: str  # GnuPG's usable capabilities of the whole key: E encrypt, S sign
    validity: str  # GnuPG's validity letter: e expired, r revoked


def _link_of(home: Path) -> Path:
    return Path(tempfile.gettempdir()) / f"dmg-gpg-{hashlib.sha256(str(home).encode()).hexdigest()[:12]}"


def _short_home(home: Path) -> Path:
    """A path short enough for the agent's Unix sockets (108 bytes), linking to `home`."""
    if len(str(home)) < 60:
        return home
    link = _link_of(home)
    if link.is_symlink() and link.resolve() != home.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(home, target_is_directory=True)
    return link


def scan_key_file(path: Path) -> list[KeyInfo]:
    """The keys in an armored or binary public key file, without importing them anywhere."""
    with tempfile.TemporaryDirectory(prefix="dmg-scan-") as home:
        gpg = gnupg.GPG(gnupghome=home)
        keys = gpg.scan_keys(str(path))
    return [
        KeyInfo(
            fingerprint=str(k["fingerprint"]).upper(),
            uids=tuple(k.get("uids") or ()),
            expires=float(k["expires"]) if k.get("expires") else None,
            capabilities=str(k.get("cap") or ""),
            validity=str(k.get("trust") or ""),
        )
        for k in keys
    ]


def _kill_agent(home: Path) -> None:
    """Stop the gpg-agent GnuPG started for this home (quietly: there may be none)."""
    gpgconf = shutil.which("gpgconf")
    if gpgconf is None:
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            [gpgconf, "--homedir", str(_short_home(home)), "--kill", "gpg-agent"],
            capture_output=True,
            timeout=10,
            check=False,
        )


def _processes_using(home: Path) -> list[int]:
    """The GnuPG processes (gpg, gpg-agent) whose `--homedir` is `home` or its short link (Linux /proc)."""
    names = {str(home).encode(), str(_link_of(home)).encode()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # ended meanwhile, or not ours to read
        if any(a == b"--homedir" and v in names for a, v in itertools.pairwise(argv)):
            found.append(int(entry.name))
    return found


def _remove_tree(path: Path) -> None:
    """Remove `path`; entries that vanish meanwhile are fine, anything else is logged and left for the next start."""

    def onerror(func: object, name: str, exc: tuple[type[BaseException], BaseException, object]) -> None:
        if not isinstance(exc[1], FileNotFoundError):
            raise exc[1]

    try:
        shutil.rmtree(path, onerror=onerror)
    except OSError as exc:
        log.warning("could not remove the old keyring %s: %s", path.name, exc.strerror or exc)


def _retire(home: Path) -> None:
    """Stop everything a previous run left in keyring `home`, then remove it (and its short socket link)."""
    _kill_agent(home)  # the polite way: the agent removes its own sockets
    deadline = time.monotonic() + 5.0
    while (pids := _processes_using(home)) and time.monotonic() < deadline:
        for pid in pids:  # an agent that did not answer, or a gpg whose gateway was killed mid-operation
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    if pids:
        log.warning("%d GnuPG processes of an old keyring did not end", len(pids))
    link = _link_of(home)
    if link.is_symlink() and Path(os.readlink(link)) == home:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
    _remove_tree(home)


class OpenPgp:
    """The gateway's keyring: sign+encrypt to a partner, decrypt+verify from one."""

    def __init__(self, home: Path, passphrase: str | None = None, max_output: int = 1 << 30) -> None:
        self.home = home
        self.passphrase = passphrase or None
        # most bytes gpg may produce from one message: a compression bomb stops there (--max-output), before
        # the plaintext reaches us, and before its signature could even be checked
        self.max_output = max_output
        self.own_fingerprint = ""
        self._lock = threading.Lock()  # python-gnupg is thread-safe per call; imports must not interleave
        self._gpg = self._open()

    def _open(self) -> gnupg.GPG:
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.home, 0o700)
        short = _short_home(self.home)
        gpg = gnupg.GPG(
            gnupghome=str(short),
            options=["--pinentry-mode", "loopback", "--no-auto-key-retrieve"],
        )
        gpg.encoding = "utf-8"
        return gpg

    @classmethod
    def rebuild(
        cls,
        root: Path,
        own_secret_key: Path,
        partner_keys: list[Path],
        passphrase: str | None = None,
        max_output: int = 1 << 30,
    ) -> OpenPgp:
        """A new, empty keyring under `root` holding exactly our key and the address book's keys.

        The keyrings earlier runs left under `root` are retired first.
        """
        if root.is_dir():
            # the layout before per-run keyrings: root itself was the home
            if (root / "pubring.kbx").exists():
                _kill_agent(root)
            for entry in sorted(root.iterdir()):
                if entry.is_dir() and not entry.is_symlink():
                    _retire(entry)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        pgp = cls(root / f"run-{time.time_ns()}", passphrase, max_output)
        result = pgp._gpg.import_keys(own_secret_key.read_bytes())
        secret = [
            f
            for f in (result.fingerprints or [])
            if any(k["fingerprint"] == f for k in pgp._gpg.list_keys(True))
        ]
        if not secret:
            raise PgpError(f"{own_secret_key}: no OpenPGP secret key in the file")
        pgp.own_fingerprint = secret[0].upper()
        for path in partner_keys:
            imported = pgp._gpg.import_keys(path.read_bytes())
            if not imported.fingerprints:
                raise PgpError(f"{path}: no OpenPGP public key in the file")
        return pgp

    def close(self) -> None:
        """Stop the keyring's gpg-agent and remove the keyring (at shutdown; the next start builds its own)."""
        _retire(self.home)

    def _args(self) -> list[str]:
        return ["--trust-model", "always"]

    def sign_encrypt(self, data: bytes, recipient_fingerprint: str) -> bytes:
        """Signed-and-encrypted (RFC 3156 §6.2 combined), ASCII-armored, with MDC (AES-256)."""
        result = self._gpg.encrypt(
            data,
            [recipient_fingerprint],
            sign=self.own_fingerprint,
            passphrase=self.passphrase,
            always_trust=True,
            armor=True,
            extra_args=[*self._args(), "--cipher-algo", "AES256", "--digest-algo", "SHA256"],
        )
        if not result.ok:
            raise PgpError(f"encryption failed: {result.status or 'gpg error'}")
        return bytes(result.data)

    def sign_detached(self, data: bytes) -> bytes:
        """An armored detached signature (RFC 3156 §5), for receipts that need no encryption."""
        result = self._gpg.sign(
            data,
            keyid=self.own_fingerprint,
            passphrase=self.passphrase,
            detach=True,
            binary=False,
            extra_args=[*self._args(), "--digest-algo", "SHA256"],
        )
        if not result.data:
            raise PgpError(f"signing failed: {result.status or 'gpg error'}")
        return bytes(result.data)

    def decrypt_verify(self, data: bytes) -> tuple[bytes, str]:
        """Decrypt; return the plaintext and the primary fingerprint of the key that signed it ("" if unsigned).

        Raises `PgpError` for anything that is not encrypted to us, lacks integrity protection (MDC), or carries
        a signature that does not verify or was made by a key that is not in our keyring.
        """
        # gpg writes the plaintext to a file of ours (never more than max_output bytes), so it is held in memory
        # once, after the checks, instead of being collected from a pipe and joined (twice its size)
        with tempfile.NamedTemporaryFile(prefix="dmg-plain-", dir=self.home) as out:
            result = self._gpg.decrypt(
                data,
                passphrase=self.passphrase,
                output=out.name,
                extra_args=[*self._args(), "--yes", "--max-output", str(self.max_output)],
            )
            status = result.status or ""
            stderr = result.stderr or ""
            if os.path.getsize(out.name) >= self.max_output or "max-output" in stderr:
                raise PgpError(f"decrypts to more than {self.max_output} bytes (compression bomb?)")
            plain = out.read() if result.ok else b""
        if not result.ok:
            if "NO_SECKEY" in stderr or "no secret key" in status:
                raise PgpError("not encrypted to this gateway's OpenPGP key")
            if "GOODMDC" not in stderr and ("DECRYPTION_FAILED" in stderr or "mdc" in stderr.lower()):
                raise PgpError("decryption failed (damaged, or no integrity protection: missing MDC)")
            raise PgpError(f"decryption failed: {status or 'gpg error'}")
        if "GOODMDC" not in stderr:
            raise PgpError("message has no integrity protection (missing MDC)")
        signed = any(
            tag in stderr for tag in ("NEWSIG", "GOODSIG", "BADSIG", "ERRSIG", "EXPSIG", "REVKEYSIG")
        )
        if not signed:
            return plain, ""
        if not result.valid:
            if "NO_PUBKEY" in stderr:
                raise PgpError("signed by a key that is not in the address book")
            raise PgpError("the OpenPGP signature does not verify")
        return plain, str(result.pubkey_fingerprint or result.fingerprint or "").upper()

    def verify_detached(self, data: bytes, signature: bytes) -> str:
        """Check a detached signature over `data`; return the signer's primary fingerprint."""
        with tempfile.NamedTemporaryFile(prefix="dmg-sig-", suffix=".asc") as sig:
            sig.write(signature)
            sig.flush()
            result = self._gpg.verify_data(sig.name, data, extra_args=self._args())
        if not result.valid:
            raise PgpError("detached OpenPGP signature does not verify")
        return str(result.pubkey_fingerprint or result.fingerprint or "").upper()
