"""kratos-session-bridge: forward-auth and app-owned session mirror for Ory Kratos."""

__version__ = "0.1.0"
