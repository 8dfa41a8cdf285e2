"""Fill a peer config template (heimdall.yaml, oathkeeper.yaml) by literal substitution.

Placeholders are ``{name}`` with a lower-case name. The templates also hold Go templates
(``{{ .Subject.ID }}``), so ``str.format`` must not be used on them.

    sys.path.insert(0, str(ROOT / "bench" / "peers")); from render import render
    text = render(Path("bench/peers/heimdall.yaml"), kratos_public_url="http://127.0.0.1:4433",
                  port=4456, admin_port=4457)

CLI: python3 bench/peers/render.py TEMPLATE OUT name=value ...
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_PLACEHOLDER = re.compile(r"(?<!\{)\{([a-z_]+)\}(?!\})")


def render(template: Path, **values: object) -> str:
    text = template.read_text()
    needed = set(_PLACEHOLDER.findall(text))
    missing = needed - values.keys()
    if missing:
        raise KeyError(f"{template.name}: no value for {sorted(missing)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


if __name__ == "__main__":
    src, dst, *pairs = sys.argv[1:]
    Path(dst).write_text(render(Path(src), **dict(p.split("=", 1) for p in pairs)))
