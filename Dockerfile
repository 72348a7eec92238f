# The Control Center image: one image, three roles. The default command is the web process
# (daphne); docker-compose.yml runs the same image as the worker (`manage.py gatewayworker`),
# the one-shot `manage.py migrate`, and the gateway simulator (`manage.py fakegateway`).
# tests/test_deploy.py runs these commands outside Docker, in this order (Docker cannot run on
# our CI): keep the manage.py RUN lines, CMD and HEALTHCHECK in exec-friendly shapes.

# -- build: dependencies into a venv, static files collected ------------------------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /venv
# The project installs no packages of its own (packages = []): pyproject.toml alone pulls
# the dependencies, so this layer is rebuilt only when they change, not on every code edit.
COPY pyproject.toml ./
RUN /venv/bin/pip install --no-cache-dir .
COPY . .
# Hashed, compressed static files for WhiteNoise, collected with a throwaway key and data
# folder (neither is used at run time).
RUN DJANGO_SECRET_KEY=collectstatic-only CONTROLCENTER_DATA_DIR=/tmp/build-data /venv/bin/python manage.py collectstatic --noinput -v0
RUN /venv/bin/python -m compileall -q /src/controlcenter /src/fleet /src/chat

# -- run: no compilers, no pip cache, not root ---------------------------------------------
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 --user-group controlcenter
COPY --from=build /venv /venv
# The code belongs to root, read-only for the app; only the data folder is the app's.
COPY --from=build /src /app
# 0700: the SQLite database there holds the device keys and tokens.
RUN install -d -m 0700 -o controlcenter -g controlcenter /app/data
WORKDIR /app
USER controlcenter
ENV PATH=/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 CONTROLCENTER_DATA_DIR=/app/data
EXPOSE 8000
# /healthz answers 200 when the process is up and the database answers (503 otherwise). No
# curl in a slim image: the standard library does it. urlopen raises on 503, so exit 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# Exec form: daphne is PID 1 and gets SIGTERM itself. No --proxy-headers: daphne would
# believe X-Forwarded-For from any client; behind a reverse proxy, name it in
# CONTROLCENTER_TRUSTED_PROXIES instead (controlcenter/proxy.py).
CMD ["daphne", "--bind", "0.0.0.0", "--port", "8000", "controlcenter.asgi:application"]
