"""Transport: the ASGI front, the Flask app and its routes, the request view, replies."""
