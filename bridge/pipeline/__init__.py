"""The forward-auth pipeline, one stage a file; ``forward_auth`` orchestrates them."""
