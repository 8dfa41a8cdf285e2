"""The admin side: the admin HTTP API, its command-line client, analytics."""
