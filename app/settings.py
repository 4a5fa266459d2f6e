"""AppSettings: what the app remembers between runs, as versioned JSON in the platform config directory.

Qt-free and frozen (STYLE.md S21). Window geometry and dock state are stored as base64 of Qt's
saveGeometry()/saveState(). A file that cannot be read is set aside, never lost silently: it is
renamed with a ".bad" suffix and the defaults are used.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

logger = logging.getLogger(__name__)

VERSION = 1
FILE_NAME = "studio.json"


@dataclass(frozen=True)
class ChatPreferences:
    strategy: str = "flowspec"
    temperature: float = 0.0
    max_new_tokens: int = 128
    seed: int = 0
    topk: int = 10
    depth: int = 5
    budget: int = 80
    segment_max: int = 16
    expand: bool = True
    highlight_drafts: bool = True


@dataclass(frozen=True)
class AppSettings:
    version: int = VERSION
    geometry: str = ""  # base64 of QMainWindow.saveGeometry()
    window_state: str = ""  # base64 of QMainWindow.saveState()
    model: str = ""
    last_layout: str = ""  # layout file text (engine/layout.py format) of the last applied layout
    last_layout_path: str = ""
    chat: ChatPreferences = field(default_factory=ChatPreferences)


def config_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir("flowspec-studio"))


def settings_path() -> Path:
    return config_dir() / FILE_NAME


def migrate(data: dict) -> dict:
    """Bring an older settings dict up to VERSION (version 1 is the first)."""
    data = dict(data)
    data["version"] = VERSION
    return data


def _known(cls, data: dict) -> dict:
    """The entries of ``data`` that are fields of ``cls`` with a value of the field's type."""
    defaults = cls()
    kept = {}
    for f in fields(cls):
        if f.name not in data or f.name == "chat":
            continue
        value, default = data[f.name], getattr(defaults, f.name)
        if type(value) is type(default) or (type(default) is float and type(value) is int):
            kept[f.name] = type(default)(value)
        else:
            logger.warning("setting %s = %r ignored: expected a %s", f.name, value, type(default).__name__)
    return kept


def load_settings(path: Path | None = None) -> AppSettings:
    path = path or settings_path()
    if not path.exists():
        return AppSettings()
    try:
        data = migrate(json.loads(path.read_text(encoding="utf-8")))
        chat = ChatPreferences(**_known(ChatPreferences, data.get("chat") or {}))
        return AppSettings(**{**_known(AppSettings, data), "chat": chat})
    except (OSError, ValueError, TypeError) as error:
        bad = path.with_suffix(path.suffix + ".bad")
        logger.warning("settings file %s is unreadable (%s); moved to %s, using defaults", path, error, bad)
        try:
            os.replace(path, bad)
        except OSError:
            pass
        return AppSettings()


def save_settings(settings: AppSettings, path: Path | None = None) -> None:
    """Write atomically; OSError propagates to the caller (the window logs it)."""
    path = path or settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".studio.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(asdict(settings), file, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
