"""An identity provider for tests: a JWKS endpoint that answers only once the test releases it.

    with HeldJwks() as idp:
        config["identity"] = {"issuers": [{"type": "lictor"}, idp.issuer]}
        token = idp.token("agent-1", role="readonly")   # verifying it fetches the keys: held
        assert idp.asked.wait(15)                        # the gateway asked for them
        ...                                              # what must not wait meanwhile
        idp.release.set()

A gateway that verified such a token on its event loop would stand still until the release; tests use
that to prove the order of events (answered before the release), not a time.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["HeldJwks"]

ISSUER = "https://idp"


class HeldJwks:
    def __init__(self, issuer: str = ISSUER) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa
        from jwt.algorithms import RSAAlgorithm

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = {**json.loads(RSAAlgorithm.to_jwk(self.key.public_key())), "kid": "k1", "alg": "RS256", "use": "sig"}
        body = json.dumps({"keys": [jwk]}).encode()
        self.asked, self.release = threading.Event(), threading.Event()
        held = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                held.asked.set()
                held.release.wait(30)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{self.server.server_port}/jwks"
        self.iss = issuer
        self.issuer = {"type": "jwks", "issuer": issuer, "jwks_url": url, "algorithms": ["RS256"]}

    def token(self, sub: str, **claims: Any) -> str:
        import jwt

        payload = {"sub": sub, "iss": self.iss, "aud": "lictor", "exp": time.time() + 600, **claims}
        return jwt.encode(payload, self.key, "RS256", headers={"kid": "k1"})

    def others_go_on(self, login: Callable[[], None], step: Callable[[], bool]) -> bool:
        """Run ``login`` (a login with one of this provider's tokens) in a thread; once the gateway has asked
        for the keys, ``step`` (a command on another connection) must succeed five times. Whether all five
        ran while the keys were held (a gateway that waited for them would answer only after the release,
        which comes after 20 s at most); the login has ended when this returns."""
        waiting = threading.Thread(target=login)
        waiting.start()
        assert self.asked.wait(15), "the login did not ask the identity provider for its keys"
        backstop = threading.Timer(20, self.release.set)
        backstop.start()
        for _ in range(5):
            assert step()
        answered_while_held = not self.release.is_set()
        self.release.set()
        backstop.cancel()
        waiting.join(15)
        return answered_while_held

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()

    def __enter__(self) -> HeldJwks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
