"""Who may use the web port: the operator's login (a session cookie from the login form, or HTTP basic auth for
scripts), bearer tokens for DICOMweb API clients, the CSRF token and origin check on every POST made with a
session, and CORS for DICOMweb pages of configured other origins. See `gateway.web` for the rules in words.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import html
import logging
import os
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.config import WebSettings
from gateway.dicomweb import PREFIX as DICOMWEB

log = logging.getLogger(__name__)

SESSION_COOKIE = "dmg_session"
SESSION_SECONDS = 12 * 3600.0


class WebAuth:
    """Sessions, tokens and the middleware that checks every request."""

    def __init__(self, settings: WebSettings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.sessions: dict[str, tuple[str, float]] = {}  # session id → (CSRF token, expiry)
        self.basic_csrf = secrets.token_urlsafe(32)  # the token for basic-auth users (scripts; no cookie)
        self.on_login: Callable[[str, str, bool], Awaitable[None]] | None = None  # the audit trail's ear

    def password(self) -> str:
        return os.environ.get(self.settings.password_env, "")

    def session(self, request: web.Request) -> tuple[str, float] | None:
        sid = request.cookies.get(SESSION_COOKIE, "")
        found = self.sessions.get(sid)
        if found is None or found[1] < time.time():
            self.sessions.pop(sid, None)
            return None
        return found

    def _basic_ok(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        password = self.password()
        if not header.startswith("Basic ") or not password:
            return False
        try:
            user, _, given = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return user == "operator" and hmac.compare_digest(given.encode(), password.encode())

    def _token_ok(self, request: web.Request) -> bool:
        """An API client's bearer token (one of `web.token_env`'s comma-separated tokens)."""
        header = request.headers.get("Authorization", "")
        tokens = [
            t.strip() for t in os.environ.get(self.settings.token_env, "").split(",") if len(t.strip()) >= 16
        ]
        if not header.startswith("Bearer ") or not tokens:
            return False
        given = header[7:].strip().encode()
        return any(hmac.compare_digest(given, t.encode()) for t in tokens)

    def _cors(self, request: web.Request, response: web.StreamResponse) -> None:
        """DICOMweb for the pages of the configured other origins (an OHIF elsewhere)."""
        origin = request.headers.get("Origin", "")
        if request.path.startswith(DICOMWEB) and origin in self.settings.cors_origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Vary"] = "Origin"
            response.headers["Access-Control-Expose-Headers"] = "Content-Type, Warning"

    def csrf_token(self, request: web.Request) -> str:
        """The token every form of this request's page carries."""
        found = self.session(request)
        return found[0] if found else self.basic_csrf

    def same_origin(self, request: web.Request) -> bool:
        """The browser's Origin (or Referer) names this host; a request without either (a script) passes here
        and is still held to the token."""
        origin = request.headers.get("Origin") or request.headers.get("Referer")
        if not origin:
            return True
        if origin == "null":
            return False
        return urllib.parse.urlsplit(origin).netloc == request.host

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Login on every path but /healthz and /login (a session, basic auth, or for DICOMweb a bearer token);
        CSRF token and origin on every POST made with a session cookie; CORS for DICOMweb."""
        if request.method == "OPTIONS" and request.path.startswith(DICOMWEB):
            return self._preflight(request)
        open_paths = {"/healthz", "/login"}
        basic = self._basic_ok(request)
        token = not basic and request.path.startswith(DICOMWEB) and self._token_ok(request)
        by_header = basic or token
        # who this is, for the access events (a token by a digest of it, never the token itself)
        request["user"] = (
            "operator"
            if basic or self.session(request) is not None
            else "token:"
            + hashlib.sha256(request.headers["Authorization"][7:].strip().encode()).hexdigest()[:12]
            if token
            else "anonymous"
        )
        if (
            self.settings.requires_login
            and request.path not in open_paths
            and self.session(request) is None
            and not by_header
        ):
            if request.method == "GET" and request.path == "/":
                raise web.HTTPSeeOther("/login")
            denied = web.Response(
                status=401,
                text="login required",
                headers={"WWW-Authenticate": 'Basic realm="dicom-mail-gateway"'},
            )
            self._cors(request, denied)
            return denied
        if request.method == "POST" and request.path != "/login":
            if request.path.startswith(DICOMWEB):  # STOW-RS: a script's header, or the session's token header
                given = request.headers.get("X-CSRF-Token", "")
                ok = by_header or (
                    self.same_origin(request) and hmac.compare_digest(given, self.csrf_token(request))
                )
            else:
                form = await request.post()
                ok = self.same_origin(request) and hmac.compare_digest(
                    str(form.get("csrf", "")), self.csrf_token(request)
                )
            if not ok:
                log.warning(
                    "web: refused a %s to %s without a valid CSRF token or origin",
                    request.method,
                    request.path,
                )
                return web.Response(status=403, text="cross-site request refused")
        response: web.StreamResponse = await handler(request)
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        self._cors(request, response)
        return response

    def _preflight(self, request: web.Request) -> web.Response:
        response = web.Response(status=204)
        if request.headers.get("Origin", "") in self.settings.cors_origins:
            self._cors(request, response)
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = (
                "Authorization, Accept, Content-Type, X-CSRF-Token"
            )
            response.headers["Access-Control-Max-Age"] = "600"
        return response

    async def login_page(self, request: web.Request, problem: str = "") -> web.Response:
        return web.Response(
            status=401 if problem else 200,
            content_type="text/html",
            text=(
                "<!doctype html><html><head><meta charset='utf-8'><title>Login — DICOM mail gateway</title></head>"
                f"<body><h1>{html.escape(self.name)}</h1><p class='bad'>{html.escape(problem)}</p>"
                "<form method='post' action='/login'><label>user <input name='user' value='operator'></label> "
                "<label>password <input name='password' type='password' autofocus></label> "
                "<button>log in</button></form></body></html>"
            ),
        )

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        password = self.password()
        ok = (
            bool(password)
            and str(form.get("user", "")) == "operator"
            and hmac.compare_digest(str(form.get("password", "")).encode(), password.encode())
        )
        if self.on_login is not None:  # audited before the answer (IHE ATNA: User Authentication, Login)
            await self.on_login(
                str(form.get("user", ""))[:64] or "-", request.remote or "", ok and self.same_origin(request)
            )
        if not ok or not self.same_origin(request):
            log.warning("web: failed login from %s", request.remote)
            await asyncio.sleep(1)  # a password guesser gets one try a second per connection
            return await self.login_page(request, "wrong user or password")
        sid = secrets.token_urlsafe(32)
        now = time.time()
        self.sessions = {k: v for k, v in self.sessions.items() if v[1] > now}
        self.sessions[sid] = (secrets.token_urlsafe(32), now + SESSION_SECONDS)
        log.info("web: operator logged in from %s", request.remote)
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            SESSION_COOKIE,
            sid,
            max_age=int(SESSION_SECONDS),
            httponly=True,
            samesite="Strict",
            secure=self.settings.tls_cert is not None,
            path="/",
        )
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        self.sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response
