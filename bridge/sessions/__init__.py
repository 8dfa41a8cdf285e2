"""The mirrored session: the mirror, refresh-ahead, the session model, app data."""
