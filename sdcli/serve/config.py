"""What `sdcli serve` was started with: its models, where it listens, who may call it, and its limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

MB = 1024 * 1024


@dataclass
class ServeConfig:
    """The server's settings; `sdcli.commands.serve` fills it from the command line, tests directly."""

    models: list[Optional[str]] = field(default_factory=lambda: [None])  # None: $SDCLI_MODEL or the bundled one
    lora_dir: Optional[Path] = None
    host: str = "127.0.0.1"
    port: int = 7860
    users: dict[str, str] = field(default_factory=dict)  # --api-auth user:pass (HTTP basic)
    api_key: Optional[str] = None  # --api-key (a bearer token)
    max_queue: int = 16  # requests waiting behind the one running
    max_body: int = 50 * MB
    max_pixels: int = 2048 * 2048  # width × height of an image asked for or sent
    max_steps: int = 150
    max_batch: int = 8  # images in one request (n, batch_size × n_iter)
    device: str = "auto"
    dtype: str = "auto"
    threads: Optional[int] = None

    @property
    def auth(self) -> bool:
        return bool(self.users or self.api_key)


def parse_users(text: str) -> dict[str, str]:
    """--api-auth 'user:pass[,user2:pass2]' -> {user: pass}; a part without both halves names itself."""
    from sdcli.errors import UsageError

    users = {}
    for part in text.split(","):
        user, sep, password = part.strip().partition(":")
        if not sep or not user or not password:
            raise UsageError(f"--api-auth: {part.strip()!r} is not USER:PASSWORD "
                             "(give USER:PASSWORD[,USER2:PASSWORD2])")
        users[user] = password
    return users
