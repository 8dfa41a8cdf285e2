# Built with the repository root as context (see docker-compose.yml);
# bridge.Dockerfile.dockerignore keeps that context down to what is copied here.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml ./
COPY bridge/ ./bridge/
# A system user with a home directory, so nothing the server writes under $HOME fails.
# /var/lib/bridge/jwt is created here so that a fresh named volume mounted on it belongs
# to that user (the JWT signing keys; see docker-compose.yml).
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --create-home --shell /usr/sbin/nologin bridge \
    && install -d -m 0700 -o bridge /var/lib/bridge/jwt

USER bridge
WORKDIR /
EXPOSE 4480 4481
ENTRYPOINT ["kratos-bridge"]
CMD ["serve", "--host", "0.0.0.0", "--port", "4480"]
