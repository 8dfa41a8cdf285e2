"""The bridge's configuration: every option in ``options``, the validated ``Settings`` that
``load_settings`` builds from them in ``settings``."""

from bridge.config.settings import Settings, load_settings

__all__ = ["Settings", "load_settings"]
