"""Redis bytes per mirrored session, for a typical identity (an email trait, a password
login, a device), from a real Kratos through the bridge's own code.

Not a test: it prints figures. Two ways of counting: ``MEMORY USAGE`` of each key a
session writes (its mirror, its credential's entries, its share of the identity index),
and the growth of ``used_memory`` over all sessions but the first (which loads the
scripts and opens the connections), divided by their number.

    python bench/redis_memory.py [--sessions 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bridge.config import load_settings  # noqa: E402
from bridge.pipeline.credentials import extract  # noqa: E402
from bridge.web.request import HeaderView  # noqa: E402
from bridge.wiring import build_bridge  # noqa: E402
from tests.support import kratos_flows as flows  # noqa: E402
from tests.support.harness import Kratos, RedisServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp())
    redis_server, kratos = RedisServer(work), Kratos(work, lifespan="24h")
    try:
        bridge = build_bridge(
            load_settings(
                {
                    "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
                    "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
                    "BRIDGE_REDIS_URL": redis_server.url,
                    "BRIDGE_SECRET": "bench-" + "s" * 40,
                }
            )
        )
        client, keys = redis_server.client, bridge.store.keys
        per_key: dict[str, int] = {}
        before = 0
        for i in range(args.sessions + 1):
            if i == 1:  # after the first session: scripts loaded, connections open
                before, per_key = client.info("memory")["used_memory"], {}
            user = flows.register(kratos)
            credential = extract(HeaderView([("x-session-token", user.token)]), "unused")
            session = bridge.mirror.resolve(credential).session
            fingerprint = bridge.mirror._fingerprints.of(credential)
            owned = {
                "p{sid}:session": keys.session(session.id),
                "p{sid}:credentials": keys.credentials(session.id),
                "pcredential:<hmac>": keys.credential(fingerprint),
                "pidentity:{id}:sessions": keys.identity_sessions(session.identity_id),
            }
            for name, key in owned.items():
                per_key[name] = per_key.get(name, 0) + (client.memory_usage(key, samples=0) or 0)
        grown = client.info("memory")["used_memory"] - before
        kratos_json = len(client.hget(keys.session(session.id), "kratos"))
        print(f"{args.sessions} sessions, one session token each; kratos JSON {kratos_json} B")
        for name, total in per_key.items():
            print(f"  {name:<26}{total / args.sessions:>8.0f} B")
        print(f"  {'sum of MEMORY USAGE':<26}{sum(per_key.values()) / args.sessions:>8.0f} B")
        print(f"  {'used_memory growth':<26}{grown / args.sessions:>8.0f} B per session")
        bridge.mirror.close()
    finally:
        kratos.stop()
        redis_server.stop()


if __name__ == "__main__":
    main()
