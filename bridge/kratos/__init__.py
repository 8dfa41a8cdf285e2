"""Every conversation with Kratos: the HTTP client, whoami, the admin API."""
