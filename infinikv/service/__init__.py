"""The service layer: settings (the one place that reads the environment), the CLI's
wiring of model + engine, and later the HTTP server."""

from infinikv.service.settings import Settings, get_settings

__all__ = ["Settings", "get_settings"]
